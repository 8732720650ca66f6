"""Inpainting LDMs: the masked image's latent and the mask, concatenated to z_t.

The first stage (f = 4) encodes the image with the region to fill blanked out; that latent and
the mask resized to the latent grid join z_t channel-wise (3 + 3 + 1 = 7 input channels for a
VQ-f4). Training masks are drawn per example: thick and thin strokes plus boxes covering
cond.mask_coverage of the image (ldm_jax/data/masks.py), or a folder's own (data.mask_dir).

Variants:
  big    (default) the paper's LDM-4 inpainting model as released (CompVis inpainting_big, as
         read from its config: VQ-f4, UNet 256 channels, mult 1,2,3,4, attention at downsample
         factors 8,4,2 with 8 heads, resblock up/down-sampling, L1 loss, linear schedule
         0.0015 -> 0.0205) on a photo folder at 256 px (the paper: Places); set data.path.
  cifar  the CPU recipe (python -m ldm_jax.recipes.cifar_tasks --task=inpaint): CIFAR-10 32 px
         with generated masks on the recipe's small KL-f4 autoencoder.

  python train.py --config=configs/ldm_inpaint.py --workdir=runs/ldm_inpaint \\
      --config.data.path=/data/places/train --config.first_stage.checkpoint=runs/ae_vq4
  python sample.py --checkpoint=runs/ldm_inpaint --out=filled --task=inpaint --inputs=imgs/ \\
      --masks=masks/
"""
from ldm_jax import config as config_lib

VARIANTS = ("big", "cifar")


def get_config(variant: str = "big"):
  if variant not in VARIANTS:
    raise ValueError(f"ldm_inpaint: unknown variant '{variant}' (known: {', '.join(VARIANTS)})")
  if variant == "cifar":
    from ldm_jax.recipes import cifar_tasks  # pylint: disable=g-import-not-at-top
    return cifar_tasks.ldm_config("inpaint", "runs/cifar_tasks/data/train",
                                  "runs/cifar_tasks/autoencoder")
  c = config_lib.defaults("ldm")
  c.data.source, c.data.path, c.data.image_size = "image_folder", "data/places", 256
  c.first_stage.checkpoint = "runs/ae_vq4_imagenet"
  c.cond.type, c.cond.concat = "concat", "inpaint"
  c.cond.mask_coverage = (0.1, 0.5)
  c.cond.p_uncond = 0.0
  c.unet.model_channels = 256
  c.unet.channel_mult = (1, 2, 3, 4)
  c.unet.num_res_blocks = 2
  c.unet.attention_resolutions = (8, 4, 2)
  c.unet.num_heads = 8
  c.unet.num_head_channels = -1
  c.unet.use_spatial_transformer = False
  c.unet.resblock_updown = True
  c.diffusion.loss_type = "l1"
  c.diffusion.linear_start = 0.0015
  c.diffusion.linear_end = 0.0205
  c.train.batch_size = 64
  c.train.warmup_steps = 10_000
  c.train.num_steps = 1_000_000
  c.sample.steps = 50
  return c

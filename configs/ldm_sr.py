"""Super-resolution x4 LDMs (LDM-SR): the low-resolution image concatenated to the latent.

The first stage has f = 4, so the low-resolution input (a quarter of the image's side) lives on
the latent grid and is concatenated to z_t channel-wise; nothing about it is learned (the
reference's cond stage is the identity).

Variants:
  bsr       (default) the reference's released bsr_sr model (CompVis latent-diffusion
            models/ldm/bsr_sr): VQ-f4 first stage (configs/ae_vq4_imagenet.py), 256 px crops
            from 64 px inputs, UNet 160 channels, mult 1,2,2,4, attention at downsample
            factor 8 (the reference lists 16 and 8; 16 never occurs), 32-channel heads, linear
            schedule 0.0015 -> 0.0155, lr 1e-6 x batch 64, BSR degradations. The reference
            trained on OpenImages; any large photo folder works: set data.path.
  imagenet  the paper's Table 5 model: the same UNet on ImageNet (tfds) with bicubic
            degradation, as SR3 (FID 2.8 with the paper's protocol).
  cifar     the CPU recipe (python -m ldm_jax.recipes.cifar_tasks --task=sr): CIFAR-10 32 px from
            8 px, a small KL-f4 first stage trained by the recipe, BSR degradations.

  python train.py --config=configs/ldm_sr.py --workdir=runs/ldm_sr \\
      --config.data.path=/data/openimages/train --config.first_stage.checkpoint=runs/ae_vq4
  python sample.py --checkpoint=runs/ldm_sr --out=upscaled --task=upscale --inputs=photos/ \\
      --tile=64
"""
from ldm_jax import config as config_lib
from ldm_jax.data import presets

VARIANTS = ("bsr", "imagenet", "cifar")


def get_config(variant: str = "bsr"):
  if variant not in VARIANTS:
    raise ValueError(f"ldm_sr: unknown variant '{variant}' (known: {', '.join(VARIANTS)})")
  if variant == "cifar":   # the recipe's config, with its paths
    from ldm_jax.recipes import cifar_tasks  # pylint: disable=g-import-not-at-top
    return cifar_tasks.ldm_config("sr", "runs/cifar_tasks/data/train",
                                  "runs/cifar_tasks/autoencoder")
  c = config_lib.defaults("ldm")
  c.cond.type, c.cond.concat = "concat", "lowres"
  c.cond.p_uncond = 0.0            # the reference does not drop the low-resolution input
  c.sample.guidance_scale = 1.0
  c.sample.steps = 100
  if variant == "imagenet":
    presets.use_tfds(c, "imagenet2012", eval_split="validation[:2000]", label_key="")
    c.cond.degradation = "bicubic"
  else:
    c.data.source, c.data.path = "image_folder", "data/openimages"
    c.cond.degradation = "bsr"
  c.data.image_size = 256
  c.first_stage.checkpoint = "runs/ae_vq4_imagenet"
  c.unet.model_channels = 160
  c.unet.channel_mult = (1, 2, 2, 4)
  c.unet.num_res_blocks = 2
  c.unet.attention_resolutions = (8,)
  c.unet.num_head_channels = 32
  c.unet.use_spatial_transformer = False
  c.diffusion.linear_start = 0.0015
  c.diffusion.linear_end = 0.0155
  c.train.batch_size = 64          # lr = 1e-6 x 64, as the reference
  c.train.num_steps = 1_000_000
  return c

"""Semantic synthesis LDMs: a one-hot label map, resized to the latent grid by the spatial
rescaler, concatenated to z_t.

The map enters the UNet channel-wise (latent channels + the rescaler's output); the UNet is
convolutional, so a larger map renders a larger image (the paper's landscape panoramas:
python sample.py --task=semantic on a 512x1024 map from a model trained on 256 px crops).

Variants:
  landscapes  (default) the paper's semantic-synthesis model as released (CompVis
              semantic_synthesis256, as read from its config): VQ-f4 first stage, COCO-Stuff's
              182 classes through a rescaler of 2 bilinear halvings and a learned bias-free
              1x1 conv to 3 channels, UNet 128 channels, mult 1,4,8, 2 ResBlocks, 8 heads
              (attention in the middle block only: its listed factors 32,16,8 never occur),
              L1 loss, linear schedule 0.0015 -> 0.0205, lr 1e-6 x batch. Point data.path at
              the photos and data.segmentation_dir at their label PNGs (same relative paths).
  mnist       the CPU recipe (python -m ldm_jax.recipes.digit_tasks --task=semantic): 32 px
              digits whose label map is the binarised digit labelled with its class (11
              classes with the background), on the quickstart's KL-f4 autoencoder.

  python train.py --config=configs/ldm_semantic.py --workdir=runs/ldm_semantic \\
      --config.data.path=/data/landscapes/images \\
      --config.data.segmentation_dir=/data/landscapes/labels \\
      --config.first_stage.checkpoint=runs/ae_vq4
  python sample.py --checkpoint=runs/ldm_semantic --out=scenes --task=semantic --inputs=maps/
"""
from ldm_jax import config as config_lib

VARIANTS = ("landscapes", "mnist")


def get_config(variant: str = "landscapes"):
  if variant not in VARIANTS:
    raise ValueError(f"ldm_semantic: unknown variant '{variant}' (known: "
                     f"{', '.join(VARIANTS)})")
  if variant == "mnist":   # the recipe's config, with its paths
    from ldm_jax.recipes import digit_tasks  # pylint: disable=g-import-not-at-top
    return digit_tasks.ldm_config("semantic", "runs/digit_tasks/data/semantic/train",
                                  "runs/digit_tasks/autoencoder")
  c = config_lib.defaults("ldm")
  c.data.source, c.data.path, c.data.image_size = "image_folder", "data/landscapes/images", 256
  c.data.segmentation_dir = "data/landscapes/labels"
  c.data.random_flip = True          # maps flip with their images
  c.first_stage.checkpoint = "runs/ae_vq4_imagenet"
  c.cond.type, c.cond.concat = "concat", "segmentation"
  c.cond.seg_classes, c.cond.rescaler_stages, c.cond.rescaler_channels = 182, 2, 3
  c.cond.p_uncond = 0.0
  c.unet.model_channels = 128
  c.unet.channel_mult = (1, 4, 8)
  c.unet.num_res_blocks = 2
  c.unet.attention_resolutions = ()
  c.unet.num_heads, c.unet.num_head_channels = 8, -1
  c.unet.use_spatial_transformer = False
  c.diffusion.linear_start, c.diffusion.linear_end = 0.0015, 0.0205
  c.diffusion.loss_type = "l1"
  c.train.batch_size = 32
  c.train.num_steps = 500_000
  c.sample.guidance_scale = 1.0
  c.sample.steps = 100
  return c

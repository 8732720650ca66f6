"""Unconditional CelebA-HQ 256 LDM on the VQ-f4 first stage (64x64x3 latents): the reference's
celebahq-ldm-vq-4 (224 channels, mult 1,2,3,4, self-attention at downsample factors 8,4,2).

celeb_a_hq needs its files placed by hand in data.manual_dir (see the tfds catalog).

  python train.py --config=configs/ae_vq4_imagenet.py --workdir=runs/ae_vq4_imagenet
  python train.py --config=configs/ldm_vq4_celebahq.py --workdir=runs/ldm_vq4_celebahq \\
      --config.data.manual_dir=/path/to/celeba_hq
"""
from ldm_jax import config as config_lib
from ldm_jax.data import presets


def get_config():
  c = config_lib.defaults("ldm")
  presets.use_tfds(c, "celeb_a_hq/256", label_key="")
  c.data.image_size = 256
  c.first_stage.checkpoint = "runs/ae_vq4_imagenet"

  c.unet.model_channels = 224
  c.unet.channel_mult = (1, 2, 3, 4)
  c.unet.num_res_blocks = 2
  c.unet.attention_resolutions = (8, 4, 2)
  c.unet.num_head_channels = 32
  c.unet.use_spatial_transformer = False

  c.cond.type = "none"
  c.diffusion.linear_start = 0.0015
  c.diffusion.linear_end = 0.0195

  c.train.batch_size = 48
  c.train.lr = 2e-6                     # x 48 = 9.6e-5, as the reference
  c.train.num_steps = 500_000
  c.train.ckpt_every = 5000
  c.train.image_every = 5000
  return c

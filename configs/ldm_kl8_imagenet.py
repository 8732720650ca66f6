"""Class-conditional ImageNet LDM on the KL-f8 first stage (32x32x4 latents at 256 px).

The reference UNet of cin-ldm-vq-f8 (395M parameters: 256 channels, mult 1,2,4, attention at
downsample factors 4,2,1 with 32-channel heads, one transformer block, context 512) with a
trainable class embedder feeding cross-attention. Unlike the reference, 10% of labels are
dropped to a learned null class so classifier-free guidance works (sampled at s = 1.5).

  python train.py --config=configs/ae_kl8_imagenet.py --workdir=runs/ae_kl8_imagenet
  python train.py --config=configs/ldm_kl8_imagenet.py --workdir=runs/ldm_kl8_imagenet \\
      --config.data.manual_dir=/path/to/imagenet_tars
"""
from ldm_jax import config as config_lib
from ldm_jax.data import presets


def get_config():
  c = config_lib.defaults("ldm")
  presets.use_tfds(c, "imagenet2012", eval_split="validation[:5000]")
  c.data.image_size = 256
  c.first_stage.checkpoint = "runs/ae_kl8_imagenet"
  # Encode the training set once into bf16 latents (<workdir>/latents): no autoencoder pass per
  # step. Training computes in bf16 on GPU/TPU (train.compute_dtype='auto').
  c.first_stage.precompute_latents = True

  c.unet.model_channels = 256
  c.unet.channel_mult = (1, 2, 4)
  c.unet.num_res_blocks = 2
  c.unet.attention_resolutions = (4, 2, 1)
  c.unet.num_head_channels = 32
  c.unet.use_spatial_transformer = True
  c.unet.transformer_depth = 1

  c.cond.type = "class"
  c.cond.embed_dim = 512
  c.cond.p_uncond = 0.1

  c.diffusion.linear_start = 0.0015
  c.diffusion.linear_end = 0.0195
  c.diffusion.scale_by_std = True       # our own KL-f8 is not Stable Diffusion's (0.18215)

  c.train.batch_size = 64               # lr = 1e-6 x 64 = 6.4e-5, as the reference
  c.train.num_steps = 1_000_000
  c.train.ckpt_every = 5000
  c.train.eval_every = 5000
  c.train.image_every = 5000
  c.sample.steps = 50
  c.sample.guidance_scale = 1.5
  return c

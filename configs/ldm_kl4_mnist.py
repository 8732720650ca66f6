"""Class-conditional LDM on MNIST latents (8x8x3) of the KL-f4 autoencoder of
configs/ae_kl4_mnist.py: a real two-stage run for a CPU.

  python train.py --config=configs/ae_kl4_mnist.py --workdir=runs/ae_kl4_mnist
  python train.py --config=configs/ldm_kl4_mnist.py --workdir=runs/ldm_kl4_mnist
  python sample.py --checkpoint=runs/ldm_kl4_mnist --out=runs/ldm_kl4_mnist/samples \\
      --per_class=10 --guidance_scale=3

The latents are encoded once (first_stage.precompute_latents) and 10% of labels are dropped to
a learned null class, so the model samples with classifier-free guidance.
"""
from ldm_jax import config as config_lib
from ldm_jax.data import presets


def get_config():
  c = config_lib.defaults("ldm")
  presets.use_packaged_mnist(c, image_size=32)
  c.first_stage.checkpoint = "runs/ae_kl4_mnist"
  c.first_stage.precompute_latents = True

  c.unet.model_channels = 64
  c.unet.channel_mult = (1, 2, 2)
  c.unet.num_res_blocks = 2
  c.unet.attention_resolutions = (2, 4)
  c.unet.num_head_channels = 32

  c.cond.type = "class"
  c.cond.embed_dim = 128
  c.cond.p_uncond = 0.1

  c.diffusion.scale_by_std = True

  c.train.batch_size = 64
  c.train.num_steps = 2000
  c.train.lr = 3e-4
  c.train.scale_lr = False
  c.train.schedule = "cosine"
  c.train.warmup_steps = 100
  c.train.min_lr_ratio = 0.1
  c.train.ema_decay = 0.999
  c.train.log_every = 100
  c.train.ckpt_every = 500
  c.train.eval_every = 500
  c.train.eval_batches = 4
  c.train.image_every = 500
  c.train.num_summary_images = 10
  c.sample.steps = 50
  c.sample.guidance_scale = 3.0
  return c

"""A tiny stage-1 autoencoder on the packaged MNIST digits, for tests and smoke runs.

  python train.py --config=configs/tiny_ae.py --workdir=/tmp/tiny_ae       # KL, f = 4
  python train.py --config=configs/tiny_ae.py:vq --workdir=/tmp/tiny_vq    # VQ, f = 4

Seconds per hundred steps on a laptop CPU; not meant to produce good reconstructions.
"""
from ldm_jax import config as config_lib
from ldm_jax.data import presets


def get_config(variant: str = "kl"):
  c = config_lib.defaults("autoencoder")
  presets.use_packaged_mnist(c, image_size=32)

  c.model.type = variant
  c.model.ch = 32
  c.model.ch_mult = (1, 1, 2)
  c.model.num_res_blocks = 1
  c.model.z_channels = 3
  c.model.embed_dim = 3
  c.model.n_embed = 64

  c.loss.lpips_weight = 0.0     # tests that need LPIPS switch it on
  c.loss.disc_start = 5
  c.disc.base_channels = 32
  c.disc.num_layers = 2

  c.train.batch_size = 16
  c.train.num_steps = 20
  c.train.lr = 2e-4
  c.train.scale_lr = False
  c.train.log_every = 5
  c.train.ckpt_every = 10
  c.train.eval_every = 10
  c.train.eval_batches = 1
  c.train.image_every = 0
  return c

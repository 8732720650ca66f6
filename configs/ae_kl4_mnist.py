"""KL-f4 autoencoder on MNIST digits (28 px padded to 32; 8x8x3 latents): a real run for a CPU.

Trains on the first 9,000 test-set digits and evaluates on the last 1,000 (the packaged copy of
the MNIST test set, so no download). About 45 minutes on 2 CPU cores; reached 29.4 dB PSNR on
the held-out digits (see README, "Results").

  python train.py --config=configs/ae_kl4_mnist.py --workdir=runs/ae_kl4_mnist
"""
from ldm_jax import config as config_lib
from ldm_jax.data import presets


def get_config():
  c = config_lib.defaults("autoencoder")
  presets.use_packaged_mnist(c, image_size=32)

  c.model.type = "kl"
  c.model.ch = 32
  c.model.ch_mult = (1, 2, 2)
  c.model.num_res_blocks = 1
  c.model.z_channels = 3
  c.model.embed_dim = 3

  # LPIPS (VGG16 on ImageNet photos) adds little on binary-looking digits (on a CPU it makes
  # CIFAR's autoencoder step 1.35x slower); the patch GAN sharpens strokes in the last part
  # of training.
  c.loss.lpips_weight = 0.0
  c.loss.disc_start = 1200
  c.loss.disc_weight = 0.1
  c.disc.base_channels = 32
  c.disc.num_layers = 2

  c.train.batch_size = 32
  c.train.num_steps = 1500
  c.train.lr = 1e-3
  c.train.scale_lr = False
  c.train.schedule = "cosine"
  c.train.warmup_steps = 100
  c.train.min_lr_ratio = 0.05
  c.train.ema_decay = 0.999
  c.train.log_every = 100
  c.train.ckpt_every = 500
  c.train.eval_every = 500
  c.train.eval_batches = 8
  c.train.image_every = 1000
  return c

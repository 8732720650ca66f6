"""KL-f4 autoencoder (64x64x3 latents at 256 px): the first stage of the LDM-4 models.

Reference: CompVis latent-diffusion models/first_stage_models/kl-f4/config.yaml (trained there
on OpenImages; here on ImageNet through tfds: put the ImageNet tars in data.manual_dir).

  python train.py --config=configs/ae_kl4_imagenet.py --workdir=runs/ae_kl4_imagenet \
      --config.data.manual_dir=/path/to/imagenet_tars
"""
from ldm_jax import config as config_lib
from ldm_jax.data import presets


def get_config():
  c = config_lib.defaults("autoencoder")
  presets.use_tfds(c, "imagenet2012", eval_split="validation[:2000]", label_key="")
  c.data.image_size = 256

  c.model.type = "kl"
  c.model.ch = 128
  c.model.ch_mult = (1, 2, 4)
  c.model.num_res_blocks = 2
  c.model.attn_resolutions = ()
  c.model.z_channels = 3
  c.model.embed_dim = 3

  c.loss.lpips_weight = 1.0
  c.loss.disc_start = 50001
  c.loss.disc_weight = 0.5
  c.disc.num_layers = 3

  c.train.batch_size = 32        # global batch per update, micro-batches included
  c.train.grad_accum = 1
  c.train.num_steps = 500_000
  # Stage-1 defaults already follow the reference: lr 4.5e-6 per example scaled by the global
  # batch (scale_lr), Adam betas (0.5, 0.9) for both the autoencoder and the discriminator.
  return c

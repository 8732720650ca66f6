"""A tiny latent diffusion model on the packaged MNIST digits, for tests and smoke runs.

Point it at any stage-1 run (e.g. configs/tiny_ae.py):

  python train.py --config=configs/tiny_ae.py --workdir=runs/tiny_ae
  python train.py --config=configs/tiny_ldm.py:class --workdir=runs/tiny_ldm

Variants select the conditioning: uncond, class, adm, text, lowres, inpaint, hybrid.
"""
from ldm_jax import config as config_lib
from ldm_jax.data import presets

VARIANTS = ("uncond", "class", "adm", "text", "lowres", "inpaint", "hybrid")


def get_config(variant: str = "class"):
  if variant not in VARIANTS:
    raise ValueError(f"tiny_ldm: unknown variant '{variant}' (known: {', '.join(VARIANTS)})")
  c = config_lib.defaults("ldm")
  c.first_stage.checkpoint = "runs/tiny_ae"   # train.py --config=configs/tiny_ae.py writes it
  presets.use_packaged_mnist(c, image_size=32)

  c.unet.model_channels = 32
  c.unet.channel_mult = (1, 2)
  c.unet.num_res_blocks = 1
  c.unet.attention_resolutions = (2,)
  c.unet.num_head_channels = 16
  c.cond.embed_dim = 32
  c.cond.text_depth = 1
  c.cond.text_heads = 2
  c.cond.text_max_length = 8
  c.cond.text_tokenizer = "train"
  c.cond.text_vocab_size = 64

  c.cond.type = {"uncond": "none", "lowres": "concat", "inpaint": "concat"}.get(variant, variant)
  if variant in ("lowres", "inpaint"):
    c.cond.concat = variant
  if variant == "hybrid":
    c.cond.concat, c.cond.context = "lowres", "class"
  if variant == "uncond":
    c.unet.use_spatial_transformer = False

  c.diffusion.scale_by_std = True
  c.sample.steps = 10
  c.train.batch_size = 16
  c.train.num_steps = 20
  c.train.lr = 1e-3
  c.train.scale_lr = False
  c.train.ema_decay = 0.999
  c.train.log_every = 5
  c.train.ckpt_every = 10
  c.train.eval_every = 10
  c.train.eval_batches = 1
  c.train.image_every = 0
  c.train.num_summary_images = 4
  return c

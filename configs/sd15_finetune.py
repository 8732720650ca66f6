"""Fine-tunes Stable Diffusion (1.x or 2.x) on a captioned image folder: the UNet trains, the
VAE and the CLIP text encoder stay frozen (they ride outside the optimizer and the checkpoints).

Convert the checkpoint once: the export holds the UNet, VAE, text encoder and tokenizer, and its
config the architecture this config copies.

  python -m ldm_jax.interop.convert sd --checkpoint stable-diffusion-v1-5/ --out exports/sd15
  python train.py --config=configs/sd15_finetune.py:exports/sd15 --workdir=runs/sd15_pets \\
      --config.data.path=/data/pets        # name.jpg + name.txt captions (or captions.jsonl)
  python sample.py --checkpoint=runs/sd15_pets --out=samples --prompts=prompts.txt
  python -m ldm_jax.export --workdir=runs/sd15_pets --out=exports/sd15_pets
  python -m ldm_jax.interop.convert to-diffusers --export exports/sd15_pets --out hf/sd15_pets

The argument after ':' is '[variant][,export]': the export (default exports/sd15; without one
the config describes SD 1.5 with placeholder paths), optionally preceded by 'tiny,' (the
test-sized variant: a few steps at the export's own size).

Defaults follow common SD fine-tuning practice: AdamW at a constant 1e-5 after 500 warm-up
steps, batch 32, bfloat16 compute on accelerators with float32 master weights, EMA 0.9999, 10%
of captions dropped for classifier-free guidance, images at the model's own size (512 for SD
1.x; set data.image_size=768 for a 768-v model). On pods, shard the 860M-parameter UNet with
mesh.fsdp (e.g. 8) and trade compute for memory with unet.remat;
first_stage.precompute_latents=True encodes the folder once (centre crops) instead of every
step, and cond.clip_precompute=True stores the captions' CLIP contexts with the latents.
"""
import json
import os

from ldm_jax import config as config_lib

VARIANTS = ("sd15", "tiny")
# Sections whose fields describe the pretrained model (copied from the export's config).
_MODEL_SECTIONS = ("unet", "diffusion", "cond")


def _copy_model(c, export: str):
  path = os.path.join(export, "config.json")
  if not os.path.isfile(path):
    raise ValueError(f"sd15_finetune: '{export}' is not an ldm_jax export (no config.json); "
                     f"convert the checkpoint first: python -m ldm_jax.interop.convert sd "
                     f"--checkpoint <SD folder or file> --out {export}")
  with open(path, encoding="utf-8") as f:
    saved = json.load(f)
  if saved.get("cond", {}).get("text_encoder") != "clip":
    raise ValueError(f"sd15_finetune: '{export}' is not a Stable Diffusion export (its "
                     f"cond.text_encoder is not 'clip')")
  for section in _MODEL_SECTIONS:
    for key, value in saved[section].items():
      if key in c[section]:
        c[section][key] = tuple(value) if isinstance(value, list) else value
  c.data.image_size, c.data.channels = saved["data"]["image_size"], saved["data"]["channels"]
  export = os.path.abspath(export)
  c.first_stage.checkpoint = c.cond.clip_weights = c.unet.init_from = export
  c.cond.text_vocab = os.path.join(export, "tokenizer")


def _sd15(c):
  """Stable Diffusion 1.5's architecture, for the config without an export at hand (its paths
  are placeholders; the export's own config replaces all of it)."""
  u, d = c.unet, c.diffusion
  u.model_channels, u.channel_mult, u.num_res_blocks = 320, (1, 2, 4, 4), 2
  u.attention_resolutions, u.num_heads, u.num_head_channels = (4, 2, 1), 8, -1
  u.use_spatial_transformer, u.transformer_depth, u.use_linear_proj = True, 1, False
  d.beta_schedule, d.linear_start, d.linear_end = "linear", 0.00085, 0.012
  d.parameterization, d.scale_factor = "eps", 0.18215
  c.cond.type, c.cond.text_encoder, c.cond.text_tokenizer = "text", "clip", "clip"
  c.cond.embed_dim, c.cond.text_max_length, c.cond.clip_layer = 768, 77, "last"
  c.data.image_size = 512
  export = os.path.abspath(DEFAULT_EXPORT)
  c.first_stage.checkpoint = c.cond.clip_weights = c.unet.init_from = export
  c.cond.text_vocab = os.path.join(export, "tokenizer")


DEFAULT_EXPORT = "exports/sd15"


def get_config(arg: str = ""):
  """arg: '[variant][,export]', e.g. 'exports/sd15', 'tiny,exports/tiny_sd'."""
  parts = [p for p in arg.split(",") if p]
  variant = parts.pop(0) if parts and parts[0] in VARIANTS else "sd15"
  if len(parts) > 1:
    raise ValueError(f"sd15_finetune: expected '[{'|'.join(VARIANTS)}][,<export>]', got {arg!r}")
  c = config_lib.defaults("ldm")
  if parts or os.path.isdir(DEFAULT_EXPORT):
    _copy_model(c, parts[0] if parts else DEFAULT_EXPORT)
  else:
    _sd15(c)
  c.data.source, c.data.path, c.data.split = "image_folder", "data/captioned", ""
  c.data.random_flip = False          # "left" and "right" in captions would lie
  c.first_stage.sample_posterior = True
  c.unet.dropout, c.unet.attention_impl = 0.0, "auto"
  c.cond.p_uncond = 0.1
  c.diffusion.scale_by_std = False    # the released scale factor (copied above)
  c.train.compute_dtype = "auto"      # bfloat16 on GPU/TPU, float32 master weights
  c.train.optimizer, c.train.weight_decay = "adamw", 1e-2
  c.train.batch_size, c.train.lr, c.train.scale_lr = 32, 1e-5, False
  c.train.warmup_steps, c.train.num_steps = 500, 15_000
  c.train.ema_decay = 0.9999
  c.sample.sampler, c.sample.steps, c.sample.guidance_scale = "ddim", 50, 7.5
  if variant == "tiny":
    c.data.eval_split, c.data.workers = "", 0
    c.train.batch_size, c.train.num_steps, c.train.warmup_steps = 4, 3, 0
    c.train.lr, c.train.ema_decay, c.train.compute_dtype = 1e-3, 0.0, "float32"
    c.train.ckpt_every, c.train.log_every, c.train.num_summary_images = 3, 1, 2
    c.sample.steps = 2
  return c

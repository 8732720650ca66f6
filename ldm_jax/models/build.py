"""Modules from config sections: the one place a config field becomes a module argument.

Each `build_*` reads only its own config section (plus the facts it is given as arguments), so
tests and converters build modules with plain arguments and nothing here knows about training.
"""
from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from ldm_jax.errors import ConfigError
from ldm_jax.models.autoencoder import AutoencoderKL, VQModel
from ldm_jax.models.discriminator import NLayerDiscriminator
from ldm_jax.models.unet import UNet

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
logger = logging.getLogger("ldm_jax")


def resolve_dtype(name: str, backend: str | None = None) -> str:
  """A `train.compute_dtype` name with 'auto' resolved: 'bfloat16' on GPU and TPU (their fast
  matmul type), 'float32' on CPU (where bfloat16 is emulated, and slower)."""
  if name != "auto":
    return name
  backend = backend or jax.default_backend()
  return "float32" if backend == "cpu" else "bfloat16"


@functools.lru_cache(maxsize=None)
def _say_dtype(backend: str, name: str):
  logger.info("train.compute_dtype='auto': computing in %s on %s (parameters stay float32)",
              name, backend)


def dtype_of(name: str):
  """The jnp dtype of a config's `train.compute_dtype` name ('auto' resolved, and said once)."""
  if name == "auto":
    name = resolve_dtype(name)
    _say_dtype(jax.default_backend(), name)
  if name not in DTYPES:
    raise ConfigError(f"train.compute_dtype: expected one of {['auto'] + sorted(DTYPES)}, got "
                      f"{name!r}")
  return DTYPES[name]


def build_autoencoder(model_config, *, image_size: int, channels: int, dtype=jnp.float32,
                      attention_impl: str | None = "auto"):
  """AutoencoderKL or VQModel from a stage-1 `config.model` section."""
  m = model_config
  kw = dict(ch=m.ch, out_ch=channels, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
            attn_resolutions=tuple(m.attn_resolutions), z_channels=m.z_channels,
            embed_dim=m.embed_dim, resolution=image_size, dropout=m.dropout, dtype=dtype,
            remat=m.remat, attention_impl=attention_impl,
            norm_groups=m.get("norm_groups", 32), mid_attention=m.get("mid_attention", True))
  if m.type == "kl":
    return AutoencoderKL(**kw)
  return VQModel(n_embed=m.n_embed, beta=m.vq_beta, ema_decay=m.vq_ema_decay,
                 restart_dead=m.vq_restart_dead, dead_threshold=m.vq_dead_threshold, **kw)


def build_discriminator(disc_config, dtype=jnp.float32) -> NLayerDiscriminator:
  """The PatchGAN of a stage-1 `config.disc` section."""
  d = disc_config
  return NLayerDiscriminator(base_channels=d.base_channels, num_layers=d.num_layers, norm=d.norm,
                             dtype=dtype)


def build_unet(unet_config, *, in_channels: int, out_channels: int, context: bool,
               adm_classes: int = 0, dtype=jnp.float32, activation_sharding=None) -> UNet:
  """The UNet of a stage-2 `config.unet` section; the conditioning decides the channels, the
  cross-attention (`context`) and the label embedding (`adm_classes`)."""
  u = unet_config
  return UNet(in_channels=in_channels, out_channels=out_channels,
              model_channels=u.model_channels, channel_mult=tuple(u.channel_mult),
              num_res_blocks=u.num_res_blocks,
              attention_resolutions=tuple(u.attention_resolutions), dropout=u.dropout,
              conv_resample=u.conv_resample, num_classes=adm_classes,
              use_scale_shift_norm=u.use_scale_shift_norm, resblock_updown=u.resblock_updown,
              num_heads=u.num_heads, num_head_channels=u.num_head_channels,
              use_spatial_transformer=u.use_spatial_transformer or context,
              transformer_depth=u.transformer_depth, use_linear_proj=u.use_linear_proj,
              dtype=dtype, remat=u.remat, norm_groups=u.get("norm_groups", 32),
              norm_eps=u.get("norm_eps", 1e-5),
              attention_impl=u.attention_impl, activation_sharding=activation_sharding,
              attention_coords=u.get("attention_coords", False))


# --------------------------------------------------------------------------------------------
# Consistency checks: what a config must satisfy for the factories above to build its modules.
# They read the same sections (plus `data` and `cond` where those shape the model).
# --------------------------------------------------------------------------------------------
def _require_positive(section_name: str, section, *keys):
  for key in keys:
    if section[key] <= 0:
      raise ConfigError(f"{section_name}.{key}: must be positive, got {section[key]}")


def check_autoencoder_config(config) -> None:
  """Raises ConfigError when `config.model` cannot build an autoencoder for `config.data`."""
  m, size = config.model, config.data.image_size
  _require_positive("model", m, "ch", "z_channels", "embed_dim")
  if not m.ch_mult or any(c <= 0 for c in m.ch_mult):
    raise ConfigError(f"model.ch_mult: expected positive multipliers, got {m.ch_mult}")
  f = 2 ** (len(m.ch_mult) - 1)
  if size % f:
    raise ConfigError(f"data.image_size ({size}) must be divisible by the downsampling factor "
                      f"f={f} of model.ch_mult {tuple(m.ch_mult)}")
  sides = sorted({size // 2 ** i for i in range(len(m.ch_mult))}, reverse=True)
  for r in m.attn_resolutions:
    if r not in sides:
      raise ConfigError(f"model.attn_resolutions: {r} is not a feature-map side of this model "
                        f"(sides are {sides})")
  groups = m.get("norm_groups", 32)
  if groups <= 0 or m.ch % groups or any((m.ch * c) % groups for c in m.ch_mult):
    raise ConfigError(f"model.ch ({m.ch}) x model.ch_mult {tuple(m.ch_mult)} must be divisible "
                      f"by model.norm_groups ({groups}), the GroupNorm group count")
  if m.type == "vq" and m.n_embed < 2:
    raise ConfigError(f"model.n_embed: a codebook needs at least 2 codes, got {m.n_embed}")
  if not 0.0 <= m.vq_ema_decay < 1.0:
    raise ConfigError(f"model.vq_ema_decay: expected 0 (off) or a decay in (0, 1), got "
                      f"{m.vq_ema_decay}")


def check_unet_config(config) -> None:
  """Raises ConfigError when `config.unet` cannot build a UNet: attention at downsample factors
  the UNet lacks, heads that do not divide a level's channels, or a context without
  SpatialTransformers (`config.cond` decides the context)."""
  u, cond = config.unet, config.cond
  _require_positive("unet", u, "model_channels", "num_res_blocks")
  if not u.channel_mult or any(c <= 0 for c in u.channel_mult):
    raise ConfigError(f"unet.channel_mult: expected positive multipliers, got {u.channel_mult}")
  levels = len(u.channel_mult)
  factors = [2 ** i for i in range(levels)]
  for r in u.attention_resolutions:
    if r not in factors:
      raise ConfigError(f"unet.attention_resolutions: {r} is not a downsample factor of this "
                        f"UNet (factors are {factors}: 1 = the latent grid, one level per "
                        f"unet.channel_mult entry)")
  if u.num_heads <= 0 and u.num_head_channels <= 0:
    raise ConfigError("unet.num_heads / unet.num_head_channels: set one of them (> 0)")
  # Attention follows the ResBlocks of every level listed, and the middle block (last level).
  attended = {i for i in range(levels) if 2 ** i in u.attention_resolutions} | {levels - 1}
  for level in sorted(attended):
    ch = u.model_channels * u.channel_mult[level]
    if u.num_head_channels > 0 and ch % u.num_head_channels:
      raise ConfigError(f"unet.num_head_channels ({u.num_head_channels}) must divide the {ch} "
                        f"channels of level {level} (unet.model_channels x channel_mult[{level}])")
    if u.num_head_channels <= 0 and ch % u.num_heads:
      raise ConfigError(f"unet.num_heads ({u.num_heads}) must divide the {ch} channels of level "
                        f"{level} (unet.model_channels x channel_mult[{level}])")
  groups = u.get("norm_groups", 32)
  if groups <= 0 or any((u.model_channels * c) % groups for c in (1, *u.channel_mult)):
    raise ConfigError(f"unet.model_channels ({u.model_channels}) x unet.channel_mult "
                      f"{tuple(u.channel_mult)} must be divisible by unet.norm_groups "
                      f"({groups}), the GroupNorm group count")
  if cond.type in ("class", "text", "layout", "hybrid") and not u.use_spatial_transformer:
    raise ConfigError(f"unet.use_spatial_transformer: cond.type='{cond.type}' feeds a "
                      f"cross-attention context, which needs SpatialTransformer blocks (set True)")

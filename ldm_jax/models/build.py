"""Modules from config sections: the one place a config field becomes a module argument.

Each `build_*` reads only its own config section (plus the facts it is given as arguments), so
tests and converters build modules with plain arguments and nothing here knows about training.
"""
from __future__ import annotations

import jax.numpy as jnp

from ldm_jax.errors import ConfigError
from ldm_jax.models.autoencoder import AutoencoderKL, VQModel
from ldm_jax.models.discriminator import NLayerDiscriminator
from ldm_jax.models.unet import UNet

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dtype_of(name: str):
  """The jnp dtype of a config's `train.compute_dtype` name."""
  if name not in DTYPES:
    raise ConfigError(f"train.compute_dtype: expected one of {sorted(DTYPES)}, got {name!r}")
  return DTYPES[name]


def build_autoencoder(model_config, *, image_size: int, channels: int, dtype=jnp.float32,
                      attention_impl: str | None = None):
  """AutoencoderKL or VQModel from a stage-1 `config.model` section."""
  m = model_config
  kw = dict(ch=m.ch, out_ch=channels, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
            attn_resolutions=tuple(m.attn_resolutions), z_channels=m.z_channels,
            embed_dim=m.embed_dim, resolution=image_size, dropout=m.dropout, dtype=dtype,
            remat=m.remat, attention_impl=attention_impl)
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
               adm_classes: int = 0, dtype=jnp.float32) -> UNet:
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
              dtype=dtype, remat=u.remat,
              attention_impl=None if u.attention_impl == "xla" else u.attention_impl)

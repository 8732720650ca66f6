"""Building blocks shared by the autoencoder and the UNet (NHWC throughout).

Parameters are float32; `dtype` is the compute dtype (bfloat16 for mixed precision). Norms are
computed in float32 whatever the compute dtype.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models import cpu_conv
from ldm_jax.models.norms import GroupNormSiLU

Dtype = jnp.dtype


def group_norm(name: str | None = None, eps: float = 1e-6, groups: int = 32):
  """GroupNorm in float32: 32 groups by default, as the reference autoencoder (eps 1e-6) and
  UNet (eps 1e-5) use; the models take the count from their `norm_groups` field."""
  return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=jnp.float32, name=name)


def group_norm_silu(name: str | None = None, eps: float = 1e-6, groups: int = 32):
  """silu(group_norm(x)), same parameters; on a CPU with models/norms.py's one-pass gradient."""
  return GroupNormSiLU(num_groups=groups, epsilon=eps, own_vjp=jax.default_backend() == "cpu",
                       name=name)


def conv(features: int, kernel: int = 3, stride: int = 1, padding="SAME", dtype=jnp.float32,
         name: str | None = None, use_bias: bool = True, kernel_init=None):
  """A square conv, float32 parameters; on a CPU through models/cpu_conv.py (faster there)."""
  kw = {} if kernel_init is None else {"kernel_init": kernel_init}
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                 dtype=dtype, param_dtype=jnp.float32, use_bias=use_bias, name=name,
                 conv_general_dilated=cpu_conv.for_backend(), **kw)


class ResnetBlock(nn.Module):
  """The autoencoder's ResNet block: (GN, swish, conv3x3) x 2 with dropout, 1x1 shortcut."""
  out_channels: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  norm_groups: int = 32

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = group_norm_silu("norm1", groups=self.norm_groups)(x).astype(self.dtype)
    h = conv(self.out_channels, dtype=self.dtype, name="conv1")(h)
    h = group_norm_silu("norm2", groups=self.norm_groups)(h).astype(self.dtype)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = conv(self.out_channels, dtype=self.dtype, name="conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, kernel=1, dtype=self.dtype, name="nin_shortcut")(x)
    return x + h


class Downsample(nn.Module):
  """Stride-2 3x3 conv after padding one row/column at the bottom/right (the reference's
  asymmetric padding), or 2x2 average pooling when `with_conv` is False."""
  with_conv: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if not self.with_conv:
      return nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return conv(x.shape[-1], stride=2, padding="VALID", dtype=self.dtype, name="conv")(x)


def upsample_nearest(x, factor: int = 2):
  return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


class Upsample(nn.Module):
  """Nearest-neighbour x2, then (optionally) a 3x3 conv."""
  with_conv: bool = True
  out_channels: int | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = upsample_nearest(x)
    if self.with_conv:
      x = conv(self.out_channels or x.shape[-1], dtype=self.dtype, name="conv")(x)
    return x


def fourier_features(xy, frequencies: int = 6):
  """Fixed Fourier features of points xy (..., 2) in [0, 1]: sin and cos of 2^k pi x and
  2^k pi y, k < frequencies -> (..., 4 * frequencies). Layout corners and the UNet's
  positions (unet.attention_coords) share them, so the two are alike where they coincide."""
  angles = xy[..., None] * (jnp.pi * 2.0 ** jnp.arange(frequencies))   # (..., 2, F)
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], -1).reshape(
      xy.shape[:-1] + (4 * frequencies,))


def pixel_centres(h: int, w: int):
  """The centres (x, y) in [0, 1] of an h x w map's pixels, row-major: (h * w, 2). In layout
  corners' convention (x = column, y = row; models/conditioning.grid_fourier_features)."""
  xs, ys = (jnp.arange(w) + 0.5) / w, (jnp.arange(h) + 0.5) / h
  return jnp.stack(jnp.meshgrid(xs, ys, indexing="xy"), -1).reshape(h * w, 2)


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
  """Sinusoidal embedding [cos | sin] of (possibly fractional) timesteps, shape (B, dim)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


# Gradient checkpointing policies (a model's `remat` field):
#   none       keep every activation for the backward pass (fastest, most memory);
#   block      recompute each ResNet / attention block's insides from its input (least memory of
#              the per-block choices, about one extra forward pass);
#   save_dots  per block too, but keep the outputs of convolutions and matmuls: only norms,
#              activations and other cheap elementwise work is recomputed;
#   full       keep only the model's inputs and recompute its whole forward pass (the caller
#              wraps the model's apply in jax.checkpoint: see `checkpoint_full`); blocks inside
#              are not rematerialised again.
REMAT_POLICIES = ("none", "block", "save_dots", "full")


def _save_dots(prim, *_, **__) -> bool:
  """jax.checkpoint policy: matmul and convolution outputs are saved, the rest recomputed."""
  return prim.name in ("dot_general", "conv_general_dilated")


def remat_policy(remat) -> str:
  """A `remat` field as one of REMAT_POLICIES; the booleans of older configs mean none/block."""
  if remat is True:
    return "block"
  if remat is False or remat is None:
    return "none"
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat: expected one of {REMAT_POLICIES}, got {remat!r}")
  return remat


def maybe_remat(module_cls, remat, static_argnums=()):
  """A module class with per-block rematerialisation for `remat` 'block' or 'save_dots'; the
  class itself for 'none' and 'full' (whole-model remat is applied around the model)."""
  policy = remat_policy(remat)
  if policy == "block":
    return nn.remat(module_cls, static_argnums=static_argnums)
  if policy == "save_dots":
    return nn.remat(module_cls, static_argnums=static_argnums, policy=_save_dots)
  return module_cls


def checkpoint_full(fn, remat):
  """`fn` under jax.checkpoint when `remat` is 'full' (only its arguments kept for the backward
  pass), else `fn` itself. Wrap a pure function of arrays (e.g. a module's apply)."""
  return jax.checkpoint(fn) if remat_policy(remat) == "full" else fn


zeros_init = jax.nn.initializers.zeros

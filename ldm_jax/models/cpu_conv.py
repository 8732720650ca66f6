"""A faster CPU convolution: the gradients, and the forward pass on small feature maps, written
as one matmul of the input's shifted copies (im2col); XLA's convolution forward elsewhere.

Why: XLA's CPU convolution gradients (input and kernel) ran 3-6x its forward time and were most
of the conv time in the UNet's fwd+bwd; the matmul form's gradients are XLA dot kernels. The
ImageNet UNet's fwd+bwd took 0.85x the time (benchmarks/conv.py --unet, RESULTS.md). XLA's
forward is the faster one on large maps but slow on small ones: at 8x8 (the ImageNet UNet's
deepest level) the matmul form took 0.58-0.87x its time, at 16x16 and up 1.3-1.8x.
Accelerators keep XLA's own convolution. Same numbers either way, up to float rounding.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")

# Narrower convolutions keep XLA's gradients: 4 -> 256 channels ran 1.2x slower this way, and
# 32 -> 32 at 32x32 2x slower ...
MIN_CHANNELS = 128
# ... except on input maps of at most SMALL_MAP_PIXELS (16x16) from SMALL_MAP_CHANNELS inputs:
# the CIFAR recipes' models (32-128 channels) ran their UNet forward in 0.86-0.89x the time and
# the autoencoder's fwd+bwd in 0.89-0.95x with this rule (the UNet's fwd+bwd 0.97-1.01x).
SMALL_MAP_CHANNELS = 32
SMALL_MAP_PIXELS = 256
# Feature maps of at most this many output pixels (8x8) also take the matmul form's forward.
MAX_MATMUL_FORWARD_PIXELS = 64


def _pads(lhs, rhs, padding) -> list[tuple[int, int]]:
  """Explicit (lo, hi) pads of a stride-1 NHWC conv ('SAME'/'VALID' resolved as lax does)."""
  if isinstance(padding, str):
    return lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], (1, 1), padding)
  return [(int(lo), int(hi)) for lo, hi in padding]


def _forward(x, w, pads):
  """im2col on small output maps, XLA's convolution on larger ones (see the module docstring)."""
  out_h = x.shape[1] + sum(pads[0]) - w.shape[0] + 1
  out_w = x.shape[2] + sum(pads[1]) - w.shape[1] + 1
  if out_h * out_w <= MAX_MATMUL_FORWARD_PIXELS:
    return patch_matmul(x, w, pads)
  return lax.conv_general_dilated(x, w, (1, 1), pads, dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x, w, pads):
  return _forward(x, w, pads)


def _conv_fwd(x, w, pads):
  return _forward(x, w, pads), (x, w)


def patch_matmul(x, w, pads):
  """The same convolution as one matmul of the input's kh*kw shifted copies (im2col)."""
  kh, kw = w.shape[:2]
  xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  h, wd = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
  patches = jnp.concatenate([xp[:, i:i + h, j:j + wd] for i in range(kh) for j in range(kw)],
                            axis=-1)                                   # (B, H, W, kh*kw*C)
  return jnp.einsum("bhwk,ko->bhwo", patches, w.reshape(-1, w.shape[-1]))


def _conv_bwd(pads, res, dy):
  x, w = res
  _, vjp = jax.vjp(lambda a, b: patch_matmul(a, b, pads), x, w)
  return vjp(dy)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, **kw):
  """lax.conv_general_dilated's signature (what flax's nn.Conv calls): stride-1, undilated,
  ungrouped NHWC convolutions of kernels larger than 1x1 with MIN_CHANNELS or more input
  channels (SMALL_MAP_CHANNELS on maps of at most SMALL_MAP_PIXELS) take the patch-matmul
  gradients (and forward, on maps of at most MAX_MATMUL_FORWARD_PIXELS outputs); everything
  else is lax.conv_general_dilated."""
  dims = functools.partial(lax.conv_dimension_numbers, lhs.shape, rhs.shape)
  plain = (lhs.ndim == 4 and dims(dimension_numbers) == dims(_NHWC)
           and tuple(window_strides) == (1, 1)
           and all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
           and feature_group_count == 1 and precision is None and not kw
           and rhs.shape[0] * rhs.shape[1] > 1 and _wide_enough(lhs, rhs))
  if not plain:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers, feature_group_count,
                                    precision=precision, **kw)
  return _conv(lhs, rhs, tuple(_pads(lhs, rhs, padding)))


def _wide_enough(lhs, rhs) -> bool:
  channels = rhs.shape[2]
  return channels >= MIN_CHANNELS or (channels >= SMALL_MAP_CHANNELS
                                      and lhs.shape[1] * lhs.shape[2] <= SMALL_MAP_PIXELS)


def for_backend() -> object | None:
  """The conv function nn.Conv should use here: this one on a CPU, XLA's (None) elsewhere."""
  return conv_general_dilated if jax.default_backend() == "cpu" else None

"""A faster CPU convolution: tiny feature maps (and, under YNNPACK's kernels, the gradients and
small maps) written as one matmul of the input's shifted copies (im2col); XLA's elsewhere, with
an input gradient that flips the maps rather than the kernel where the kernel is the larger.
Accelerators keep XLA's own convolution. Same numbers either way, up to float rounding.

With Eigen's kernels (ldm_jax/xla_cpu.py, the default since 2026-12-04) XLA's convolution is as
fast as the matmul form or faster everywhere but on maps of at most TINY_MAP_PIXELS outputs,
where it is 3-100x slower (16x2x2x512 -> 512: 204 ms forward against 2.6), and on small maps
its gradient spends about a third of its time copying the flipped kernel (`_conv_flipped_grad`).
What follows was measured under YNNPACK's kernels, and its rules apply only there.

Why: XLA's CPU convolution gradients (input and kernel) ran 3-6x its forward time and were most
of the conv time in the UNet's fwd+bwd; the matmul form's gradients are XLA dot kernels. The
ImageNet UNet's fwd+bwd took 0.85x the time (benchmarks/conv.py --unet, RESULTS.md). XLA's
forward is the faster one on large maps but slow on small ones: at 8x8 (the ImageNet UNet's
deepest level) the matmul form took 0.58-0.87x its time, at 16x16 and up 1.3-1.8x.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from ldm_jax import xla_cpu

_NHWC = ("NHWC", "HWIO", "NHWC")

# Eigen's kernels: maps of at most this many output pixels (2x2) take the matmul form.
TINY_MAP_PIXELS = 4

# YNNPACK's kernels: narrower convolutions keep XLA's gradients (4 -> 256 channels ran 1.2x
# slower this way, and 32 -> 32 at 32x32 2x slower) ...
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


def _out_pixels(x, w, pads) -> int:
  """Output pixels of the stride-1 conv (0 when the kernel does not fit: lax then says so)."""
  h = x.shape[1] + sum(pads[0]) - w.shape[0] + 1
  wd = x.shape[2] + sum(pads[1]) - w.shape[1] + 1
  return h * wd if h > 0 and wd > 0 else 0


def _xla_conv(x, w, pads):
  return lax.conv_general_dilated(x, w, (1, 1), pads, dimension_numbers=_NHWC)


def _forward(x, w, pads):
  """im2col on small output maps, XLA's convolution on larger ones (see the module docstring)."""
  if _out_pixels(x, w, pads) <= (TINY_MAP_PIXELS if xla_cpu.eigen_kernels()
                                 else MAX_MATMUL_FORWARD_PIXELS):
    return patch_matmul(x, w, pads)
  return _xla_conv(x, w, pads)


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
  """lax.conv_general_dilated's signature (what flax's nn.Conv calls). Stride-1, undilated,
  ungrouped NHWC convolutions of kernels larger than 1x1 take: with Eigen's kernels, the patch
  matmul on maps of at most TINY_MAP_PIXELS outputs, and the flipped-gradient form where the
  kernel outweighs the activations (see `_kernel_outweighs`); with YNNPACK's, the patch
  matmul's gradients with MIN_CHANNELS or more input channels (SMALL_MAP_CHANNELS on maps of at
  most SMALL_MAP_PIXELS) and its forward on maps of at most MAX_MATMUL_FORWARD_PIXELS outputs.
  Everything else is lax.conv_general_dilated."""
  dims = functools.partial(lax.conv_dimension_numbers, lhs.shape, rhs.shape)
  plain = (lhs.ndim == 4 and dims(dimension_numbers) == dims(_NHWC)
           and tuple(window_strides) == (1, 1)
           and all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
           and feature_group_count == 1 and precision is None and not kw
           and rhs.shape[0] * rhs.shape[1] > 1)
  pads = tuple(_pads(lhs, rhs, padding)) if plain else ()
  if plain and xla_cpu.eigen_kernels():
    outputs = _out_pixels(lhs, rhs, pads)
    if 0 < outputs <= TINY_MAP_PIXELS:
      return _conv(lhs, rhs, pads)
    if outputs and _kernel_outweighs(lhs, rhs, pads):
      return _conv_flipped_grad(lhs, rhs, pads)
  elif plain and _wide_enough(lhs, rhs):
    return _conv(lhs, rhs, pads)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                  rhs_dilation, dimension_numbers, feature_group_count,
                                  precision=precision, **kw)


def _kernel_outweighs(lhs, rhs, pads) -> bool:
  """Whether the kernel has more elements than the maps (the input's positions times its input
  plus output channels), and the pads lie within the kernel, as the flipped form needs."""
  kh, kw, cin, cout = rhs.shape
  maps = lhs.shape[0] * lhs.shape[1] * lhs.shape[2] * (cin + cout)
  return (kh * kw * cin * cout > maps
          and all(0 <= p < k for k, pad in zip((kh, kw), pads) for p in pad))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_flipped_grad(x, w, pads):
  """XLA's convolution whose input gradient flips the maps instead of the kernel.

  Why: XLA's own input gradient is a convolution with the kernel flipped in space and its
  channel axes swapped, a copy it makes every step. On the ImageNet UNet's 8x8 level that copy
  of a 3x3x2048x1024 kernel (75 MB) dominated: flipping the gradient and the result (2 MB each
  at batch 8) instead, with only the channel swap left on the kernel, took a conv's fwd+bwd
  0.66-0.76x the time (16x16: 0.91-0.96x; 32x32, where the kernel is the smaller: 1.0-1.02x).
  In the whole UNet's fwd+bwd, where those copies partly overlap other work, it saved 1.2%
  (benchmarks/conv.py --unet=imagenet). Correlation with a flipped kernel is the flip of the
  flipped input's correlation with it."""
  return _xla_conv(x, w, pads)


def _flipped_grad_fwd(x, w, pads):
  return _xla_conv(x, w, pads), (x, w)


def _flipped_grad_bwd(pads, res, dy):
  x, w = res
  flip = lambda a: a[:, ::-1, ::-1]                                       # noqa: E731
  # The transposed convolution's pads, seen from the flipped side: (k-1-hi, k-1-lo).
  back_pads = [(k - 1 - hi, k - 1 - lo) for k, (lo, hi) in zip(w.shape[:2], pads)]
  dx = flip(_xla_conv(flip(dy), jnp.swapaxes(w, 2, 3), back_pads))
  dw, = jax.linear_transpose(lambda k: _xla_conv(x, k, pads), w)(dy)   # XLA's kernel gradient
  return dx, dw


_conv_flipped_grad.defvjp(_flipped_grad_fwd, _flipped_grad_bwd)


def _wide_enough(lhs, rhs) -> bool:
  channels = rhs.shape[2]
  return channels >= MIN_CHANNELS or (channels >= SMALL_MAP_CHANNELS
                                      and lhs.shape[1] * lhs.shape[2] <= SMALL_MAP_PIXELS)


def for_backend() -> object | None:
  """The conv function nn.Conv should use here: this one on a CPU, XLA's (None) elsewhere."""
  return conv_general_dilated if jax.default_backend() == "cpu" else None

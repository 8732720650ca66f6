"""GroupNorm followed by SiLU as one layer, with its own gradient on a CPU.

The parameters are flax's nn.GroupNorm's ('scale', 'bias' under the layer's name), so models and
checkpoints are unchanged. Statistics as flax computes them (float32, var = E[x^2] - E[x]^2).

Why: in the ImageNet UNet's fwd+bwd on a CPU, XLA's autodiff of GroupNorm + SiLU became fusions
that each recompute the norm and SiLU's derivative from four or five full-size tensors to make
one per-channel sum (50-95 ms each at 32x32 with 512-768 channels). The VJP here reads x and
the incoming gradient once for both sums and once more for dx: in every GroupNorm + SiLU of the
models it took the ImageNet UNet's fwd+bwd from 1.29x diffusers' time to 1.05x
(benchmarks/RESULTS.md). Accelerators keep XLA's autodiff of the same forward.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


def _per_channel(a, channels: int):
  """(B, G) group values -> (B, C), each group's value on its channels."""
  return jnp.repeat(a, channels // a.shape[1], axis=1)


def _group_mean(per_channel_sums, groups: int, x):
  """(B, C) sums over x's positions -> (B, G) means over each group's positions and channels."""
  b, c = per_channel_sums.shape
  n = (x.size // (b * c)) * (c // groups)
  return per_channel_sums.reshape(b, groups, -1).sum(-1) / n


def _spread(v, x):
  """(B, C) -> broadcastable against x (B, ..., C)."""
  return v.reshape((x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],))


def _position_sum(a):
  """(B, ..., C) -> (B, C): the sum over positions."""
  return jnp.sum(a.reshape(a.shape[0], -1, a.shape[-1]), axis=1)


def _stats(x, groups: int, eps: float):
  """(mean, 1/std) per (batch, group) of float32 x (B, ..., C)."""
  mean = _group_mean(_position_sum(x), groups, x)
  mean2 = _group_mean(_position_sum(x * x), groups, x)
  return mean, jax.lax.rsqrt(jnp.maximum(0.0, mean2 - mean * mean) + eps)


def _normed(x, scale, bias, mean, rstd):
  """(x - mean) * rstd * scale + bias, as one multiply-add per element."""
  c = x.shape[-1]
  a = _per_channel(rstd, c) * scale
  return x * _spread(a, x) + _spread(bias - _per_channel(mean, c) * a, x)


def _forward(x, scale, bias, groups, eps):
  mean, rstd = _stats(x, groups, eps)
  return jax.nn.silu(_normed(x, scale, bias, mean, rstd)), (x, scale, bias, mean, rstd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm_silu(x, scale, bias, groups: int, eps: float):
  """silu(GroupNorm(x) * scale + bias) of float32 x (B, ..., C), with the one-pass VJP."""
  return _forward(x, scale, bias, groups, eps)[0]


def _backward(groups, eps, res, dout):
  del eps
  x, scale, bias, mean, rstd = res
  c = x.shape[-1]
  y = _normed(x, scale, bias, mean, rstd)
  s = jax.nn.sigmoid(y)
  dy = dout * (s * (1.0 + y * (1.0 - s)))               # through SiLU
  sum_dy, sum_dy_x = _position_sum(dy), _position_sum(dy * x)               # (B, C)
  m, r = _per_channel(mean, c), _per_channel(rstd, c)
  sum_dy_xhat = r * (sum_dy_x - m * sum_dy)
  mean_g = _per_channel(_group_mean(scale * sum_dy, groups, x), c)
  mean_g_xhat = _per_channel(_group_mean(scale * sum_dy_xhat, groups, x), c)
  # dx = r * (dy * scale - mean_g - xhat * mean_g_xhat), xhat = (x - m) * r
  k_dy, k_x = r * scale, -r * r * mean_g_xhat
  k_0 = -r * mean_g + r * r * mean_g_xhat * m
  dx = dy * _spread(k_dy, x) + x * _spread(k_x, x) + _spread(k_0, x)
  return dx, jnp.sum(sum_dy_xhat, 0), jnp.sum(sum_dy, 0)


group_norm_silu.defvjp(_forward, _backward)


class GroupNormSiLU(nn.Module):
  """silu(nn.GroupNorm(x)) in float32 with nn.GroupNorm's parameters; `own_vjp` picks the
  one-pass gradient (what a CPU gets, see `layers.group_norm_silu`)."""
  num_groups: int = 32
  epsilon: float = 1e-6
  own_vjp: bool = True

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f"GroupNorm: {c} channels do not split into {self.num_groups} groups")
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    x = x.astype(jnp.float32)
    if self.own_vjp:
      return group_norm_silu(x, scale, bias, self.num_groups, self.epsilon)
    return _forward(x, scale, bias, self.num_groups, self.epsilon)[0]

"""Attention: one core (jax.nn.dot_product_attention, fused kernels on GPU) and the blocks
built on it: the autoencoder's single-head AttnBlock, the UNet's multi-head AttentionBlock,
CrossAttention and the SpatialTransformer."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.layers import Dtype, conv, group_norm


def attention(q, k, v, mask=None, implementation: str | None = None):
  """Scaled dot-product attention of (B, L, heads, head_dim) arrays.

  `mask` is (B, Lk) bool, True where a key may be attended to. `implementation`: None lets JAX
  choose ('xla' everywhere), 'cudnn' asks for the fused flash kernel on NVIDIA GPUs.
  """
  if mask is not None:
    mask = mask[:, None, None, :]  # broadcast over heads and queries
  if implementation == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
    implementation = None  # the fused kernel exists for half precision only
  out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
  return out


class AttnBlock(nn.Module):
  """The autoencoder's single-head self-attention over all pixels, with 1x1 conv projections."""
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    y = group_norm("norm")(x).astype(self.dtype)
    q = conv(c, kernel=1, dtype=self.dtype, name="q")(y).reshape(b, h * w, 1, c)
    k = conv(c, kernel=1, dtype=self.dtype, name="k")(y).reshape(b, h * w, 1, c)
    v = conv(c, kernel=1, dtype=self.dtype, name="v")(y).reshape(b, h * w, 1, c)
    y = attention(q, k, v, implementation=self.attention_impl).reshape(b, h, w, c)
    return x + conv(c, kernel=1, dtype=self.dtype, name="proj_out")(y)

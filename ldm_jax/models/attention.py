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
  norm_groups: int = 32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    y = group_norm("norm", groups=self.norm_groups)(x).astype(self.dtype)
    q = conv(c, kernel=1, dtype=self.dtype, name="q")(y).reshape(b, h * w, 1, c)
    k = conv(c, kernel=1, dtype=self.dtype, name="k")(y).reshape(b, h * w, 1, c)
    v = conv(c, kernel=1, dtype=self.dtype, name="v")(y).reshape(b, h * w, 1, c)
    y = attention(q, k, v, implementation=self.attention_impl).reshape(b, h, w, c)
    return x + conv(c, kernel=1, dtype=self.dtype, name="proj_out")(y)


class AttentionBlock(nn.Module):
  """The UNet's multi-head self-attention block (openaimodel's AttentionBlock).

  One 1x1 projection gives q, k, v in the reference's "legacy" channel order: per head,
  [q | k | v] of head_dim channels each. The output projection starts at zero.
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  norm_groups: int = 32
  norm_eps: float = 1e-5

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    heads = self.num_heads
    y = group_norm("norm", eps=self.norm_eps, groups=self.norm_groups)(x)
    y = y.astype(self.dtype).reshape(b, h * w, c)
    qkv = nn.Dense(3 * c, dtype=self.dtype, param_dtype=jnp.float32, name="qkv")(y)
    qkv = qkv.reshape(b, h * w, heads, 3, c // heads)
    q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
    y = attention(q, k, v, implementation=self.attention_impl).reshape(b, h * w, c)
    y = nn.Dense(c, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=nn.initializers.zeros,
                 name="proj_out")(y)
    return x + y.reshape(b, h, w, c).astype(x.dtype)


class CrossAttention(nn.Module):
  """Multi-head attention of queries x (B, L, C) over a context (B, Lc, Cc), or over x itself
  when context is None. q/k/v projections have no bias; the output projection has one.
  `mask` (B, Lc) marks the context tokens that may be attended to."""
  heads: int
  head_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x, context=None, mask=None, train: bool = False):
    inner = self.heads * self.head_dim
    dense = lambda n, name, bias=False: nn.Dense(  # noqa: E731
        n, use_bias=bias, dtype=self.dtype, param_dtype=jnp.float32, name=name)
    context = x if context is None else context.astype(self.dtype)
    b, lq = x.shape[:2]
    lk = context.shape[1]
    q = dense(inner, "to_q")(x).reshape(b, lq, self.heads, self.head_dim)
    k = dense(inner, "to_k")(context).reshape(b, lk, self.heads, self.head_dim)
    v = dense(inner, "to_v")(context).reshape(b, lk, self.heads, self.head_dim)
    out = attention(q, k, v, mask=mask, implementation=self.attention_impl).reshape(b, lq, inner)
    out = dense(x.shape[-1], "to_out", bias=True)(out)
    return nn.Dropout(self.dropout, deterministic=not train)(out)


class GEGLUFeedForward(nn.Module):
  """Linear to 2 x inner as [value | gate], value * gelu(gate), dropout, linear back."""
  mult: int = 4
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    dim = x.shape[-1]
    inner = dim * self.mult
    h = nn.Dense(2 * inner, dtype=self.dtype, param_dtype=jnp.float32, name="proj_in")(x)
    value, gate = jnp.split(h, 2, axis=-1)
    h = value * jax.nn.gelu(gate, approximate=False)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    return nn.Dense(dim, dtype=self.dtype, param_dtype=jnp.float32, name="proj_out")(h)


class BasicTransformerBlock(nn.Module):
  """Pre-LayerNorm self-attention, cross-attention over the context, GEGLU feed-forward."""
  heads: int
  head_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x, context=None, mask=None, train: bool = False):
    norm = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, name=name)  # noqa: E731
    attn = lambda name: CrossAttention(self.heads, self.head_dim, self.dropout, self.dtype,  # noqa
                                       self.attention_impl, name=name)
    x = x + attn("attn1")(norm("norm1")(x).astype(self.dtype), train=train)
    # Without a context (an unconditional model) the second attention attends to x itself.
    x = x + attn("attn2")(norm("norm2")(x).astype(self.dtype), context, mask, train)
    x = x + GEGLUFeedForward(4, self.dropout, self.dtype, name="ff")(
        norm("norm3")(x).astype(self.dtype), train)
    return x


class SpatialTransformer(nn.Module):
  """GroupNorm -> 1x1 (or linear) proj_in -> transformer blocks over the pixels -> zero-init
  proj_out, plus the residual. The conditioning context enters through cross-attention.
  Its GroupNorm epsilon is 1e-6 in both reference layouts, whatever the UNet's norm_eps."""
  heads: int
  head_dim: int
  depth: int = 1
  dropout: float = 0.0
  use_linear: bool = False
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  norm_groups: int = 32

  @nn.compact
  def __call__(self, x, context=None, mask=None, train: bool = False):
    b, h, w, c = x.shape
    inner = self.heads * self.head_dim
    y = group_norm("norm", eps=1e-6, groups=self.norm_groups)(x).astype(self.dtype)
    if self.use_linear:
      y = nn.Dense(inner, dtype=self.dtype, param_dtype=jnp.float32, name="proj_in")(
          y.reshape(b, h * w, c))
    else:
      y = conv(inner, kernel=1, dtype=self.dtype, name="proj_in")(y).reshape(b, h * w, inner)
    for i in range(self.depth):
      y = BasicTransformerBlock(self.heads, self.head_dim, self.dropout, self.dtype,
                                self.attention_impl, name=f"transformer_blocks_{i}")(
                                    y, context, mask, train)
    if self.use_linear:
      y = nn.Dense(c, dtype=self.dtype, param_dtype=jnp.float32,
                   kernel_init=nn.initializers.zeros, name="proj_out")(y).reshape(b, h, w, c)
    else:
      y = conv(c, kernel=1, dtype=self.dtype, kernel_init=nn.initializers.zeros,
               name="proj_out")(y.reshape(b, h, w, inner))
    return x + y.astype(x.dtype)

"""Attention: one core (`attention`: cuDNN's fused flash kernel on NVIDIA GPUs when it applies,
XLA otherwise) and the blocks built on it: the autoencoder's single-head AttnBlock, the UNet's
multi-head AttentionBlock, CrossAttention and the SpatialTransformer."""
from __future__ import annotations

import functools
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.layers import Dtype, conv, fourier_features, group_norm, pixel_centres

logger = logging.getLogger("ldm_jax")

# A module's `attention_impl`: 'auto' (cuDNN where it applies, else XLA), 'xla', or 'cudnn'
# (asked for explicitly: a fall-back to XLA is a warning). None is 'auto'.
IMPLEMENTATIONS = ("auto", "xla", "cudnn")
_HALF = (jnp.bfloat16, jnp.float16)


@functools.lru_cache(maxsize=None)
def _say_once(level: int, message: str):
  """Logs each distinct message once per process (a model traces its attention many times)."""
  logger.log(level, message)


def cudnn_unfit_reason(q, k, backend: str | None = None) -> str | None:
  """Why cuDNN's flash kernel cannot compute attention of these (B, L, heads, head_dim) arrays,
  or None when it can: an NVIDIA GPU, bfloat16/float16 compute, a head dim that is a multiple
  of 8 up to 128 (256 from Hopper on; 128 is what every GPU takes)."""
  backend = backend or jax.default_backend()
  if backend != "gpu":
    return f"the backend is {backend}, not an NVIDIA GPU"
  if q.dtype not in _HALF or k.dtype not in _HALF:
    return (f"it computes in {q.dtype} and the kernel needs bfloat16 or float16 "
            f"(train.compute_dtype)")
  head_dim = q.shape[-1]
  if head_dim % 8 or head_dim > 128:
    return f"the head dim is {head_dim}; the kernel needs a multiple of 8 up to 128"
  return None


def mask_to_lengths(mask):
  """(B,) int32 key lengths of a (B, Lk) padding mask: True for the first n keys of each row.

  cuDNN takes padding as lengths, not masks; a mask with holes (True after a False) is not a
  padding mask and would be read as its count of True keys."""
  return jnp.sum(mask.astype(jnp.int32), axis=-1)


def _softmax_weighted(q, k, v, mask):
  """softmax(q k^T * scale) v over (..., Lq, d) / (..., Lk, d) arrays with any leading dims;
  `mask` (..., Lk) bool or None. Logits and softmax in float32; the normalisation divides the
  (..., Lq, d) output, not the (..., Lq, Lk) weights (the same numbers, Lk / d times fewer
  divisions forward and backward). A row whose keys are all masked out gives zeros."""
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("...qd,...kd->...qk", q, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(mask[..., None, :], logits, -jnp.inf)
  peak = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
  weights = jnp.exp(logits - peak)
  total = jnp.sum(weights, axis=-1, keepdims=True)
  out = jnp.einsum("...qk,...kd->...qd", weights.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return (out / jnp.where(total > 0, total, 1.0)).astype(v.dtype)


def slices_per_group(slices: int, lq: int, lk: int, budget_bytes: int) -> int:
  """The largest divisor of `slices` whose float32 (Lq, Lk) logits fit in `budget_bytes`
  together (at least 1)."""
  fit = max(1, budget_bytes // (4 * lq * lk))
  return max((d for d in range(1, min(fit, slices) + 1) if slices % d == 0), default=1)


def xla_attention(q, k, v, mask=None, block_bytes: int | None = None):
  """Attention of (B, L, heads, head_dim) arrays in plain XLA ops, heads-major inside.

  With `block_bytes` (what the CPU gets, see `attention`) the (batch x head) slices are computed
  a group at a time by lax.map, each group's float32 logits within `block_bytes`: on a CPU the
  (B, heads, Lq, Lk) weights of one big batched matmul spill out of the caches, and this
  made forward + backward 4.5x faster at 8 x 1024 x 8 x 32 (benchmarks/RESULTS.md). Each group
  is rematerialised in the backward pass (jax.checkpoint), as flash attention does: otherwise
  lax.map's VJP stacks every group's weights into one (B x heads, Lq, Lk) residual again, and
  recomputing them took fwd+bwd to 0.64-0.96x the time. Without `block_bytes` (accelerators)
  every slice is one batched computation."""
  b, lq, heads, d = q.shape
  lk = k.shape[1]
  qt, kt, vt = (jnp.transpose(a, (0, 2, 1, 3)) for a in (q, k, v))      # (B, heads, L, d)
  mt = None if mask is None else jnp.broadcast_to(mask[:, None, :], (b, heads, lk))
  if block_bytes is None:
    out = _softmax_weighted(qt, kt, vt, mt)
  else:
    n = slices_per_group(b * heads, lq, lk, block_bytes)
    group = lambda a: a.reshape((b * heads // n, n) + a.shape[2:])  # noqa: E731
    operands = (group(qt), group(kt), group(vt), None if mt is None else group(mt))
    one_group = jax.checkpoint(lambda xs: _softmax_weighted(*xs), prevent_cse=False)  # in a scan
    out = jax.lax.map(one_group, operands).reshape(b, heads, lq, d)
  return jnp.transpose(out, (0, 2, 1, 3))


# On a CPU, each lax.map group of attention slices keeps its float32 logits within this many
# bytes (about an L2 cache: at 256 tokens 1 MiB groups beat 256 KiB and 4 MiB ones,
# benchmarks/RESULTS.md).
CPU_BLOCK_BYTES = 1 << 20


def _cudnn_attention(q, k, v, mask):
  """cuDNN's flash kernel; a padding mask goes in as key lengths (the kernel takes no mask)."""
  if mask is None:
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
  return jax.nn.dot_product_attention(
      q, k, v, query_seq_lengths=jnp.full((q.shape[0],), q.shape[1], jnp.int32),
      key_value_seq_lengths=mask_to_lengths(mask), implementation="cudnn")


def attention(q, k, v, mask=None, implementation: str | None = None):
  """Scaled dot-product attention of (B, L, heads, head_dim) arrays.

  `mask` is (B, Lk) bool, True where a key may be attended to (a padding mask: the valid keys
  come first). `implementation` (IMPLEMENTATIONS; None = 'auto') picks cuDNN's fused kernel when
  `cudnn_unfit_reason` finds nothing against it and XLA otherwise, saying once which it chose
  and why; 'cudnn' that cannot run falls back to XLA with a warning."""
  implementation = implementation or "auto"
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention_impl: expected one of {IMPLEMENTATIONS}, got {implementation!r}")
  block = CPU_BLOCK_BYTES if jax.default_backend() == "cpu" else None
  if implementation == "xla":
    return xla_attention(q, k, v, mask, block)
  reason = cudnn_unfit_reason(q, k)
  if reason is None:
    try:
      out = _cudnn_attention(q, k, v, mask)
      _say_once(logging.INFO, f"attention (head dim {q.shape[-1]}): cuDNN flash attention")
      return out
    except (NotImplementedError, RuntimeError, ValueError, TypeError) as e:
      reason = f"the kernel refused it: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
  level = logging.WARNING if implementation == "cudnn" else logging.INFO
  _say_once(level, f"attention: XLA, not cuDNN's flash kernel, because {reason}")
  return xla_attention(q, k, v, mask, block)


class AttnBlock(nn.Module):
  """The autoencoder's single-head self-attention over all pixels, with 1x1 conv projections."""
  dtype: Dtype = jnp.float32
  attention_impl: str | None = "auto"
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
  attention_impl: str | None = "auto"
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
  attention_impl: str | None = "auto"

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
  attention_impl: str | None = "auto"

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
  Its GroupNorm epsilon is 1e-6 in both reference layouts, whatever the UNet's norm_eps.
  `coords` adds a learned projection of the Fourier features of each pixel's centre (x, y) in
  [0, 1] of the map to its token after proj_in (a positional embedding, not in the paper): a
  query then says where it is, and can match a layout box's corner features."""
  heads: int
  head_dim: int
  depth: int = 1
  dropout: float = 0.0
  use_linear: bool = False
  dtype: Dtype = jnp.float32
  attention_impl: str | None = "auto"
  norm_groups: int = 32
  coords: bool = False

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
    if self.coords:
      y = y + nn.Dense(inner, dtype=self.dtype, param_dtype=jnp.float32,
                       name="coord_features")(fourier_features(pixel_centres(h, w)))[None]
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

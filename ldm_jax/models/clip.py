"""The CLIP text transformer (Radford et al. 2021) that conditions Stable Diffusion.

SD 1.x reads OpenAI's CLIP ViT-L/14 text tower (quick-GELU, the last layer's output); SD 2.x
reads OpenCLIP's ViT-H/14 text tower (exact GELU, the penultimate layer's output). Both are the
same pre-LayerNorm transformer: token + learned position embeddings, causal self-attention
layers, a final LayerNorm applied to whichever layer's hidden state is used. Nothing is padded
out: SD attends over all `max_length` tokens, padding included, as the released models did.

Parameter names follow transformers' CLIPTextModel (token_embedding, layers_i/self_attn/q_proj,
final_layer_norm, ...), so ldm_jax/interop/clip.py maps weights by renaming only.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.layers import Dtype

ACTIVATIONS = ("quick_gelu", "gelu")
LAYERS = ("last", "penultimate")


def quick_gelu(x):
  """OpenAI CLIP's GELU approximation x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def _activation(name: str):
  if name == "quick_gelu":
    return quick_gelu
  if name == "gelu":   # transformers' 'gelu' is the exact (erf) form
    return lambda x: jax.nn.gelu(x, approximate=False)
  raise ValueError(f"CLIP hidden_act: expected one of {ACTIVATIONS}, got {name!r}")


class CLIPLayer(nn.Module):
  """One pre-LayerNorm layer: causal multi-head self-attention, then a 2-layer MLP."""
  width: int
  heads: int
  intermediate: int
  activation: str = "quick_gelu"
  eps: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, length, _ = x.shape
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=jnp.float32,  # noqa: E731
                                     name=name)
    norm = lambda name: nn.LayerNorm(epsilon=self.eps, dtype=jnp.float32, name=name)  # noqa: E731
    h = norm("layer_norm1")(x).astype(self.dtype)
    d = self.width // self.heads
    split = lambda a: a.reshape(b, length, self.heads, d)  # noqa: E731
    q, k, v = (split(dense(self.width, f"self_attn_{n}_proj")(h)) for n in "qkv")
    a = jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, length, self.width)
    x = x + dense(self.width, "self_attn_out_proj")(a).astype(x.dtype)
    h = norm("layer_norm2")(x).astype(self.dtype)
    h = _activation(self.activation)(dense(self.intermediate, "mlp_fc1")(h))
    return x + dense(self.width, "mlp_fc2")(h).astype(x.dtype)


class CLIPTextEncoder(nn.Module):
  """Token ids (B, L) -> the context (B, L, width) Stable Diffusion's UNet cross-attends to.

  `layer`: 'last' runs every layer; 'penultimate' stops one layer short (SD 2.x; diffusers'
  clip_skip=1), so the last layer is never run and has no parameters. Either way the final
  LayerNorm is applied. `return_hidden` also returns the hidden states before the final norm
  after each layer run (index 0: the embeddings), as transformers' output_hidden_states.
  """
  vocab_size: int = 49408
  max_length: int = 77
  width: int = 768
  layers: int = 12
  heads: int = 12
  intermediate: int = 3072
  activation: str = "quick_gelu"
  layer: str = "last"
  eps: float = 1e-5
  dtype: Dtype = jnp.float32

  @property
  def layers_run(self) -> int:
    if self.layer not in LAYERS:
      raise ValueError(f"CLIP layer: expected one of {LAYERS}, got {self.layer!r}")
    return self.layers - (1 if self.layer == "penultimate" else 0)

  @nn.compact
  def __call__(self, tokens, return_hidden: bool = False):
    length = tokens.shape[1]
    if length > self.max_length:
      raise ValueError(f"CLIP text encoder: {length} tokens exceed its {self.max_length} "
                       f"positions")
    x = nn.Embed(self.vocab_size, self.width, param_dtype=jnp.float32,
                 name="token_embedding")(tokens)
    pos = nn.Embed(self.max_length, self.width, param_dtype=jnp.float32,
                   name="position_embedding")(jnp.arange(length)[None])
    x = (x + pos).astype(jnp.float32)
    hidden = [x]
    for i in range(self.layers_run):
      x = CLIPLayer(self.width, self.heads, self.intermediate, self.activation, self.eps,
                    self.dtype, name=f"layers_{i}")(x)
      hidden.append(x)
    out = nn.LayerNorm(epsilon=self.eps, dtype=jnp.float32, name="final_layer_norm")(x)
    return (out, hidden) if return_hidden else out

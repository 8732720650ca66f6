"""Conditioning encoders tau_theta: class labels, text and layouts to a cross-attention context,
and the spatial rescaler for concatenated conditions.

Every encoder takes a `drop` mask (B,) bool: dropped examples get the null condition, which is
how classifier-free guidance is trained (condition dropout) and sampled (the unconditional half
of the batch). The null condition is a learned embedding ('learned') or zeros ('zeros').
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.errors import ConfigError
from ldm_jax.models.attention import CrossAttention
from ldm_jax.models.layers import Dtype, fourier_features


def _where(drop, null, value):
  if drop is None:
    return value
  return jnp.where(drop.reshape((-1,) + (1,) * (value.ndim - 1)), null, value)


class ClassEmbedder(nn.Module):
  """Class labels (B,) -> one context token (B, 1, embed_dim). With null='learned' the table
  has one extra row, index num_classes, for the unconditional label (as in cin256-v2)."""
  num_classes: int
  embed_dim: int
  null: str = "learned"

  @nn.compact
  def __call__(self, labels, drop=None):
    rows = self.num_classes + (1 if self.null == "learned" else 0)
    table = nn.Embed(rows, self.embed_dim, param_dtype=jnp.float32, name="embedding")
    emb = table(labels)[:, None, :]
    if drop is None:
      return emb
    null = (table(jnp.full_like(labels, self.num_classes))[:, None, :]
            if self.null == "learned" else jnp.zeros_like(emb))
    return _where(drop, null, emb)


def grid_fourier_features(tokens, offset: int, grid: int, frequencies: int = 6):
  """Fixed Fourier features of the (x, y) a layout corner token stands for (ids offset ..
  offset + grid^2 - 1, row-major), zeros for other tokens: (B, L, 4 * frequencies)."""
  index = tokens - offset
  is_corner = (index >= 0) & (index < grid * grid)
  index = jnp.clip(index, 0, grid * grid - 1)
  xy = jnp.stack([index % grid, index // grid], -1).astype(jnp.float32) / max(grid - 1, 1)
  return jnp.where(is_corner[..., None], fourier_features(xy, frequencies), 0.0)


def object_features(tokens, corner_feats):
  """Per token of a layout (start, then class, corner, corner per box): the class token id of
  the box it belongs to (0 for the start token and padding) and the Fourier features of that
  box's two corners (zeros likewise): (B, L) ids and (B, L, 2 * corner_feats' width)."""
  b, length = tokens.shape
  n = (length - 1) // 3
  width = corner_feats.shape[-1]
  ids = jnp.repeat(tokens[:, 1:1 + 3 * n:3], 3, axis=1)                  # (B, 3N)
  box = corner_feats[:, 1:1 + 3 * n].reshape(b, n, 3, width)[:, :, 1:].reshape(b, n, 2 * width)
  box = jnp.repeat(box, 3, axis=1)                                       # (B, 3N, 2W)
  around = (1, length - 1 - 3 * n)     # the start token before, unpaired tokens after
  return jnp.pad(ids, ((0, 0), around)), jnp.pad(box, ((0, 0), around, (0, 0)))


class TextTransformer(nn.Module):
  """Token ids (B, L) -> context (B, L, width) and its mask (B, L): token + learned position
  embeddings, pre-LayerNorm transformer layers attending to non-padding tokens, final LayerNorm
  (the paper's jointly trained text encoder). Padding is token id `pad_id`.

  For layouts (`corner_grid` > 0), corner tokens (ids from `corner_offset`) also get a learned
  projection of fixed Fourier features of their coordinates (as GLIGEN encodes boxes): nearby
  corners start out with similar embeddings instead of unrelated ones. With `bind_objects`,
  every token of a box also gets a learned embedding of the box's class and a projection of
  both its corners' features (GLIGEN's grounding token, on each of the paper's three tokens):
  a token then says which digit goes where without the transformer having to pair them."""
  vocab_size: int
  max_length: int = 77
  width: int = 512
  depth: int = 8
  heads: int = 8
  pad_id: int = 0
  null: str = "learned"
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  corner_grid: int = 0
  corner_offset: int = 0
  bind_objects: bool = False

  @nn.compact
  def __call__(self, tokens, drop=None, train: bool = False):
    b, length = tokens.shape
    if length > self.max_length:
      raise ValueError(f"text: {length} tokens exceed cond.text_max_length={self.max_length}")
    mask = tokens != self.pad_id
    x = nn.Embed(self.vocab_size, self.width, param_dtype=jnp.float32, name="token_embedding")(
        tokens)
    if self.corner_grid:
      corners = grid_fourier_features(tokens, self.corner_offset, self.corner_grid)
      x = x + nn.Dense(self.width, param_dtype=jnp.float32, name="corner_features")(corners)
      if self.bind_objects:
        ids, box = object_features(tokens, corners)
        x = x + nn.Embed(self.corner_offset, self.width, param_dtype=jnp.float32,
                         name="object_class")(ids) * (ids != self.pad_id)[..., None]
        x = x + nn.Dense(self.width, use_bias=False, param_dtype=jnp.float32,
                         name="object_box")(box)
    pos = self.param("position_embedding", nn.initializers.normal(0.01),
                     (self.max_length, self.width))
    x = (x + pos[:length]).astype(self.dtype)
    norm = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, name=name)  # noqa: E731
    for i in range(self.depth):
      h = norm(f"layers_{i}_norm1")(x).astype(self.dtype)
      x = x + CrossAttention(self.heads, self.width // self.heads, self.dropout, self.dtype,
                             name=f"layers_{i}_attn")(h, h, mask, train)
      h = norm(f"layers_{i}_norm2")(x).astype(self.dtype)
      h = nn.Dense(4 * self.width, dtype=self.dtype, param_dtype=jnp.float32,
                   name=f"layers_{i}_fc1")(h)
      h = nn.Dense(self.width, dtype=self.dtype, param_dtype=jnp.float32,
                   name=f"layers_{i}_fc2")(jax.nn.gelu(h))
      x = x + nn.Dropout(self.dropout, deterministic=not train)(h)
    context = norm("final_norm")(x)
    if self.null == "learned":
      null = self.param("null_context", nn.initializers.normal(0.02),
                        (self.max_length, self.width))[None, :length]
    else:
      null = jnp.zeros((1, length, self.width), context.dtype)
    if drop is None:
      return context, mask
    context = _where(drop, jnp.broadcast_to(null, context.shape), context)
    mask = _where(drop, jnp.ones_like(mask), mask)
    return context, mask


def layout_vocab_size(num_classes: int, grid: int) -> int:
  """Token ids of a layout: 0 padding, 1 start, 2..1+C classes, then grid*grid positions."""
  return 2 + num_classes + grid * grid


def layout_tokens(boxes, box_classes, num_classes: int, grid: int):
  """Boxes (B, N, 4) [x0, y0, x1, y1] in [0, 1] with classes (B, N) (-1 = padding) -> token
  ids (B, 1 + 3N): a start token, then per object its class token and the tokens of its
  top-left and bottom-right corners quantised on a grid x grid lattice (as the paper's layout
  model: class, then the two corners). Padding objects become padding tokens (id 0), so the
  transformer and the cross-attention ignore them."""
  b, n = box_classes.shape
  corner = lambda x, y: (2 + num_classes + jnp.round(y * (grid - 1)).astype(jnp.int32) * grid  # noqa: E731
                         + jnp.round(x * (grid - 1)).astype(jnp.int32))
  xy = jnp.clip(boxes, 0.0, 1.0)
  per_object = jnp.stack([2 + jnp.clip(box_classes, 0, num_classes - 1),
                          corner(xy[..., 0], xy[..., 1]), corner(xy[..., 2], xy[..., 3])], -1)
  per_object = jnp.where((box_classes >= 0)[..., None], per_object, 0)
  return jnp.concatenate([jnp.ones((b, 1), jnp.int32),
                          per_object.reshape(b, 3 * n).astype(jnp.int32)], axis=1)


class SpatialRescaler(nn.Module):
  """Resizes a spatial condition by `multiplier` n_stages times (bilinear), then optionally
  maps its channels with a 1x1 conv (no bias): semantic maps to the latent grid. `antialias`
  filters when downsampling (jax.image.resize's default); without it a bilinear halving is
  torch's F.interpolate(mode='bilinear', align_corners=False), the reference's."""
  n_stages: int = 1
  multiplier: float = 0.5
  out_channels: int = 0
  method: str = "bilinear"
  antialias: bool = False

  @nn.compact
  def __call__(self, x):
    x = x.astype(jnp.float32)
    for _ in range(self.n_stages):
      b, h, w, c = x.shape
      x = jax.image.resize(x, (b, round(h * self.multiplier), round(w * self.multiplier), c),
                           self.method, antialias=self.antialias)
    if self.out_channels:
      x = nn.Conv(self.out_channels, (1, 1), use_bias=False, name="channel_mapper")(x)
    return x


def check_conditioning_config(config) -> None:
  """Raises ConfigError when `config.cond` cannot build its encoders or lacks the data fields
  they read (captions, semantic maps). Checks that need the loaded first stage live elsewhere."""
  cond, data = config.cond, config.data
  if cond.embed_dim <= 0:
    raise ConfigError(f"cond.embed_dim: must be positive, got {cond.embed_dim}")
  context = cond.context if cond.type == "hybrid" else cond.type
  if context == "layout":
    if cond.num_classes <= 0:
      raise ConfigError("cond.num_classes: layout conditioning needs the number of object "
                        "classes (box files' 'class' values are 0..num_classes-1)")
    if data.source == "tfds" and not data.get("boxes_key", ""):
      raise ConfigError("data.boxes_key: layout conditioning needs the boxes' tfds feature "
                        "(coco/2017: 'objects/bbox', with data.box_classes_key='objects/label')")
    if cond.get("layout_grid", 32) < 2:
      raise ConfigError(f"cond.layout_grid: needs at least 2 positions per side, got "
                        f"{cond.layout_grid}")
  if context in ("text", "layout") and (cond.text_heads <= 0 or cond.embed_dim % cond.text_heads):
    raise ConfigError(f"cond.text_heads ({cond.text_heads}) must divide cond.embed_dim "
                      f"({cond.embed_dim})")
  clip = cond.get("text_encoder", "transformer") == "clip"
  if clip and context != "text":
    raise ConfigError(f"cond.text_encoder='clip': only text conditioning reads a CLIP encoder "
                      f"(cond.type is '{cond.type}')")
  if cond.get("clip_precompute", False) and not clip:
    raise ConfigError("cond.clip_precompute: only a frozen CLIP text encoder's contexts can be "
                      "precomputed (cond.text_encoder='clip')")
  if clip and (cond.text_tokenizer != "clip" or not cond.clip_weights):
    raise ConfigError("cond.text_encoder='clip' needs cond.text_tokenizer='clip' with "
                      "cond.text_vocab (the tokenizer folder) and cond.clip_weights (a Stable "
                      "Diffusion folder or export)")
  if cond.text_tokenizer == "clip" and not clip and context == "text":
    raise ConfigError("cond.text_tokenizer='clip' is CLIP's tokenizer, for "
                      "cond.text_encoder='clip'")
  if context == "text":
    if cond.text_tokenizer == "vocab" and not cond.text_vocab:
      raise ConfigError("cond.text_vocab: text conditioning with text_tokenizer='vocab' needs "
                        "a vocab.txt or tokenizer.json path (or set text_tokenizer='train')")
    if data.source == "tfds" and not data.caption_key:
      raise ConfigError("data.caption_key: text conditioning needs the captions' tfds feature")
  if cond.type in ("concat", "hybrid") and cond.concat == "segmentation":
    if cond.seg_classes <= 0:
      raise ConfigError("cond.seg_classes: segmentation conditioning needs the class count")
    if cond.get("rescaler_channels", 0) < 0:
      raise ConfigError(f"cond.rescaler_channels: expected 0 (the one-hot map as it is) or a "
                        f"channel count, got {cond.rescaler_channels}")
    if data.source == "tfds" and not data.segmentation_key:
      raise ConfigError("data.segmentation_key: segmentation conditioning needs the semantic "
                        "maps' tfds feature")
  if not 0.0 <= cond.p_uncond < 1.0:
    raise ConfigError(f"cond.p_uncond: expected a probability in [0, 1), got {cond.p_uncond}")
  coverage = tuple(cond.get("mask_coverage", (0.1, 0.5)))
  if len(coverage) != 2 or not 0.0 < coverage[0] <= coverage[1] <= 1.0:
    raise ConfigError(f"cond.mask_coverage: expected (low, high) with 0 < low <= high <= 1, "
                      f"got {coverage}")
  if cond.type == "none" and config.sample.guidance_scale != 1.0:
    raise ConfigError(f"sample.guidance_scale ({config.sample.guidance_scale}): cond.type="
                      f"'none' has no null condition to guide against; set it to 1")

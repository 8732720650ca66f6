"""The conditioning model of an LDM: batches -> the UNet's conditioning inputs.

Routed by `config.cond` (see ldm_jax/data/conditions.py for the host-side half):

  none     eps(z_t, t)
  class    eps(z_t, t, context = ClassEmbedder(y))            (cross-attention)
  adm      eps(z_t, t, y)                                    (added to the time embedding)
  text     eps(z_t, t, context = TextTransformer(tokens))     (cross-attention, padding masked)
           or, cond.text_encoder='clip', a frozen CLIP encoder   (Stable Diffusion: no mask)
  layout   eps(z_t, t, context = TextTransformer(layout_tokens(boxes, box_classes)))
  concat   eps([z_t, c], t)                                  (c on the latent grid)
  hybrid   eps([z_t, c], t, context)                          (both)

A `drop` mask (B,) swaps examples' conditions for the null condition: condition dropout in
training, and the unconditional half of classifier-free guidance in sampling.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ldm_jax.data.conditions import concat_kind, context_kind
from ldm_jax.errors import ConfigError
from ldm_jax.first_stage import FirstStage
from ldm_jax.models.clip import CLIPTextEncoder
from ldm_jax.models.conditioning import (ClassEmbedder, SpatialRescaler, TextTransformer,
                                         layout_tokens, layout_vocab_size)

NO_CONDITION = {"context": None, "context_mask": None, "y": None, "concat": None}


def batch_size(batch) -> int:
  return int(next(iter(jax.tree_util.tree_leaves(batch))).shape[0])


def check_conditioning(config, first: FirstStage, num_classes: int):
  """Cross-field checks that need the loaded first stage and the class count."""
  c = config.cond
  if concat_kind(c) == "segmentation":
    size = config.data.image_size
    latent = size // first.downsample_factor
    rescaled = size // 2 ** c.rescaler_stages
    if rescaled != latent:
      stages = first.downsample_factor.bit_length() - 1
      raise ConfigError(f"cond.rescaler_stages: {c.rescaler_stages} halvings take the "
                        f"{size}px map to {rescaled}px, but the first stage's latents are "
                        f"{latent}px (f={first.downsample_factor}); set "
                        f"cond.rescaler_stages={stages}")
  if (context_kind(c) == "class" or c.type == "adm") and num_classes <= 0:
    raise ConfigError(f"cond.num_classes: cond.type='{c.type}' needs class labels, but the "
                      f"training data has none; set cond.num_classes or use labelled data")
  if c.type == "adm" and c.null == "zeros" and c.p_uncond > 0:
    raise ConfigError("cond.null: 'zeros' has no null label for cond.type='adm' (it would be "
                      "class 0); use cond.null='learned' or cond.p_uncond=0")


def clip_encoder(cond_config, fields: dict | None, dtype) -> CLIPTextEncoder:
  """The frozen CLIP text encoder of cond.text_encoder='clip', from its architecture `fields`
  (read off its weights when they were loaded)."""
  c = cond_config
  if not fields:
    raise ConfigError("cond.text_encoder='clip': the CLIP text encoder's architecture is "
                      "unknown (load it from cond.clip_weights first)")
  if fields["width"] != c.embed_dim or fields["max_length"] != c.text_max_length:
    raise ConfigError(f"cond.embed_dim / cond.text_max_length ({c.embed_dim} / "
                      f"{c.text_max_length}) must equal the CLIP text encoder's width and "
                      f"positions ({fields['width']} / {fields['max_length']})")
  return CLIPTextEncoder(**{k: v for k, v in fields.items() if k != "layer"},
                         layer=c.get("clip_layer", fields.get("layer", "last")), dtype=dtype)


class Conditioner:
  """The conditioning encoders of a config, and the UNet inputs of a batch."""

  def __init__(self, config, first: FirstStage, vocab_size: int, num_classes: int,
               dtype=jnp.float32, clip_fields: dict | None = None, null_tokens=None):
    c = config.cond
    self.config, self.first, self.num_classes = config, first, num_classes
    self.context, self.concat = context_kind(c), concat_kind(c)
    self.adm = c.type == "adm"
    self.null = c.null
    self.class_embedder = self.text = self.rescaler = self.clip = None
    if self.context == "class":
      self.class_embedder = ClassEmbedder(num_classes, c.embed_dim, c.null)
    elif self.context == "text" and c.get("text_encoder", "transformer") == "clip":
      self.clip = clip_encoder(c, clip_fields, dtype)
      self.null_tokens = jnp.asarray(null_tokens, jnp.int32)
    elif self.context in ("text", "layout"):
      corners = {}
      if self.context == "layout":
        self.layout_grid = c.get("layout_grid", 32)
        vocab_size = layout_vocab_size(num_classes, self.layout_grid)
        corners = {"corner_grid": self.layout_grid, "corner_offset": 2 + num_classes,
                   "bind_objects": c.get("layout_bind_objects", False)}
      self.text = TextTransformer(vocab_size, self.context_length(), c.embed_dim, c.text_depth,
                                  c.text_heads, null=c.null, dropout=config.unet.dropout,
                                  dtype=dtype, **corners)
    if self.concat == "segmentation":   # (configs from before the fields: no mapper, antialias)
      self.rescaler = SpatialRescaler(c.rescaler_stages, 0.5,
                                      out_channels=c.get("rescaler_channels", 0),
                                      antialias=c.get("rescaler_antialias", True))
    self.inpaint_compvis = c.get("inpaint_convention", "ldm_jax") == "compvis"
    # adm with a learned null uses one extra label row (index num_classes), like the embedder.
    self.adm_classes = num_classes + (1 if c.null == "learned" else 0) if self.adm else 0

  @property
  def conditional(self) -> bool:
    """Whether the model has a condition (and so a null condition for guidance)."""
    return bool(self.context or self.adm or self.concat)

  @property
  def concat_channels(self) -> int:
    if self.concat == "lowres":
      return self.first.channels
    if self.concat == "inpaint":
      return self.first.latent_channels + 1
    if self.concat == "segmentation":
      return self.rescaler.out_channels or self.config.cond.seg_classes
    return 0

  def context_length(self) -> int:
    if self.context == "layout":
      return 1 + 3 * self.config.data.max_boxes
    return 1 if self.context == "class" else self.config.cond.text_max_length

  def tokens(self, batch):
    """The transformer's token ids: the caption's, or a layout's (start, then class and two
    corner tokens per box)."""
    if self.context == "layout":
      return layout_tokens(batch["boxes"], batch["box_classes"], self.num_classes,
                           self.layout_grid)
    return batch["tokens"]

  def clip_context(self, clip_params, batch, drop):
    """The frozen CLIP encoder's context of the batch's captions; a latent cache's stored
    contexts (cond.clip_precompute) are used as they are, only the null prompt is encoded."""
    if "context" not in batch:
      return self.clip.apply({"params": clip_params}, self.clip_tokens(batch, drop))
    context = batch["context"].astype(jnp.float32)
    null = self.clip.apply({"params": clip_params}, self.null_tokens[None])
    return jnp.where(drop[:, None, None], null.astype(jnp.float32), context)

  def clip_tokens(self, batch, drop):
    """The caption tokens, or for dropped examples the null prompt's: batch['null_tokens']
    (negative prompts) when given, else the empty prompt's (Stable Diffusion's null)."""
    tokens = batch["tokens"]
    null = batch.get("null_tokens")
    null = jnp.broadcast_to(self.null_tokens if null is None else null, tokens.shape)
    return jnp.where(drop[:, None], null, tokens)

  def init(self, rng, batch) -> dict:
    """The trained conditioning parameters (a frozen CLIP encoder has none here: its weights
    are loaded, never initialised)."""
    params = {}
    drop = jnp.zeros((batch_size(batch),), bool)
    if self.class_embedder is not None:
      params["class"] = self.class_embedder.init(rng, batch["label"], drop)["params"]
    if self.text is not None:
      params["text"] = self.text.init(rng, self.tokens(batch), drop)["params"]
    if self.rescaler is not None and self.rescaler.out_channels:
      side = 2 ** self.rescaler.n_stages   # the 1x1 conv's kernel needs only the channels
      onehot = jnp.zeros((1, side, side, self.config.cond.seg_classes))
      params["rescaler"] = self.rescaler.init(rng, onehot)["params"]
    return params

  def __call__(self, params, batch, frozen_ae, drop, scale, train: bool = False, rng=None):
    """-> dict(context, context_mask, y, concat) for the UNet. Latent-space concat conditions
    are built here (inpainting encodes the masked image with the frozen autoencoder)."""
    out = dict(NO_CONDITION)
    if self.class_embedder is not None:
      out["context"] = self.class_embedder.apply({"params": params["class"]}, batch["label"],
                                                 drop)
    if self.clip is not None:   # frozen: its params ride in params['cond']['clip']
      out["context"] = self.clip_context(params["clip"], batch, drop)
    if self.text is not None:
      rngs = {"dropout": rng} if train and rng is not None else None
      out["context"], out["context_mask"] = self.text.apply(
          {"params": params["text"]}, self.tokens(batch), drop, train, rngs=rngs)
    if self.adm:
      null_label = self.num_classes if self.null == "learned" else 0
      out["y"] = jnp.where(drop, null_label, batch["label"])
    if self.concat:
      c = self.concat_input(batch, frozen_ae, scale, params)
      out["concat"] = jnp.where(drop[:, None, None, None], 0.0, c)
    return out

  def concat_input(self, batch, frozen_ae, scale, params=None):
    f = self.first.downsample_factor
    if self.concat == "lowres":
      return batch["lowres"].astype(jnp.float32)
    if self.concat == "inpaint":
      mask = batch["mask"].astype(jnp.float32)
      if self.inpaint_compvis:   # cond.inpaint_convention='compvis' (CompVis' inpaint script)
        masked = (batch["image"] + 1.0) * (1.0 - mask) - 1.0
        z = self.first.latent(frozen_ae, masked, None)
        return jnp.concatenate([z, mask[:, ::f, ::f] * 2.0 - 1.0], axis=-1)
      masked = batch["image"] * (1.0 - mask)
      z = self.first.latent(frozen_ae, masked, None) * scale
      b, h, w, _ = mask.shape
      small = jax.image.resize(mask, (b, h // f, w // f, 1), "nearest")
      return jnp.concatenate([z, small], axis=-1)
    if self.concat == "segmentation":
      onehot = jax.nn.one_hot(batch["segmentation"], self.config.cond.seg_classes)
      mapper = {"params": params["rescaler"]} if self.rescaler.out_channels else {}
      return self.rescaler.apply(mapper, onehot)
    raise ValueError(self.concat)

  def dummy_inputs(self, b: int, latent_size: int) -> dict:
    """Zero UNet conditioning inputs of the right shapes (for init)."""
    out = dict(NO_CONDITION)
    if self.context:
      out["context"] = jnp.zeros((b, self.context_length(), self.config.cond.embed_dim))
    if self.adm:
      out["y"] = jnp.zeros((b,), jnp.int32)
    if self.concat:
      out["concat"] = jnp.zeros((b, latent_size, latent_size, self.concat_channels))
    return out

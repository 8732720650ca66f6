"""What each conditioning route needs from an example, prepared on the host.

A route is the pair (context, concat) of a `config.cond` section:

  context  'class' -> label            'text' -> tokens (caption through the tokenizer)
           'layout' -> boxes + box_classes, moved with the image's crop and flip (tokenised on
                      the device, models/conditioning.layout_tokens)
  concat   'lowres' -> the image degraded to the latent grid (super-resolution; bicubic or the
                      BSR-style chain of cond.degradation, ldm_jax/data/degradations.py)
           'inpaint' -> a random mask (the masked image is encoded on the device)
           'segmentation' -> the integer map, cropped and flipped WITH its image

Spatial conditions are derived from (or cropped together with) the image after augmentation, so
image and condition always show the same pixels. Entries of a latent cache carry the conditions
computed from the cached (centre-cropped) image; a random flip flips latent and conditions
together. Inpainting cannot use a cache: its condition is a fresh encoding of a masked image.
"""
from __future__ import annotations

import numpy as np

from ldm_jax.data import degradations
from ldm_jax.data import masks as masks_lib
from ldm_jax.data.preprocess import image_example_fn
from ldm_jax.errors import ConfigError

# Spatial conditions a latent-cache entry stores next to its latent, per concat route.
CACHED_CONDITIONS = {"lowres": ("lowres",), "segmentation": ("segmentation",)}


def context_kind(cond_config) -> str:
  """'class', 'text', 'layout' or '': what feeds the cross-attention."""
  if cond_config.type in ("class", "text", "layout"):
    return cond_config.type
  if cond_config.type == "hybrid":
    return cond_config.context
  return ""


def concat_kind(cond_config) -> str:
  """'lowres', 'inpaint', 'segmentation' or '': the spatial condition concatenated to z_t."""
  return cond_config.concat if cond_config.type in ("concat", "hybrid") else ""


def caches_context(cond_config) -> bool:
  """Whether a latent cache stores caption tokens and their frozen CLIP context."""
  return (context_kind(cond_config) == "text" and cond_config.get("clip_precompute", False)
          and cond_config.get("text_encoder", "transformer") == "clip")


def cached_conditions(cond_config) -> str:
  """What a latent cache stores besides latents and labels (part of its fingerprint)."""
  concat = concat_kind(cond_config)
  if caches_context(cond_config):
    return f"{concat}+clip_context:{cond_config.clip_layer}"
  return f"{concat}+boxes" if context_kind(cond_config) == "layout" else concat


def needs_labels(cond_config) -> bool:
  return context_kind(cond_config) == "class" or cond_config.type == "adm"


def degradation(cond_config) -> str:
  """cond.degradation ('bicubic' for configs written before the field existed)."""
  return cond_config.get("degradation", "bicubic")


def check_cacheable(cond_config):
  """Refuses routes whose condition cannot come from a latent cache (named fields)."""
  if concat_kind(cond_config) == "inpaint":
    raise ConfigError("first_stage.precompute_latents: cond.concat='inpaint' encodes a freshly "
                      "masked image every step, which a latent cache cannot hold; set "
                      "first_stage.precompute_latents=False")
  if concat_kind(cond_config) == "lowres" and degradation(cond_config) == "bsr":
    raise ConfigError("first_stage.precompute_latents: cond.degradation='bsr' draws a new "
                      "degradation of every image at every step, which a latent cache cannot "
                      "hold; set first_stage.precompute_latents=False (or "
                      "cond.degradation='bicubic')")


def spatial_conditions(cond_config, image: np.ndarray, latent_size: int,
                       rng: np.random.Generator) -> dict:
  """Conditions computed from an (augmented) image: the degraded low-resolution input for
  'lowres' (drawn from `rng` for 'bsr')."""
  if concat_kind(cond_config) == "lowres":
    return {"lowres": degradations.degrade(degradation(cond_config), image, latent_size, rng)}
  return {}


def _flip(out: dict, keys) -> dict:
  for key in keys:
    if key in out:
      out[key] = np.ascontiguousarray(out[key][:, ::-1])
  if "boxes" in out:   # [x0, y0, x1, y1] in [0, 1] -> [1 - x1, y0, 1 - x0, y1]; padding stays
    b = out["boxes"]
    flipped = np.stack([1.0 - b[:, 2], b[:, 1], 1.0 - b[:, 0], b[:, 3]], axis=-1)
    out["boxes"] = np.where((out["box_classes"] >= 0)[:, None], flipped, b).astype(np.float32)
  return out


def cached_example(example: dict, rng: np.random.Generator, *, flip: bool) -> dict:
  """A latent-cache entry -> a training example; a flip flips latent and conditions alike."""
  out = {"latent": np.asarray(example["latent"])}   # 16-bit stays so: the step converts
  for key in ("lowres", "segmentation", "boxes", "box_classes", "tokens", "context"):
    if key in example:
      out[key] = np.asarray(example[key])
  if flip and rng.random() < 0.5:
    _flip(out, ("latent", "lowres", "segmentation"))
  if "label" in example:
    out["label"] = np.int32(example["label"])
  return out


def route_example_fn(config, *, train: bool, latent_size: int, tokenizer=None):
  """fn(raw example, rng) -> the batch entry of `config`'s route: image (or cached latent),
  label, tokens, and the spatial condition, each aligned with the image it belongs to."""
  c = config.cond
  image_fn = image_example_fn(config.data, train)
  concat = concat_kind(c)
  layout = context_kind(c) == "layout"
  size = config.data.image_size

  def fn(example, rng):
    if "latent" in example:
      out = cached_example(example, rng, flip=train and config.data.random_flip)
    else:
      if concat == "segmentation" and "segmentation" not in example:
        raise ConfigError("cond.concat='segmentation': the training examples have no "
                          "segmentation map (set data.segmentation_key for tfds, "
                          "data.segmentation_dir for an image folder)")
      out = image_fn(example, rng)   # crops and flips a segmentation map with its image
      out.update(spatial_conditions(c, out["image"], latent_size, rng))
    if concat != "segmentation":
      out.pop("segmentation", None)
    if layout and "boxes" not in out:
      raise ConfigError("cond.type='layout': the training examples have no boxes (an image "
                        "folder with name.json box files beside the images)")
    if layout and out["box_classes"].max() >= c.num_classes:
      raise ConfigError(f"cond.num_classes: a box file names class "
                        f"{int(out['box_classes'].max())}, but the model has {c.num_classes} "
                        f"object classes (0..{c.num_classes - 1})")
    if not layout:
      for key in ("boxes", "box_classes"):
        out.pop(key, None)
    if tokenizer is not None and "tokens" not in out:   # (a cache may hold them)
      out["tokens"] = tokenizer.encode([example.get("caption", "")])[0]
    if concat == "inpaint":   # the folder's own mask (data.mask_dir), else a random one
      mask = out.pop("mask", None)
      coverage = tuple(c.get("mask_coverage", masks_lib.DEFAULT_COVERAGE))
      out["mask"] = (masks_lib.random_mask(rng, size, size, coverage) if mask is None
                     else np.asarray(mask, np.float32).reshape(size, size, 1))
    else:
      out.pop("mask", None)
    return out

  return fn


def cache_example_fn(config, *, latent_size: int, tokenizer=None):
  """fn(raw example, rng) -> the centre-cropped image plus the spatial conditions the route
  stores in a latent cache (see CACHED_CONDITIONS), and the caption's tokens when the cache
  holds CLIP contexts (cond.clip_precompute; the cache's encoder turns them into contexts)."""
  image_fn = image_example_fn(config.data, train=False)
  concat = concat_kind(config.cond)
  boxes = ("boxes", "box_classes") if context_kind(config.cond) == "layout" else ()
  tokens = caches_context(config.cond)

  def fn(example, rng):
    out = image_fn(example, rng)
    out.update(spatial_conditions(config.cond, out["image"], latent_size, rng))
    if tokens:
      out["tokens"] = tokenizer.encode([example.get("caption", "")])[0]
    keep = {"image", "label", *CACHED_CONDITIONS.get(concat, ()), *boxes,
            *(("tokens",) if tokens else ())}
    return {k: v for k, v in out.items() if k in keep}   # no masks or boxes nobody reads

  return fn

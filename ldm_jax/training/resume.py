"""Resuming a run with a changed config: which changes stop it and which go on with a warning.

The config saved in the checkpoint being resumed is compared with the one given now. A change to
what the parameters are or mean (architecture, conditioning, diffusion process, first stage,
image size) cannot resume and stops with one line naming the fields; anything else (optimizer,
learning-rate schedule, logging, data order, mesh) goes on with a warning naming them.
"""
from __future__ import annotations

import fnmatch
import json
import logging

from ldm_jax.config import flatten_tree
from ldm_jax.errors import ConfigError

logger = logging.getLogger("ldm_jax")

# Fields (glob patterns over dotted paths) whose change makes the checkpoint another model.
ARCHITECTURE_FIELDS = (
    "stage", "data.image_size", "data.channels",
    # stage 1
    "model.*", "disc.num_layers", "disc.base_channels", "disc.norm",
    # stage 2
    "first_stage.checkpoint", "first_stage.use_ema", "unet.*", "cond.*",
    "diffusion.timesteps", "diffusion.beta_schedule", "diffusion.linear_start",
    "diffusion.linear_end", "diffusion.cosine_s", "diffusion.parameterization",
    "diffusion.scale_factor", "diffusion.scale_by_std",
)
# Exceptions to the patterns above: they change how the model runs, not what it is.
RUNTIME_FIELDS = ("model.remat", "model.dropout", "unet.remat", "unet.attention_impl",
                  "unet.dropout", "cond.p_uncond", "unet.init_from")
# Fields the new config may lack in old checkpoints' configs (added since), with the value the
# old code behaved as.
ADDED_FIELDS = {"model.norm_groups": 32, "model.mid_attention": True,
                "unet.norm_groups": 32, "unet.norm_eps": 1e-5,
                "data.workers": -1, "data.on_bad_image": "error", "data.index_dir": "",
                "data.rebuild_index": False, "data.mask_dir": "", "data.segmentation_dir": "",
                "data.max_boxes": 16, "mesh.shard_frozen": True,
                "cond.degradation": "bicubic", "cond.mask_coverage": [0.1, 0.5],
                "cond.layout_grid": 32, "cond.rescaler_channels": 0,
                "cond.rescaler_antialias": True, "cond.inpaint_convention": "ldm_jax",
                "data.boxes_key": "", "data.box_classes_key": "", "unet.coord_channels": False,
                "unet.attention_coords": False, "cond.layout_bind_objects": False,
                "cond.text_encoder": "transformer", "cond.clip_weights": "",
                "cond.clip_layer": "last", "unet.init_from": ""}
# Architecture fields that shape one concat route only: for a model on another route a change
# to them changes nothing (an old text model resumes without cond.rescaler_antialias=True).
ROUTE_FIELDS = {"cond.rescaler_channels": "segmentation", "cond.rescaler_antialias": "segmentation",
                "cond.inpaint_convention": "inpaint"}
# Fields old checkpoints' configs may hold that no longer exist (data.num_threads: grain's
# data.workers replaced the thread pool).
REMOVED_FIELDS = ("data.num_threads",)


def is_architecture(path: str) -> bool:
  if path in RUNTIME_FIELDS:
    return False
  return any(fnmatch.fnmatchcase(path, pattern) for pattern in ARCHITECTURE_FIELDS)


def _concat_route(config) -> str:
  cond = config.get("cond") or {}   # (stage-1 configs have none)
  return cond["concat"] if cond.get("type") in ("concat", "hybrid") else ""


def changed_fields(saved: dict, current) -> dict[str, tuple]:
  """{path: (saved value, current value)} of every field that differs (JSON-normalised)."""
  if hasattr(current, "to_json_best_effort"):
    current = json.loads(current.to_json_best_effort())
  now = flatten_tree(current)
  then = flatten_tree(saved)
  out = {}
  for path in sorted((set(now) | set(then)) - set(REMOVED_FIELDS)):
    old = then.get(path, ADDED_FIELDS.get(path))
    new = now.get(path)
    if old != new:
      out[path] = (old, new)
  return out


def check_resume_config(saved: dict | None, current, where: str):
  """Raises ConfigError for architecture changes; logs a warning for the other changes."""
  if not saved:
    return
  changes = changed_fields(saved, current)
  route = _concat_route(current)
  arch = {k: v for k, v in changes.items()
          if is_architecture(k) and ROUTE_FIELDS.get(k, route) == route}
  if arch:
    listed = "; ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in list(arch.items())[:3])
    more = f" (+{len(arch) - 3} more)" if len(arch) > 3 else ""
    raise ConfigError(f"{listed}{more}: the checkpoint in {where} was trained with the old "
                      f"value and cannot resume as a different model; restore the field(s) or "
                      f"use a new workdir")
  if changes:
    listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
    logger.warning("resuming with a changed config: %s", listed)

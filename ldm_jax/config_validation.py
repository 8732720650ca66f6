"""Start-up validation of a config against the schema in ldm_jax/config.py.

Two layers, so a bad config fails before any work starts with one line naming the field:
  * the type layer: unknown fields (with a suggestion), missing fields, wrong types, values
    outside a field's choices;
  * consistency: the generic checks below (batch vs grad_accum, data source, mesh), then the
    checks each stage's modules own (models/build.py, models/conditioning.py,
    diffusion/schedules.py), which read the fields they turn into modules.
The schema is passed in (`ldm_jax.config.validate` does that), so this module does not import
the schema and the modules it calls never see it.
"""
from __future__ import annotations

import difflib
from typing import Any, Mapping

import ml_collections

from ldm_jax.diffusion.schedules import check_sampling_config
from ldm_jax.errors import ConfigError
from ldm_jax.models.build import check_autoencoder_config, check_unet_config
from ldm_jax.models.conditioning import check_conditioning_config


def validate(config: ml_collections.ConfigDict, known: Mapping[str, Any]):
  """Checks `config` against `known` (dotted path -> schema Field of its stage) and its own
  consistency; returns it. Raises ConfigError with a one-line message naming the field."""
  check_types(config, known)
  check_common(config)
  for check in STAGE_CHECKS[config.stage]:
    check(config)
  return config


def _leaves(config, prefix="") -> dict[str, Any]:
  out = {}
  for key, value in config.items():
    path = f"{prefix}{key}"
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      out.update(_leaves(value, path + "."))
    else:
      out[path] = value
  return out


def _type_ok(value, default) -> bool:
  if isinstance(default, bool):
    return isinstance(value, bool)
  if isinstance(default, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(default, str):
    return isinstance(value, str)
  if isinstance(default, (tuple, list)):
    return isinstance(value, (tuple, list))
  return True


def check_types(config, known: Mapping[str, Any]) -> None:
  """Every field is known (else a suggestion), present, of its default's type and in its
  choices."""
  stage = config.stage
  for path, value in _leaves(config).items():
    if path not in known:
      close = difflib.get_close_matches(path, list(known), n=1)
      hint = f" (did you mean '{close[0]}'?)" if close else ""
      raise ConfigError(f"unknown config field '{path}' for stage '{stage}'{hint}")
    field = known[path]
    if not _type_ok(value, field.default):
      raise ConfigError(f"{path}: expected {type(field.default).__name__}, got "
                        f"{type(value).__name__} {value!r}")
    if field.choices is not None and value not in field.choices:
      raise ConfigError(f"{path}: expected one of {list(field.choices)}, got {value!r}")
  for path in known:
    node = config
    for part in path.split("."):
      if part not in node:
        raise ConfigError(f"missing config field '{path}' (start configs from "
                          f"ldm_jax.config.defaults('{stage}'))")
      node = node[part]


def _positive(config, *paths):
  for path in paths:
    value = config
    for part in path.split("."):
      value = value[part]
    if value <= 0:
      raise ConfigError(f"{path}: must be positive, got {value}")


def check_common(config) -> None:
  """Fields of both stages: training loop, data source and device mesh."""
  _positive(config, "train.batch_size", "train.grad_accum", "train.num_steps", "train.lr",
            "data.image_size", "train.log_every", "train.ckpt_every", "train.keep_checkpoints",
            "data.prefetch")
  t, d = config.train, config.data
  if d.workers < -1:
    raise ConfigError(f"data.workers: expected -1 (automatic), 0 (threads in the training "
                      f"process) or a number of worker processes, got {d.workers}")
  if t.batch_size % t.grad_accum:
    raise ConfigError(f"train.batch_size ({t.batch_size}) must be divisible by "
                      f"train.grad_accum ({t.grad_accum})")
  if d.source in ("image_folder", "mnist") and not d.path:
    raise ConfigError(f"data.path: required for data.source='{d.source}'")
  if d.source == "tfds" and not d.tfds_name:
    raise ConfigError("data.tfds_name: required for data.source='tfds'")
  if config.mesh.fsdp < 1:
    raise ConfigError(f"mesh.fsdp: must be >= 1, got {config.mesh.fsdp}")
  if config.mesh.data < 1 and config.mesh.data != -1:
    raise ConfigError(f"mesh.data: must be >= 1 or -1 (all remaining devices), got "
                      f"{config.mesh.data}")
  for rule in config.mesh.rules:
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise ConfigError(f"mesh.rules: each rule must be (regex, axes), got {rule!r}")


def check_first_stage(config) -> None:
  """Stage 2's `first_stage` fields that need no loaded autoencoder."""
  fs, cond = config.first_stage, config.cond
  if not fs.checkpoint:
    raise ConfigError("first_stage.checkpoint: required (a stage-1 workdir or an export)")
  if (fs.precompute_latents and cond.type in ("concat", "hybrid")
      and cond.concat == "inpaint"):
    raise ConfigError("first_stage.precompute_latents: inpainting encodes a freshly masked "
                      "image every step; train it with on-the-fly encoding (set it False)")
  if cond.get("clip_precompute", False) and not fs.precompute_latents:
    raise ConfigError("cond.clip_precompute: CLIP contexts are stored in the latent cache; set "
                      "first_stage.precompute_latents=True too (or clip_precompute=False)")


# The consistency checks of each stage, in the order they run.
STAGE_CHECKS = {
    "autoencoder": (check_autoencoder_config,),
    "ldm": (check_first_stage, check_unet_config, check_conditioning_config,
            check_sampling_config),
}

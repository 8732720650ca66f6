"""Orbax checkpoints of training runs: async saves, resume onto any mesh, clear errors.

A training checkpoint is a Composite of the train state (as a nested dict, so it restores into
any mesh's shardings) and JSON metadata (data-iterator position, config, stage facts).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

import flax
import jax
import orbax.checkpoint as ocp

from ldm_jax import fileio
from ldm_jax.errors import CheckpointError  # noqa: F401  (re-exported)
from ldm_jax.parallel.sharding import path_str

logger = logging.getLogger("ldm_jax")




def _flat_shapes(tree) -> dict[str, tuple]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {path_str(p): tuple(getattr(leaf, "shape", ())) for p, leaf in flat}


def check_compatible(saved: dict[str, tuple], wanted: dict[str, tuple], where: str):
  """Raises CheckpointError listing missing/unexpected arrays and shape mismatches."""
  order = lambda keys: sorted(keys, key=lambda k: (not k.startswith("params/"), k))  # noqa
  missing = order(set(wanted) - set(saved))
  unexpected = order(set(saved) - set(wanted))
  shapes = [f"{k}: checkpoint {saved[k]} vs model {wanted[k]}"
            for k in order(set(saved) & set(wanted)) if saved[k] != wanted[k]]
  problems = []
  if missing:
    problems.append(f"missing in checkpoint: {', '.join(missing[:3])}"
                    + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""))
  if unexpected:
    problems.append(f"not in this model: {', '.join(unexpected[:3])}"
                    + (f" (+{len(unexpected) - 3} more)" if len(unexpected) > 3 else ""))
  if shapes:
    problems.append("shape mismatch: " + "; ".join(shapes[:3])
                    + (f" (+{len(shapes) - 3} more)" if len(shapes) > 3 else ""))
  if problems:
    raise CheckpointError(f"{where} does not match this config: " + " | ".join(problems))


class Checkpointer:
  """An Orbax CheckpointManager over `directory` with the project's error handling."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    self.directory = os.path.abspath(directory)
    if read_only and not os.path.isdir(self.directory):
      raise CheckpointError(f"checkpoint folder '{self.directory}' does not exist")
    if read_only:
      options = ocp.CheckpointManagerOptions(read_only=True, create=False, max_to_keep=None,
                                             save_interval_steps=0)
    else:
      options = ocp.CheckpointManagerOptions(max_to_keep=keep,
                                             enable_async_checkpointing=async_save)
    # Named handlers let a fresh manager read what an earlier process wrote (metadata included).
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, meta: dict[str, Any], force: bool = False) -> bool:
    args = ocp.args.Composite(state=ocp.args.StandardSave(flax.serialization.to_state_dict(state)),
                              meta=ocp.args.JsonSave(meta))
    return self.manager.save(int(step), args=args, force=force)

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(int(step))

  def _where(self, step):
    return f"checkpoint '{os.path.join(self.directory, str(step))}'"

  def read_meta(self, step: int | None = None) -> dict[str, Any]:
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in '{self.directory}'")
    try:
      return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
          "meta"]
    except Exception as e:
      raise CheckpointError(f"{self._where(step)} has unreadable metadata "
                            f"({type(e).__name__}: {_first_line(e)})") from e

  def restore(self, abstract_state, step: int | None = None):
    """Restores (state, meta) into the shardings of `abstract_state` (ShapeDtypeStructs)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in '{self.directory}'")
    target = flax.serialization.to_state_dict(abstract_state)
    try:
      metadata = self.manager.item_metadata(step)["state"]
      saved_tree = getattr(metadata, "tree", metadata)
    except Exception as e:
      raise CheckpointError(f"{self._where(step)} is unreadable ({type(e).__name__}: "
                            f"{_first_line(e)}); delete that folder to resume from an earlier "
                            f"step {self._earlier(step)}") from e
    if saved_tree is None:
      raise CheckpointError(f"{self._where(step)} has no state metadata; it is corrupt or was "
                            f"not written by ldm_jax")
    check_compatible(_flat_shapes(saved_tree), _flat_shapes(target), self._where(step))
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    except Exception as e:
      raise CheckpointError(f"{self._where(step)} is corrupt or unreadable ({type(e).__name__}: "
                            f"{_first_line(e)}); delete that folder to resume from an earlier "
                            f"step {self._earlier(step)}") from e
    state = flax.serialization.from_state_dict(abstract_state, restored["state"])
    return state, restored["meta"]

  def saved_shapes(self, step: int | None = None) -> dict[str, tuple]:
    """'params/unet/...' -> shape of every array of a checkpoint, read from its metadata."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in '{self.directory}'")
    try:
      return _flat_shapes(getattr(self.manager.item_metadata(step)["state"], "tree", None))
    except Exception as e:
      raise CheckpointError(f"{self._where(step)} is unreadable ({type(e).__name__}: "
                            f"{_first_line(e)})") from e

  def restore_subtree(self, target: dict, step: int | None = None) -> dict:
    """Restores only the arrays of `target` (a nested dict of ShapeDtypeStructs with shardings
    whose paths exist in the saved state, e.g. {'ema_params': ...}); the rest is not read."""
    step = self.latest_step() if step is None else step
    saved = self.saved_shapes(step)
    wanted = _flat_shapes(target)
    check_compatible({k: v for k, v in saved.items() if k in wanted}, wanted, self._where(step))
    restore_args = jax.tree_util.tree_map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding),
                                          target)
    try:
      return ocp.PyTreeCheckpointer().restore(
          os.path.join(self.directory, str(step), "state"),
          args=ocp.args.PyTreeRestore(target, restore_args=restore_args, partial_restore=True))
    except Exception as e:
      raise CheckpointError(f"{self._where(step)} is corrupt or unreadable ({type(e).__name__}: "
                            f"{_first_line(e)})") from e

  def _earlier(self, step):
    earlier = [s for s in self.all_steps() if s < step]
    return f"(available: {earlier})" if earlier else "(there is none)"

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return text.splitlines()[0][:300] if text else ""


# ---------------------------------------------------------------------------------------------
# Inference exports: the weights a sampler needs, without optimizer state or training data.
# ---------------------------------------------------------------------------------------------
INFERENCE_FORMAT = "ldm_jax.inference"
# 2 records the first stage's identity ('first_stage'); version-1 exports load unchanged.
INFERENCE_VERSION = 2


def is_inference_export(directory: str) -> bool:
  """Whether `directory` holds a complete export (meta.json, written last, names the format)."""
  try:
    with open(os.path.join(directory, "meta.json"), encoding="utf-8") as f:
      return json.load(f).get("format") == INFERENCE_FORMAT
  except (OSError, ValueError, AttributeError):
    return False


def save_inference(directory: str, variables: dict, *, config, meta: dict,
                   extra_files: dict[str, str] | None = None):
  """Writes an inference export: params/ (Orbax), config.json, extra files, then meta.json.

  `variables` maps component names ('unet', 'autoencoder', 'cond') to their Flax variables.
  `extra_files` maps names inside the export to files to copy (a tokenizer, for example).
  Every file is written atomically and meta.json last, so it marks a complete export: a folder
  with params/ but no meta.json holds an interrupted export, which a rerun replaces.
  """
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  directory = os.path.abspath(directory)
  if is_inference_export(directory):
    raise CheckpointError(f"export folder '{directory}' already holds an export; choose another "
                          f"--out or delete it")
  params = os.path.join(directory, "params")
  if jax.process_index() == 0 and os.path.isdir(directory):
    partial = [name for name in os.listdir(directory)
               if name == "params" or name.startswith("params.orbax-checkpoint-tmp-")]
    if partial:
      logger.warning("'%s' holds an interrupted export (params/ but no meta.json): replacing it",
                     directory)
      for name in partial:
        shutil.rmtree(os.path.join(directory, name))
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("ldm_jax export start")
  os.makedirs(directory, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(params, variables)
  checkpointer.wait_until_finished()
  for name, source in (extra_files or {}).items():
    with fileio.atomic_path(os.path.join(directory, name)) as tmp:
      shutil.copyfile(source, tmp)
  if jax.process_index() == 0:
    fileio.atomic_write_text(
        os.path.join(directory, "config.json"),
        config.to_json_best_effort(indent=2) if hasattr(config, "to_json_best_effort")
        else json.dumps(config, indent=2))
    full = {"format": INFERENCE_FORMAT, "version": INFERENCE_VERSION,
            "components": sorted(variables), **meta}
    fileio.atomic_write_text(os.path.join(directory, "meta.json"), json.dumps(full, indent=2))
  return directory


def read_inference_meta(directory: str) -> tuple[dict, dict]:
  """(meta, config dict) of an export, with clear errors for a folder that is not one."""
  path = os.path.join(directory, "meta.json")
  try:
    with open(path, encoding="utf-8") as f:
      meta = json.load(f)
    with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
      config = json.load(f)
  except FileNotFoundError as e:
    if not os.path.exists(path) and os.path.isdir(os.path.join(directory, "params")):
      raise CheckpointError(f"'{directory}' holds an interrupted export (params/ but no "
                            f"meta.json); rerun the export to replace it") from e
    raise CheckpointError(f"'{directory}' is not an ldm_jax inference export (missing "
                          f"{os.path.basename(e.filename)})") from e
  except ValueError as e:
    raise CheckpointError(f"'{path}' is not valid JSON: {e}") from e
  if meta.get("format") != INFERENCE_FORMAT:
    raise CheckpointError(f"'{directory}' is not an ldm_jax inference export (meta.json format "
                          f"{meta.get('format')!r})")
  if meta.get("version", 0) > INFERENCE_VERSION:
    raise CheckpointError(f"'{directory}' was written by a newer ldm_jax (export version "
                          f"{meta['version']} > {INFERENCE_VERSION}); upgrade ldm_jax")
  return meta, config


def load_inference(directory: str, components=None, sharding_fn=None):
  """Loads (variables, meta, config dict) of an export.

  `components` restricts the load to some components ('autoencoder' alone for a frozen first
  stage). `sharding_fn(tree_of_ShapeDtypeStruct) -> tree of shardings` places the arrays (on
  one device when None).
  """
  meta, config = read_inference_meta(directory)
  params_dir = os.path.join(os.path.abspath(directory), "params")
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    metadata = checkpointer.metadata(params_dir)
    tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", None)
    if tree is None:
      tree = metadata.item_metadata
  except Exception as e:
    raise CheckpointError(f"export '{directory}' has unreadable params ({type(e).__name__}: "
                          f"{_first_line(e)})") from e
  wanted = set(components) if components else set(tree)
  missing = wanted - set(tree)
  if missing:
    raise CheckpointError(f"export '{directory}' has no {sorted(missing)} (it holds "
                          f"{sorted(tree)})")
  abstract = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype),
      {k: tree[k] for k in wanted})
  if sharding_fn is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree_util.tree_map(lambda _: device, abstract)
  else:
    shardings = sharding_fn(abstract)
  target = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                                    sharding=s),
                                  abstract, shardings)
  restore_args = jax.tree_util.tree_map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding),
                                        target)
  try:
    variables = checkpointer.restore(params_dir, args=ocp.args.PyTreeRestore(
        target, restore_args=restore_args, partial_restore=True))
  except Exception as e:
    raise CheckpointError(f"export '{directory}' is corrupt or unreadable ({type(e).__name__}: "
                          f"{_first_line(e)})") from e
  return variables, meta, config

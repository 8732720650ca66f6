"""Orbax checkpoints of training runs: async saves, resume onto any mesh, clear errors.

A training checkpoint is a Composite of the train state (as a nested dict, so it restores into
any mesh's shardings) and JSON metadata (data-iterator position, config, stage facts).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any

import flax
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

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


# Orbax writes a step into '<step>.orbax-checkpoint-tmp...' and renames the folder to '<step>'
# only once every host has finished it; a killed save leaves the temporary folder behind.
TMP_MARK = ".orbax-checkpoint-tmp"
# A step folder that cannot be read is renamed '<step>.damaged-<time>' (never deleted).
DAMAGED_MARK = ".damaged-"


class _Unreadable(CheckpointError):
  """A step folder that exists but cannot be read (a truncated, missing or garbled file)."""

  def __init__(self, message: str, problem: str):
    super().__init__(message)
    self.problem = problem  # the message without its advice: '<checkpoint> is unreadable (...)'


class _QuietOrbaxErrors(logging.Filter):
  """Drops Orbax's logged tracebacks (a failed background save logs one from its thread): the
  Checkpointer re-raises each failure as one CheckpointError line whose cause keeps the
  traceback for --verbose."""

  def filter(self, record):
    return not (record.levelno >= logging.ERROR and record.exc_info
                and f"{os.sep}orbax{os.sep}" in record.pathname)


_QUIET = _QuietOrbaxErrors()


class Checkpointer:
  """An Orbax CheckpointManager over `directory` with the project's error handling.

  Opened for writing, it removes the temporary folders of interrupted saves (on process 0),
  falls back past damaged steps on resume (restore_latest / readable_step), and turns a failed
  background save into one CheckpointError at the next save, check() or wait().
  """

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    self.directory = os.path.abspath(directory)
    self.read_only = read_only
    if read_only and not os.path.isdir(self.directory):
      raise CheckpointError(f"checkpoint folder '{self.directory}' does not exist")
    if read_only:
      options = ocp.CheckpointManagerOptions(read_only=True, create=False, max_to_keep=None,
                                             save_interval_steps=0)
    else:
      options = ocp.CheckpointManagerOptions(max_to_keep=keep,
                                             enable_async_checkpointing=async_save)
      if jax.process_index() == 0:
        self._remove_temporary_folders()
    absl_logger = logging.getLogger("absl")
    if _QUIET not in absl_logger.filters:
      absl_logger.addFilter(_QUIET)
    # Named handlers let a fresh manager read what an earlier process wrote (metadata included).
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    self._pending: int | None = None  # the step of a background save not yet known complete

  def _remove_temporary_folders(self):
    """Removes what killed saves left: incomplete by definition, and in the way of a new save
    of the same step."""
    if not os.path.isdir(self.directory):
      return
    for name in sorted(os.listdir(self.directory)):
      if TMP_MARK in name:
        path = os.path.join(self.directory, name)
        logger.warning("removing '%s': the incomplete checkpoint of an interrupted save", path)
        if os.path.isdir(path) and not os.path.islink(path):
          shutil.rmtree(path, ignore_errors=True)
        else:
          os.remove(path)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  # -- saving ----------------------------------------------------------------------------------
  def save(self, step: int, state, meta: dict[str, Any], force: bool = False) -> bool:
    """Starts saving `step` (in the background when async); a failure of the previous
    background save is raised first, as a CheckpointError naming that step."""
    self.wait()
    args = ocp.args.Composite(state=ocp.args.StandardSave(flax.serialization.to_state_dict(state)),
                              meta=ocp.args.JsonSave(meta))
    try:
      saved = self.manager.save(int(step), args=args, force=force)
    except Exception as e:
      raise self._save_error(int(step), e) from e
    if saved:
      self._pending = int(step)
    return saved

  def check(self):
    """Raises the failure of a finished background save now; never waits for one running."""
    if self._pending is not None and not self.manager.is_saving_in_progress():
      self.wait()

  def wait(self):
    """Waits for the background save; its failure becomes one CheckpointError line."""
    step, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise self._save_error(step, e) from e

  def _save_error(self, step: int | None, e: Exception) -> CheckpointError:
    try:
      self.manager.reload()
      earlier = [s for s in self.all_steps() if step is None or s < step]
    except Exception:  # pylint: disable=broad-except
      earlier = []
    last = f"step {earlier[-1]}" if earlier else "none"
    return CheckpointError(
        f"saving {self._where(step)} failed ({_cause(e)}); the last complete checkpoint is "
        f"{last}. Free disk space (or raise the file size limit) in '{self.directory}' and run "
        f"the same command again to resume")

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(int(step))

  def _where(self, step):
    return f"checkpoint '{os.path.join(self.directory, str(step))}'"

  # -- reading ---------------------------------------------------------------------------------
  def read_meta(self, step: int | None = None) -> dict[str, Any]:
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in '{self.directory}'")
    try:
      return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
          "meta"]
    except Exception as e:
      problem = f"{self._where(step)} has unreadable metadata ({_cause(e)})"
      raise _Unreadable(problem, problem) from e

  def _state_tree(self, step: int):
    """The saved state's tree of array metadata (shapes, dtypes), read without the arrays."""
    try:
      metadata = self.manager.item_metadata(step)["state"]
      tree = getattr(metadata, "tree", metadata)
    except Exception as e:
      problem = f"{self._where(step)} is unreadable ({_cause(e)})"
      raise _Unreadable(f"{problem}; delete that folder to resume from an earlier step "
                        f"{self._earlier(step)}", problem) from e
    if tree is None:
      problem = f"{self._where(step)} has no state metadata"
      raise _Unreadable(f"{problem}; it is corrupt or was not written by ldm_jax", problem)
    return tree

  def restore(self, abstract_state, step: int | None = None):
    """Restores (state, meta) into the shardings of `abstract_state` (ShapeDtypeStructs)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in '{self.directory}'")
    target = flax.serialization.to_state_dict(abstract_state)
    saved_tree = self._state_tree(step)
    check_compatible(_flat_shapes(saved_tree), _flat_shapes(target), self._where(step))
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    except Exception as e:
      problem = f"{self._where(step)} is corrupt or unreadable ({_cause(e)})"
      raise _Unreadable(f"{problem}; delete that folder to resume from an earlier step "
                        f"{self._earlier(step)}", problem) from e
    state = flax.serialization.from_state_dict(abstract_state, restored["state"])
    return state, restored["meta"]

  def readable_step(self) -> int | None:
    """The newest step whose metadata reads (None when there is no checkpoint); newer damaged
    steps are moved aside with a warning. See _newest_readable."""
    return self._newest_readable(lambda step: (self.read_meta(step), self._state_tree(step)))[0]

  def restore_latest(self, abstract_state):
    """(step, state, meta) of the newest step that restores completely, as restore(); newer
    damaged steps are moved aside with a warning. None when there is no checkpoint."""
    step, out = self._newest_readable(lambda s: self.restore(abstract_state, s))
    return None if step is None else (step, *out)

  def _newest_readable(self, read):
    """Tries read(step) from the newest step down, past steps that cannot be read.

    The damaged steps newer than the first readable one are renamed '<step>.damaged-<time>' (by
    process 0; Orbax then no longer lists them), so the run continues from a complete step.
    When no step reads, nothing is moved and one CheckpointError names the newest problem. A
    checkpoint that reads but does not fit the model is not damage: its error is raised as is.
    """
    damaged = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        out = read(step)
      except _Unreadable as e:
        damaged.append((step, e))
        continue
      if damaged:
        self._move_aside(damaged, step)
      return step, out
    if not damaged:
      return None, None
    newest = damaged[0][1].problem
    others = ([f"and so {'is' if len(damaged) == 2 else 'are'} every earlier step "
               f"({', '.join(str(s) for s, _ in damaged[1:])})"] if len(damaged) > 1 else [])
    raise CheckpointError(" ".join([newest] + others) + f"; no checkpoint in '{self.directory}' "
                          f"is readable. Restore them from a backup, or move the folder aside "
                          f"to start over")

  def _move_aside(self, damaged, fallback: int):
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for step, error in damaged:
      source = os.path.join(self.directory, str(step))
      target = f"{source}{DAMAGED_MARK}{stamp}"
      logger.warning("%s; moved it to '%s' and resuming from step %d", error.problem, target,
                     fallback)
      if jax.process_index() == 0 and os.path.isdir(source):
        os.rename(source, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("ldm_jax_checkpoint_moved_aside")
    self.manager.reload()

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

  def close(self):
    """Waits for the background save, then stops Orbax's worker threads, also when that save
    failed (left running, they print tracebacks at interpreter exit under the error line). A
    failure already raised by save/check/wait is not raised again."""
    try:
      if self._pending is not None:
        self.wait()
    finally:
      try:
        self.manager.close()
      except Exception as e:  # pylint: disable=broad-except
        logger.debug("closing the checkpoint manager of '%s': %s", self.directory, e)


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return text.splitlines()[0][:300] if text else ""


def _cause(e: BaseException) -> str:
  """'Type: first line' of an error, or of the OS error inside it ('No space left on device')."""
  seen, inner = set(), e
  while inner is not None and id(inner) not in seen:
    seen.add(id(inner))
    if isinstance(inner, OSError) and inner.strerror:
      where = f" ('{inner.filename}')" if inner.filename else ""
      return f"{type(inner).__name__}: {inner.strerror}{where}"
    inner = inner.__cause__ or inner.__context__
  return f"{type(e).__name__}: {_first_line(e)}"


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
  for name, source in (extra_files or {}).items():   # names may hold a folder: tokenizer/x
    os.makedirs(os.path.dirname(os.path.join(directory, name)), exist_ok=True)
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

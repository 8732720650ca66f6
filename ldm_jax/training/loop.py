"""The training loop both stages share: data -> sharded batch -> jitted step -> metrics and
checkpoints, with automatic resume, preemption handling and divergence checks."""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import config as config_lib
from ldm_jax import fileio, locks
from ldm_jax.checkpoint import Checkpointer
from ldm_jax.compilation import run_once_options
from ldm_jax.data.pipeline import (DevicePrefetch, InputPipeline, default_workers,
                                   eval_batches, to_global)
from ldm_jax.data.preprocess import model_inputs
from ldm_jax.data.sources import open_source
from ldm_jax.errors import BadImageError, CheckpointError, DataError, Preempted, TrainingDiverged
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.parallel import sharding as sharding_lib
from ldm_jax.training import reporting
from ldm_jax.training.fid import TrainingFid
from ldm_jax.training.resume import check_resume_config
from ldm_jax.training.stage1 import AutoencoderStage
from ldm_jax.training.stage2 import LatentDiffusionStage
from ldm_jax.training.stages import all_finite

logger = logging.getLogger("ldm_jax")

# Version of the metadata saved with every training checkpoint: 2 adds 'format' and 'model'
# (the stage's describe(): class count, tokenizer, pinned first stage). Version-1 checkpoints
# (no 'format') still resume: their facts are re-derived as before.
CHECKPOINT_FORMAT = 2




class _PreemptionFlag:
  """Set by SIGTERM (and SIGINT once); the loop then saves and stops cleanly.

  Installed before the first step and restored only once the final save is complete, so a
  repeated SIGTERM (schedulers often send several) is logged and ignored rather than killing
  the save; a second Ctrl-C still stops at once.
  """

  def __init__(self):
    self.raised = False
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handler)

  def _handler(self, signum, frame):
    del frame
    if self.raised and signum == signal.SIGINT:  # a second Ctrl-C stops at once
      raise KeyboardInterrupt
    if self.raised:
      logger.warning("received signal %d again: already saving a checkpoint; ignored", signum)
      return
    logger.warning("received signal %d: saving a checkpoint and stopping", signum)
    self.raised = True

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _abstract_batch(local_batch, sharding):
  n = jax.process_count()
  return {k: jax.ShapeDtypeStruct((v.shape[0] * n,) + v.shape[1:], v.dtype, sharding=sharding)
          for k, v in local_batch.items()}


def _with_shardings(abstract, shardings):
  return jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _mean_metrics(history: list[dict]) -> dict[str, float]:
  keys = history[0].keys()
  return {k: float(np.mean([h[k] for h in history])) for k in keys}


# Flags in a step's metrics (1.0 = fine): checked at every flush and before every save, never
# logged. The loop adds 'state_finite' after every step (Trainer.finite_fn). It covers every
# gradient too: a non-finite gradient reaches the optimizer state (Adam's moments) in its step.
_FINITE_FLAGS = {"state_finite": "the updated parameters, optimizer state or EMA are not finite"}


def _check_finite(step_metrics: list[tuple[int, dict]], last_saved: int | None, workdir: str):
  """Raises TrainingDiverged at the first step whose metrics, gradients or updated state are
  not finite; the loop calls it before saving, so a non-finite state is never saved."""
  for step, metrics in step_metrics:
    problems = [f"{key} = {float(value)}" for key, value in metrics.items()
                if key not in _FINITE_FLAGS and not math.isfinite(float(value))]
    problems += [text for key, text in _FINITE_FLAGS.items()
                 if key in metrics and not float(metrics[key]) == 1.0]
    if problems:
      saved = (f"the last good checkpoint is step {last_saved}" if last_saved is not None
               else "no checkpoint was written")
      raise TrainingDiverged(
          f"training diverged: {problems[0]} at step {step}; {saved} in "
          f"{workdir}/checkpoints and nothing later was saved. Lower train.lr, set "
          f"train.grad_clip, or check the data")


def _logged(metrics: dict) -> dict:
  return {k: v for k, v in metrics.items() if k not in _FINITE_FLAGS}


class Trainer:
  """Holds a run's mesh, stage, data, state and checkpointer; `train()` runs it."""

  def __init__(self, config, workdir: str, devices=None):
    self.config = config_lib.validate(config)
    self.workdir = os.path.abspath(workdir)
    os.makedirs(self.workdir, exist_ok=True)
    # One run per workdir (process 0 locks it): close() releases the lock, as does a failed set-up.
    self._lock = locks.lock_folder(self.workdir, "training run", jax.process_index() == 0)
    try:
      self._set_up(config, devices)
    except BaseException:
      self._lock.release()
      raise

  def _set_up(self, config, devices):
    self.mesh = mesh_lib.create_mesh(config.mesh, devices)
    n_shards = mesh_lib.num_batch_shards(self.mesh)
    micro = config.train.batch_size // config.train.grad_accum
    if micro % n_shards:
      raise config_lib.ConfigError(
          f"train.batch_size / train.grad_accum = {micro} must be divisible by the {n_shards} "
          f"devices of the mesh")
    self.checkpointer = Checkpointer(os.path.join(self.workdir, "checkpoints"),
                                     keep=config.train.keep_checkpoints,
                                     async_save=config.train.async_checkpointing)
    facts = None
    # The newest step whose metadata reads: damaged newer ones are moved aside (with a warning).
    self._resume_step = self.checkpointer.readable_step()
    if self._resume_step is not None:
      meta = self.checkpointer.read_meta(self._resume_step)
      check_resume_config(meta.get("config"), config,
                          f"{self.workdir}/checkpoints/{self._resume_step}")
      facts = meta.get("model")
    self._resume_facts = facts
    self.stage = build_stage(config, self.mesh, self.workdir, facts)
    self.batch_sharding = mesh_lib.batch_sharding(self.mesh)
    self.replicated = mesh_lib.replicated(self.mesh)
    self.rules = config.mesh.rules or sharding_lib.DEFAULT_RULES
    self._build_data()
    self._build_state()
    self._compile()

  # -- set-up ----------------------------------------------------------------------------------
  def _build_data(self):
    c = self.config
    index_dir = os.path.join(self.workdir, "data_index")   # unless data.index_dir says
    self.train_source = self.stage.adapt_source(
        open_source(c.data, c.data.split, index_dir=index_dir), train=True)
    self.eval_source = None
    if c.data.eval_split:
      self.eval_source = self.stage.adapt_source(
          open_source(c.data, c.data.eval_split, index_dir=index_dir), train=False)
    workers = default_workers() if c.data.workers < 0 else c.data.workers
    self.pipeline = InputPipeline(self.train_source, self.stage.example_fn(train=True),
                                  global_batch=c.train.batch_size, seed=c.seed,
                                  shuffle=c.data.shuffle, workers=workers,
                                  prefetch=c.data.prefetch, on_bad_image=c.data.on_bad_image)
    self.batches: DevicePrefetch | None = None   # started by train(), after any resume
    self.fid = None
    if c.train.inception_weights:
      if self.eval_source is None:
        raise config_lib.ConfigError("train.inception_weights: (r)FID is computed on the "
                                     "held-out split; set data.eval_split")
      self.fid = TrainingFid(c.train.inception_weights, self.mesh, self.eval_source,
                             self.stage.example_fn(train=False), batch_size=c.train.batch_size,
                             num_samples=c.train.fid_samples, seed=c.seed,
                             on_bad_image=c.data.on_bad_image)
    logger.info("training data: %s (%s)", self.train_source.description,
                f"{workers} worker processes" if workers else "read in this process")
    if self.eval_source is not None:
      logger.info("evaluation data: %s", self.eval_source.description)

  def _shardings(self, tree):
    return sharding_lib.tree_shardings(tree, self.mesh, self.rules,
                                       self.config.mesh.min_shard_size)

  def _build_state(self):
    c = self.config
    first = self.pipeline.batch_at(0)
    self.abstract_batch = _abstract_batch(first, self.batch_sharding)
    rng = jax.random.PRNGKey(c.seed)
    init_fn = lambda rng, batch: self.stage.init(rng, model_inputs(batch))  # noqa: E731
    abstract_state = jax.eval_shape(init_fn, rng, self.abstract_batch)
    self.state_shardings = self._shardings(abstract_state)
    # Frozen weights are never updated: replicated, they cost no all-gather per step.
    self.frozen_shardings = (self._shardings(self.stage.frozen) if c.mesh.shard_frozen else
                             jax.tree_util.tree_map(lambda _: self.replicated, self.stage.frozen))
    self.frozen = jax.device_put(self.stage.frozen, self.frozen_shardings)
    restored = None
    if self.checkpointer.latest_step() is not None:
      # The newest step whose arrays read too (one truncated file moves its step aside).
      restored = self.checkpointer.restore_latest(_with_shardings(abstract_state,
                                                                  self.state_shardings))
    if restored is not None:
      step, self.state, meta = restored
      if step != self._resume_step:
        where = f"{self.workdir}/checkpoints/{step}"
        check_resume_config(meta.get("config"), c, where)
        if meta.get("model") != self._resume_facts:
          raise CheckpointError(f"checkpoint '{where}' (the newest readable one) records another "
                                f"model than step {self._resume_step}, which was damaged and "
                                f"moved aside; run the same command again to resume from it")
      self.pipeline.set_state(meta["data"])
      if jax.process_index() != 0:   # the saved count is all hosts'; host 0 carries it on
        self.pipeline.skipped = 0
      logger.info("resumed from %s/checkpoints step %d", self.workdir, step)
    else:
      init = jax.jit(init_fn, out_shardings=self.state_shardings,
                     compiler_options=run_once_options())
      state = init(rng, to_global(first, self.batch_sharding))
      pretrained = self.stage.pretrained(abstract_state.params)
      if pretrained is not None:   # fine-tuning: the weights, placed as the params are
        params = jax.device_put(pretrained, self.state_shardings.params)
        state = state.replace(params=params, ema_params=None if state.ema_params is None else
                              jax.device_put(pretrained, self.state_shardings.ema_params))
      prepare = jax.jit(_on_model_inputs(self.stage.prepare), out_shardings=self.state_shardings)
      self.state = prepare(state, to_global(first, self.batch_sharding), self.frozen)
    self.start_step = int(self.state.step)
    if jax.process_index() == 0:
      _write_if_changed(os.path.join(self.workdir, "config.json"), c.to_json_best_effort(indent=2))
    for line in sharding_lib.describe(abstract_state.params, self._shardings(
        abstract_state.params)):
      logger.debug("sharded: %s", line)

  def _compile(self):
    st, fr, bt = self.state_shardings, self.frozen_shardings, self.batch_sharding
    rep = self.replicated
    self.train_step = jax.jit(_on_model_inputs(self.stage.train_step), in_shardings=(st, bt, fr),
                              out_shardings=(st, rep), donate_argnums=(0,))
    self.eval_step = jax.jit(_on_model_inputs(self.stage.eval_step), in_shardings=(st, bt, fr),
                             out_shardings=rep)
    self.summary_fn = jax.jit(_on_model_inputs(self.stage.summaries), in_shardings=(st, bt, fr),
                              out_shardings=rep)
    if self.fid is not None:
      self.generate_fn = jax.jit(_on_model_inputs(self.stage.generate),
                                 in_shardings=(st, bt, fr), out_shardings=(bt, bt))
    # Whether every float of a state (params, optimizer state, EMA, model state) is finite: run
    # after each step as its own small program, so the step's program (and its numbers) is as
    # the stage wrote it.
    self.finite_fn = jax.jit(all_finite, in_shardings=(st,), out_shardings=rep)
    # Multi-host preemption agreement (see train()): one flag per device of all hosts.
    every = jax.sharding.Mesh(np.array(jax.devices()), ("all",))
    self._flag_sharding = jax.sharding.NamedSharding(every, jax.sharding.PartitionSpec("all"))
    self._any_fn = jax.jit(lambda flags: jnp.max(flags) > 0, out_shardings=jax.sharding.
                           NamedSharding(every, jax.sharding.PartitionSpec()))

  def _agree(self, flag: bool) -> Any:
    """Starts an all-reduce (max) of this host's flag over all hosts; `bool()` of the result
    blocks until every host has contributed. Used to stop every host at the same step."""
    local = np.full((jax.local_device_count(),), int(flag), np.int32)
    global_flags = jax.make_array_from_process_local_data(
        self._flag_sharding, local, (jax.device_count(),))
    return self._any_fn(global_flags)

  # -- the loop --------------------------------------------------------------------------------
  def _meta(self) -> dict[str, Any]:
    data = (self.batches or self.pipeline).get_state()
    if self.batches is not None and self.config.data.on_bad_image == "skip":
      data["skipped"] = self._skipped_files()   # every host saves: all hosts' files, summed
    return {"format": CHECKPOINT_FORMAT, "data": data,
            "stage": self.config.stage, "config": json.loads(self.config.to_json_best_effort()),
            "model": self.stage.describe()}

  def save(self, step: int, force: bool = False) -> bool:
    saved = self.checkpointer.save(step, self.state, self._meta(), force=force)
    if saved:
      self.last_saved = step
    return saved

  def evaluate(self, step: int) -> dict[str, float]:
    c = self.config
    if self.eval_source is None:
      return {}
    results = []
    for local in eval_batches(self.eval_source, self.stage.example_fn(train=False),
                              global_batch=c.train.batch_size, num_batches=c.train.eval_batches,
                              seed=c.seed, on_bad_image=c.data.on_bad_image):
      results.append(jax.device_get(self.eval_step(self.state, to_global(
          local, self.batch_sharding), self.frozen)))
    out = {f"eval/{k}": v for k, v in _mean_metrics(results).items()}
    if self.fid is not None:
      out[f"eval/{self.stage.fid_name}"] = self.fid(self.generate_fn, self.state, self.frozen)
    self.writer.write_scalars(step, out)
    logger.info("eval at step %d: %s", step, _fmt(out))
    return out

  def write_images(self, step: int, batch):
    images = jax.device_get(self.summary_fn(self.state, batch, self.frozen))
    ncols = self.config.train.num_summary_images
    grids = {name: reporting.image_grid(value, ncols=min(ncols, len(value)))
             for name, value in images.items()}
    self.writer.write_images(step, {k: v[None] for k, v in grids.items()})
    if jax.process_index() == 0:
      for name, grid in grids.items():
        reporting.save_png(os.path.join(self.workdir, "images", f"{name}_{step:08d}.png"), grid)
    return grids

  def train(self) -> list[dict[str, float]]:
    """Trains to config.train.num_steps (resuming if checkpoints exist); returns the logged
    metrics, one dict per logged step (with its 'step').

    SIGTERM (or Orbax's preemption notice) saves the current step and raises Preempted (with the
    metrics logged so far) once that save is complete; on several hosts, all stop at one step.
    """
    c, t = self.config, self.config.train
    self.writer = reporting.create_writer(self.workdir)
    metrics_log = reporting.MetricsLog(self.workdir, resume_step=self.start_step)
    self.last_saved = self.checkpointer.latest_step()
    step = self.start_step
    if step == 0:
      reporting.log_parameter_overview(self.state.params, f"{self.stage.name} parameters")
      self.writer.write_hparams({k: v for k, v in _flat_config(c).items()})
    progress = reporting.Progress(t.num_steps, step, t.batch_size, self.writer)
    preempt = _PreemptionFlag()   # kept until the final save is complete (see finally)
    multihost = jax.process_count() > 1
    agreed = None                 # multi-host: the hosts' stop flags, all-reduced a step ago
    pending: list[tuple[int, Any]] = []   # per-step metrics still on device
    history: list[dict[str, float]] = []
    stop = False
    images = t.image_every and t.num_summary_images   # 0 of either: no image summaries
    logger.info("training %s from step %d to %d in %s", self.stage.name, step, t.num_steps,
                self.workdir)
    def log(step: int, host: list):
      """Writes the mean of the host metrics of the steps since the last log line."""
      mean = _mean_metrics([_logged(m) for _, m in host])
      if c.data.on_bad_image == "skip":
        mean["data/skipped_files"] = float(self._skipped_files())
      self.writer.write_scalars(step, mean)
      metrics_log.write(step, mean)
      history.append({"step": step, **mean})
      logger.info("step %d: %s", step, _fmt(mean))
      progress(step)

    if self.batches is not None:   # a second train(): continue after the batches used
      self.pipeline.set_state(self.batches.get_state())
    self.batches = DevicePrefetch(self.pipeline, self.batch_sharding)
    try:
      while step < t.num_steps:
        batch = self._next_batch(step, pending, log)
        self.state, metrics = self.train_step(self.state, batch, self.frozen)
        metrics = dict(metrics, state_finite=self.finite_fn(self.state))
        step += 1
        pending.append((step, metrics))
        if multihost:
          # All hosts stop after the same step: a SIGTERM on any host is all-reduced every step,
          # and read one step later so that waiting for it never stalls the devices.
          stop = agreed is not None and bool(agreed)
          agreed = self._agree(preempt.raised)
        else:
          stop = preempt.raised
        stop = stop or self.checkpointer.reached_preemption(step)
        flush = step % t.log_every == 0 or step == t.num_steps or stop
        ckpt = step % t.ckpt_every == 0 or step == t.num_steps or stop
        if flush or ckpt:
          host = [(s, jax.device_get(m)) for s, m in pending]
          pending = []
          _check_finite(host, self.last_saved, self.workdir)  # before any save of this state
          self.checkpointer.check()   # a failed background save stops the run now
          if flush:
            log(step, host)
        if ckpt:
          self.save(step, force=True)
        if self.eval_source is not None and (step % t.eval_every == 0 or step == t.num_steps):
          self.evaluate(step)
        if images and (step % t.image_every == 0 or step == t.num_steps):
          self.write_images(step, self._summary_batch(batch))
        if stop:
          break
    finally:
      try:
        self.checkpointer.wait()   # still under the SIGTERM handler: a repeated signal waits too
      finally:
        preempt.restore()
        self.writer.flush()
    if stop and step < t.num_steps:
      raise Preempted(f"preempted: stopped at step {step} after a preemption signal and saved "
                      f"checkpoint '{self.workdir}/checkpoints/{step}'; run the same command "
                      f"again to resume", step=step, history=history)
    return history

  def _next_batch(self, step: int, pending: list, log):
    """The next global batch. An unreadable image (data.on_bad_image='error') first logs the
    steps not logged yet and saves the completed step (one host: saves are collective on
    several, so there the last periodic checkpoint stands), so a rerun loses nothing."""
    try:
      return next(self.batches)
    except BadImageError as e:
      saved = f"the last checkpoint is step {self.last_saved}"
      if step > 0 and jax.process_count() == 1:
        host = [(s, jax.device_get(m)) for s, m in pending]
        _check_finite(host, self.last_saved, self.workdir)
        if host:
          log(step, host)
        if self.last_saved != step:
          self.checkpointer.check()
          self.save(step, force=True)
          self.checkpointer.wait()
        saved = f"saved checkpoint '{self.workdir}/checkpoints/{step}'"
      raise DataError(f"{e}; {saved}. Fix or remove the file (or set "
                      f"data.on_bad_image='skip') and run the same command again") from e

  def _skipped_files(self) -> int:
    """Bad files skipped so far by all hosts (a collective when there are several)."""
    count = np.int64(self.batches.get_state()["skipped"])
    if jax.process_count() == 1:
      return int(count)
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return int(np.sum(multihost_utils.process_allgather(count)))

  def _summary_batch(self, train_batch):
    if self.eval_source is None:
      return train_batch
    local = next(eval_batches(self.eval_source, self.stage.example_fn(train=False),
                              global_batch=self.config.train.batch_size, num_batches=1,
                              seed=self.config.seed,
                              on_bad_image=self.config.data.on_bad_image))
    return to_global(local, self.batch_sharding)

  def close(self):
    try:
      self.pipeline.close()
      self.checkpointer.close()
    finally:
      self._lock.release()


# The trainer of each `config.stage` (the schema's `stage` choices).
STAGES = {"autoencoder": AutoencoderStage, "ldm": LatentDiffusionStage}


def build_stage(config, mesh, workdir: str | None = None, facts: dict | None = None):
  """The Stage that trains `config.stage`."""
  if config.stage not in STAGES:
    raise config_lib.ConfigError(f"stage: no trainer for '{config.stage}' (known: "
                                 f"{sorted(STAGES)})")
  return STAGES[config.stage](config, mesh, workdir, facts)


def _on_model_inputs(fn):
  """fn(state, batch, frozen) taking the batch as sent (uint8 images, 16-bit latents) and
  converting it on the device (see ldm_jax.data.preprocess.model_inputs)."""
  def wrapped(state, batch, frozen):
    return fn(state, model_inputs(batch), frozen)
  return wrapped


def _write_if_changed(path: str, text: str):
  """Writes `text` to `path` through a temporary file and a rename, unless it is there already
  (a resume does not rewrite its config, and a kill never leaves half a file)."""
  try:
    with open(path, encoding="utf-8") as f:
      if f.read() == text:
        return
  except OSError:
    pass
  fileio.atomic_write_text(path, text)


def _fmt(metrics: dict[str, float]) -> str:
  return "  ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))


def _flat_config(config, prefix="") -> dict[str, Any]:
  out = {}
  for key, value in config.items():
    if hasattr(value, "items"):
      out.update(_flat_config(value, f"{prefix}{key}."))
    elif isinstance(value, (int, float, str, bool)):
      out[f"{prefix}{key}"] = value
    else:
      out[f"{prefix}{key}"] = str(value)
  return out


def train_and_evaluate(config, workdir: str, devices=None) -> list[dict[str, float]]:
  """Builds a Trainer for `config` in `workdir` and trains it; returns the logged metrics."""
  t0 = time.time()
  trainer = Trainer(config, workdir, devices)
  try:
    history = trainer.train()
  finally:
    trainer.close()
  logger.info("done in %.1f s", time.time() - t0)
  return history

"""Batch sampling jobs: N samples (unconditional, per class, or per prompt) sharded over every
device and host, written as PNGs, an .npz and a grid; resumable and reproducible.

Sample i is a pure function of (model, settings, seed, i): its noise comes from its index, so an
interrupted job rerun with the same command regenerates only the missing PNGs, and gets the same
pixels it would have had (the compute dtype is part of the job; the batch size is not). Host 0
writes, from one background thread while the devices compute the next batch, and holds the
output folder's lock (ldm_jax.locks) for the job's duration; every file is written atomically
(temporary file + rename, ldm_jax.fileio).
samples.npz is assembled from the PNGs one image at a time, so a 50k-sample job needs no more
memory at the end than at the start.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import queue
import threading
import time
import zipfile

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image

from ldm_jax import fileio, locks
from ldm_jax.data.preprocess import to_uint8
from ldm_jax.errors import JobError  # noqa: F401  (re-exported)
from ldm_jax.inference import Pipeline
from ldm_jax.models.build import resolve_dtype
from ldm_jax.training.reporting import image_grid, save_png

logger = logging.getLogger("ldm_jax")




@dataclasses.dataclass
class Job:
  """What to sample: `labels` or `prompts` per sample (or neither), and how."""
  num_samples: int
  labels: list[int] | None = None
  prompts: list[str] | None = None
  seed: int = 0
  batch_size: int = 0          # 0: auto_batch_size's
  sampler: str | None = None
  steps: int | None = None
  eta: float | None = None
  guidance_scale: float | None = None
  spacing: str | None = None
  image_size: int | None = None
  tile: int = 0
  negative_prompt: str | None = None   # a CLIP model's null condition for guidance ('' = none)

  def spec(self, source: str) -> dict:
    """Everything that determines the pixels (the resume check compares it)."""
    content = dataclasses.asdict(self)
    content.pop("batch_size")     # batching does not change any sample
    content["labels"] = digest(self.labels)
    content["prompts"] = digest(self.prompts)
    content["model"] = source
    return content


def digest(values) -> str | None:
  """A short hash of a JSON-able list (None stays None): what a job spec records of it."""
  if values is None:
    return None
  return hashlib.sha256(json.dumps(list(values)).encode()).hexdigest()[:16]


def job_for(pipeline: Pipeline, *, num_samples=0, per_class=0, classes=None, prompts=None,
            per_prompt=1, **settings) -> Job:
  """The Job of sample.py's flags: per-class and per-prompt jobs expand to one label/prompt per
  sample, in order (class 0 x per_class, class 1 x per_class, ...)."""
  cond = pipeline.ldm.cond
  labels = texts = None
  if cond.context == "class" or cond.adm:
    chosen = list(classes) if classes else list(range(pipeline.num_classes))
    bad = [c for c in chosen if not 0 <= c < pipeline.num_classes]
    if bad:
      raise JobError(f"--classes: {bad} outside the model's {pipeline.num_classes} classes")
    per = per_class or max(1, math.ceil(num_samples / len(chosen)))
    labels = [c for c in chosen for _ in range(per)]
    num_samples = len(labels)
  elif cond.context == "text":
    if not prompts:
      raise JobError("this model is text-conditional: give --prompts (a file, one per line)")
    texts = [p for p in prompts for _ in range(per_prompt)]
    num_samples = len(texts)
  elif per_class or classes:
    raise JobError("--per_class/--classes: this model is not class-conditional")
  if num_samples <= 0:
    raise JobError("nothing to sample: set --num_samples (or --per_class / --prompts)")
  return Job(num_samples, labels, texts, **settings)


def _png_path(out: str, i: int) -> str:
  return os.path.join(out, "images", f"{i:06d}.png")


# Job fields added after jobs were first recorded, and the value a job from before them ran
# with: sampling jobs had no negative prompt, upscale jobs were raw, inpaint jobs pasted, and
# inpainting models' jobs took the known region from the concat condition alone.
ADDED_FIELDS = {"negative_prompt": None, "consistency": 0, "seamless": False,
                "keep_known": False}
# Fields whose old value a flag can restore, named in the hint of a folder that differs in one.
_RESTORABLE = ("dtype", *(f for f, before in ADDED_FIELDS.items() if before is not None))


def _flag(field: str, value) -> str:
  """The command-line flag that sets a job field to `value`."""
  if isinstance(value, bool):
    return f"--{'' if value else 'no'}{field}"
  return f"--{field}={value}"


def check_job(out: str, spec: dict, trained_dtype: str | None = None):
  """Records the job's spec in out/job.json, or checks the one there is the same. Jobs from
  before the spec had a dtype sampled in the model's own (`trained_dtype`)."""
  path = os.path.join(out, "job.json")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      existing = json.load(f)
    existing.setdefault("dtype", resolve_dtype(trained_dtype) if trained_dtype else spec["dtype"])
    for field, before in ADDED_FIELDS.items():
      if field in spec:
        existing.setdefault(field, before)
    if existing != spec:
      diff = sorted(k for k in set(existing) | set(spec) if existing.get(k) != spec.get(k))
      hint = (f" (or rerun with {_flag(diff[0], existing[diff[0]])})"
              if len(diff) == 1 and diff[0] in _RESTORABLE else "")
      raise JobError(f"'{out}' holds samples of a different job (differs in {', '.join(diff)}); "
                     f"use another --out or delete it{hint}")
  elif jax.process_index() == 0:
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    fileio.atomic_write_text(path, json.dumps(spec, indent=2))


def run(pipeline: Pipeline, job: Job, out: str, mesh: Mesh | None = None) -> dict:
  """Runs (or resumes) a job; returns {'generated', 'skipped', 'compilations', 'seconds',
  'samples_per_sec', 'batch_size'}. A second job on the same `out` meanwhile stops with a
  LockError."""
  with locks.lock_folder(out, "sampling job", enabled=jax.process_index() == 0):
    return _run(pipeline, job, out, mesh)


def _run(pipeline: Pipeline, job: Job, out: str, mesh: Mesh | None) -> dict:
  mesh = mesh or Mesh(np.asarray(jax.devices()), ("data",))
  batch = _batch_size(pipeline, job, mesh)
  check_job(out, _spec(pipeline, job), pipeline.trained_dtype)
  multihost_utils.sync_global_devices("ldm_jax sampling job start")
  done = {i for i in range(job.num_samples) if os.path.exists(_png_path(out, i))}
  generate, params, frozen = _compile(pipeline, job, mesh)
  key = jax.random.PRNGKey(job.seed)
  starts = [s for s in range(0, job.num_samples, batch)
            if not all(i in done for i in range(s, min(s + batch, job.num_samples)))]
  logger.info("sampling %d images (%d already there) in batches of %d%s on %d %s device(s), "
              "computing in %s", job.num_samples, len(done), batch,
              "" if job.batch_size else " (auto)", mesh.devices.size,
              mesh.devices.flat[0].platform, resolve_dtype(pipeline.config.train.compute_dtype))
  progress = Progress(job.num_samples, len(done))
  with Writer(out) as writer:
    # Each batch is dispatched (JAX runs it asynchronously) before the previous one is fetched
    # and handed to the writer, so the devices compute while the host gathers and writes.
    pending = None
    for start in starts:
      # The last batch is padded with its last index; the padding is not written.
      idx = np.minimum(np.arange(start, start + batch), job.num_samples - 1)
      cond = pipeline.condition_batch(
          batch, labels=None if job.labels is None else [job.labels[i] for i in idx],
          prompts=None if job.prompts is None else [job.prompts[i] for i in idx],
          negative_prompts=None if job.negative_prompt is None else [job.negative_prompt] * batch)
      images = generate(params, frozen, key, *global_batch((np.asarray(idx, np.int32), cond),
                                                           mesh))
      if pending is not None:
        _hand_over(*pending, job, done, writer, progress)
      pending = (start, images)
    if pending is not None:
      _hand_over(*pending, job, done, writer, progress)
  seconds = time.time() - progress.t0
  multihost_utils.sync_global_devices("ldm_jax sampling job end")
  if jax.process_index() == 0:
    _write_summaries(out, job)
  return {"generated": writer.written, "skipped": len(done), "seconds": seconds,
          "samples_per_sec": progress.rate, "batch_size": batch,
          "compilations": generate._cache_size()}  # pylint: disable=protected-access


def global_batch(tree, mesh: Mesh):
  """Host arrays that every process holds whole -> global jax.Arrays split over the mesh's
  'data' axis (on several processes jit refuses numpy inputs with a non-trivial sharding)."""
  sharding = NamedSharding(mesh, P("data"))
  return jax.tree_util.tree_map(
      lambda a: jax.make_array_from_callback(np.shape(a), sharding,
                                             lambda index: np.asarray(a)[index]), tree)


def _spec(pipeline: Pipeline, job: Job) -> dict:
  """The job's spec plus the compute dtype ('auto' resolved), which changes the pixels too."""
  return dict(job.spec(pipeline.source), dtype=resolve_dtype(pipeline.config.train.compute_dtype))


def _compile(pipeline: Pipeline, job: Job, mesh: Mesh):
  """(jitted generate, params, frozen): one program for every batch, weights replicated."""
  rep, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  generate = jax.jit(pipeline.make_generate(
      sampler=job.sampler, steps=job.steps, eta=job.eta, guidance_scale=job.guidance_scale,
      spacing=job.spacing, image_size=job.image_size, tile=job.tile),
      in_shardings=(rep, rep, rep, sharded, sharded), out_shardings=sharded)
  return generate, jax.device_put(pipeline.params, rep), jax.device_put(pipeline.frozen, rep)


def _hand_over(start: int, images, job: Job, done: set, writer: "Writer",
               progress: "Progress"):
  """Waits for a batch's images, gathers them on every host, and queues host 0's new ones."""
  images = np.asarray(multihost_utils.process_allgather(images, tiled=True))
  new = []
  if jax.process_index() == 0:
    new = [(_png_path(writer.out, i), images[j])
           for j, i in enumerate(range(start, min(start + len(images), job.num_samples)))
           if i not in done]
    writer.put(new)
  progress.advance(len(new))


def _batch_size(pipeline: Pipeline, job: Job, mesh: Mesh) -> int:
  """The job's global batch: --batch_size, or (0) auto_batch_size's for these devices."""
  n_dev = mesh.devices.size
  if job.batch_size:
    if job.batch_size % n_dev:
      raise JobError(f"--batch_size ({job.batch_size}) must be divisible by the {n_dev} "
                     f"devices (or 0 to choose one)")
    return job.batch_size
  return auto_batch_size(job.num_samples, pipeline.latent_shape(1, job.image_size)[1:3], n_dev,
                         mesh.devices.flat[0].platform)


AUTO_PER_DEVICE = 64             # per GPU/TPU device, for latents of up to...
AUTO_LATENT_AREA = 32 * 32       # ...this many pixels; proportionally fewer for larger ones
AUTO_CPU_BATCH = 16              # in all, on CPU


def auto_batch_size(num_samples: int, latent_hw: tuple[int, int], n_devices: int,
                    platform: str) -> int:
  """--batch_size=0: a batch that fills the devices. On GPU/TPU 64 per device for latents of
  up to 32x32, scaled down by latent area beyond (16 at 64x64, at least 1); on CPU 16 in all.
  Rounded down to a multiple of the device count (at least one per device) and no larger than
  the job, rounded up to the devices, so a small job is one batch."""
  h, w = latent_hw
  if platform == "cpu":
    batch = AUTO_CPU_BATCH
  else:
    batch = n_devices * max(1, min(AUTO_PER_DEVICE, AUTO_PER_DEVICE * AUTO_LATENT_AREA // (h * w)))
  batch = min(batch, -(-num_samples // n_devices) * n_devices)
  return max(n_devices, batch // n_devices * n_devices)


class Progress:
  """Logs samples done, the rate (measured after the first batch, which includes compiling)
  and the time left."""

  def __init__(self, total: int, skipped: int):
    self.total, self.skipped, self.generated = total, skipped, 0
    self.t0, self.t_first, self.first_count, self.rate = time.time(), None, 0, 0.0

  def advance(self, count: int):
    self.generated += count
    now = time.time()
    if self.t_first is None:
      self.t_first, self.first_count = now, self.generated
      self.rate = self.generated / max(now - self.t0, 1e-9)
    else:
      self.rate = (self.generated - self.first_count) / max(now - self.t_first, 1e-9)
    remaining = self.total - self.skipped - self.generated
    logger.info("%d/%d samples  %.2f samples/s  ETA %s", self.skipped + self.generated,
                self.total, self.rate, _eta(remaining / self.rate if self.rate > 0 else math.inf))


class Writer:
  """Writes batches of PNGs (and finishes them, when given functions) on one background thread
  while the devices compute the next.

  At most `depth` batches wait in its queue (put blocks beyond that), so host memory stays
  bounded. Each PNG is written atomically (save_png), so an interrupted job leaves every sample
  either whole or absent. A failed write stops the writing; the next put() or the end of the
  `with` block raises it in the main thread, an OSError and the like as one JobError. Leaving
  the block with an error drops the queued batches (the PNG being written completes)."""

  def __init__(self, out: str, depth: int = 2):
    self.out, self.written = out, 0
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._error: tuple[str, BaseException] | None = None
    self._thread = threading.Thread(target=self._loop, name="ldm_jax sample writer",
                                    daemon=True)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is not None:
      self._stop.set()
    self._queue.put(None)      # the writer drains the queue, so this never blocks for long
    self._thread.join()
    if exc_type is None:
      self._raise_if_failed()

  def put(self, items: list[tuple[str, np.ndarray]]):
    """Queues (path, float image) pairs, or (path, a function of no arguments returning the
    image) for work the thread should do too; raises the error of an earlier batch's write."""
    self._raise_if_failed()
    self._queue.put(items)

  def _loop(self):
    while (items := self._queue.get()) is not None:
      for path, image in items:
        if self._stop.is_set() or self._error is not None:
          break
        try:
          save_png(path, to_uint8(image() if callable(image) else image))
          self.written += 1
        except BaseException as e:  # pylint: disable=broad-except  (re-raised by the caller)
          self._error = (path, e)

  def _raise_if_failed(self):
    if self._error is None:
      return
    path, error = self._error
    if not isinstance(error, Exception):   # KeyboardInterrupt, SystemExit: as they are
      raise error
    raise JobError(f"writing '{path}' failed ({type(error).__name__}: {error}); fix that and "
                   f"rerun the same command: the job resumes from the samples written") from error


def _eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 60}:{seconds % 60:02d}"


def _read_png(path: str) -> np.ndarray:
  with Image.open(path) as png:
    image = np.asarray(png)
  return image[..., None] if image.ndim == 2 else image


def _samples(out: str, job: Job, like: np.ndarray):
  """The job's images, read from their PNGs one at a time, each checked against `like`."""
  for i in range(job.num_samples):
    image = _read_png(_png_path(out, i))
    if image.shape != like.shape or image.dtype != like.dtype:
      raise JobError(f"'{_png_path(out, i)}' is {image.dtype}{list(image.shape)}, unlike the "
                     f"first sample's {like.dtype}{list(like.shape)}; delete it and rerun the "
                     f"job to regenerate it")
    yield image


def _write_summaries(out: str, job: Job):
  """samples.npz (uint8 images + labels/prompts) and grid.png (one row per class if any).

  The images go from the PNGs into the npz one at a time and are never stacked in memory; the
  grid reads only the images it shows (the first 64, or the first 10 of each class).
  """
  first = _read_png(_png_path(out, 0))
  with fileio.atomic_path(os.path.join(out, "samples.npz")) as tmp:
    # np.savez_compressed's layout: a zip of one .npy member per key.
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
      _write_npy_member(zf, "images.npy", (job.num_samples,) + first.shape, first.dtype,
                        _samples(out, job, first))
      if job.labels is not None:
        with zf.open("labels.npy", "w", force_zip64=True) as f:
          np.lib.format.write_array(f, np.asarray(job.labels, np.int32))
      if job.prompts is not None:
        with zf.open("prompts.npy", "w", force_zip64=True) as f:
          np.lib.format.write_array(f, np.asarray(job.prompts))
  if job.labels is not None:
    # One row per class: its first (up to) 10 samples, padded with white.
    labels = np.asarray(job.labels)
    rows = [np.flatnonzero(labels == c)[:10] for c in dict.fromkeys(job.labels)]
    width = max(len(r) for r in rows)
    blank = np.full(first.shape, 255, first.dtype)
    shown = [_read_png(_png_path(out, r[k])) if k < len(r) else blank
             for r in rows for k in range(width)]
    grid = image_grid(np.asarray(shown), ncols=width)
  else:
    grid = image_grid(np.asarray([_read_png(_png_path(out, i))
                                  for i in range(min(64, job.num_samples))]))
  save_png(os.path.join(out, "grid.png"), grid)


def _write_npy_member(zf: zipfile.ZipFile, name: str, shape: tuple, dtype, rows):
  """Writes member `name` of `zf` as the .npy of one C-order (shape, dtype) array whose rows
  come from the iterable `rows`, consumed one at a time (np.load reads it like np.save's)."""
  header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
            "shape": tuple(int(d) for d in shape)}
  count = 0
  with zf.open(name, "w", force_zip64=True) as f:
    np.lib.format.write_array_header_1_0(f, header)
    for row in rows:
      f.write(np.ascontiguousarray(row, dtype).tobytes())
      count += 1
  if count != shape[0]:
    raise JobError(f"{name}: {count} rows written where the header says {shape[0]}")

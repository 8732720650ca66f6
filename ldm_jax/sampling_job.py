"""Batch sampling jobs: N samples (unconditional, per class, or per prompt) sharded over every
device and host, written as PNGs, an .npz and a grid; resumable and reproducible.

Sample i is a pure function of (model, settings, seed, i): its noise comes from its index, so an
interrupted job rerun with the same command regenerates only the missing PNGs, and gets the same
pixels it would have had. Host 0 writes, and holds the output folder's lock (ldm_jax.locks) for
the job's duration; every file is written atomically (temporary file + rename, ldm_jax.fileio).
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
import time
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image

from ldm_jax import fileio, locks
from ldm_jax.data.preprocess import to_uint8
from ldm_jax.errors import JobError  # noqa: F401  (re-exported)
from ldm_jax.inference import Pipeline
from ldm_jax.training.reporting import image_grid, save_png

logger = logging.getLogger("ldm_jax")




@dataclasses.dataclass
class Job:
  """What to sample: `labels` or `prompts` per sample (or neither), and how."""
  num_samples: int
  labels: list[int] | None = None
  prompts: list[str] | None = None
  seed: int = 0
  batch_size: int = 16
  sampler: str | None = None
  steps: int | None = None
  eta: float | None = None
  guidance_scale: float | None = None
  spacing: str | None = None
  image_size: int | None = None
  tile: int = 0

  def spec(self, source: str) -> dict:
    """Everything that determines the pixels (the resume check compares it)."""
    content = dataclasses.asdict(self)
    content.pop("batch_size")     # batching does not change any sample
    content["labels"] = _digest(self.labels)
    content["prompts"] = _digest(self.prompts)
    content["model"] = source
    return content


def _digest(values) -> str | None:
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


def _check_job(out: str, spec: dict):
  path = os.path.join(out, "job.json")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      existing = json.load(f)
    if existing != spec:
      diff = sorted(k for k in set(existing) | set(spec) if existing.get(k) != spec.get(k))
      raise JobError(f"'{out}' holds samples of a different job (differs in {', '.join(diff)}); "
                     f"use another --out or delete it")
  elif jax.process_index() == 0:
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    fileio.atomic_write_text(path, json.dumps(spec, indent=2))


def run(pipeline: Pipeline, job: Job, out: str, mesh: Mesh | None = None) -> dict:
  """Runs (or resumes) a job; returns {'generated', 'skipped', 'compilations', 'seconds',
  'samples_per_sec'}. A second job on the same `out` meanwhile stops with a LockError."""
  with locks.lock_folder(out, "sampling job", enabled=jax.process_index() == 0):
    return _run(pipeline, job, out, mesh)


def _run(pipeline: Pipeline, job: Job, out: str, mesh: Mesh | None) -> dict:
  mesh = mesh or Mesh(np.asarray(jax.devices()), ("data",))
  n_dev = mesh.devices.size
  batch = job.batch_size
  if batch % n_dev:
    raise JobError(f"--batch_size ({batch}) must be divisible by the {n_dev} devices")
  _check_job(out, job.spec(pipeline.source))
  multihost_utils.sync_global_devices("ldm_jax sampling job start")
  done = {i for i in range(job.num_samples) if os.path.exists(_png_path(out, i))}
  rep, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  generate = jax.jit(pipeline.make_generate(
      sampler=job.sampler, steps=job.steps, eta=job.eta, guidance_scale=job.guidance_scale,
      spacing=job.spacing, image_size=job.image_size, tile=job.tile),
      in_shardings=(rep, rep, rep, sharded, sharded), out_shardings=sharded)
  params = jax.device_put(pipeline.params, rep)
  frozen = jax.device_put(pipeline.frozen, rep)
  key = jax.random.PRNGKey(job.seed)
  starts = [s for s in range(0, job.num_samples, batch)
            if not all(i in done for i in range(s, min(s + batch, job.num_samples)))]
  logger.info("sampling %d images (%d already there) in batches of %d on %d devices",
              job.num_samples, len(done), batch, n_dev)
  t0, generated = time.time(), 0
  t_first, first_count, rate = None, 0, 0.0
  for start in starts:
    # The last batch is padded with its last index; the padding is not written.
    idx = np.minimum(np.arange(start, start + batch), job.num_samples - 1)
    cond = pipeline.condition_batch(
        batch, labels=None if job.labels is None else [job.labels[i] for i in idx],
        prompts=None if job.prompts is None else [job.prompts[i] for i in idx])
    images = generate(params, frozen, key, jnp.asarray(idx, jnp.int32), cond)
    images = np.asarray(multihost_utils.process_allgather(images, tiled=True))
    if jax.process_index() == 0:
      for j, i in enumerate(range(start, min(start + batch, job.num_samples))):
        if i not in done:
          save_png(_png_path(out, i), to_uint8(images[j]))
          generated += 1
    now = time.time()
    if t_first is None:   # the first batch includes compiling: measure the rate after it
      t_first, first_count = now, generated
      rate = generated / max(now - t0, 1e-9)
    else:
      rate = (generated - first_count) / max(now - t_first, 1e-9)
    remaining = job.num_samples - len(done) - generated
    logger.info("%d/%d samples  %.2f samples/s  ETA %s", len(done) + generated,
                job.num_samples, rate, _eta(remaining / rate if rate > 0 else math.inf))
  seconds = time.time() - t0
  multihost_utils.sync_global_devices("ldm_jax sampling job end")
  if jax.process_index() == 0:
    _write_summaries(out, job)
  return {"generated": generated, "skipped": len(done), "seconds": seconds,
          "samples_per_sec": rate,
          "compilations": generate._cache_size()}  # pylint: disable=protected-access


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

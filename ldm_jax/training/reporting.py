"""Metrics and images out of training: clu writers (TensorBoard + console), progress, overviews."""
from __future__ import annotations

import json
import logging
import math
import os
import time

import jax
import numpy as np

from ldm_jax import fileio
from ldm_jax.data.preprocess import to_uint8

logger = logging.getLogger("ldm_jax")


def _hide_accelerators_from_tensorflow():
  # clu's writers import TensorFlow; it must never claim GPU memory that JAX needs.
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], "GPU")
  except Exception:  # TF absent, or already initialised: nothing to hide
    pass


def create_writer(workdir: str):
  """TensorBoard event files in workdir plus console lines; host 0 only writes."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  _hide_accelerators_from_tensorflow()
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  return metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0,
                                              asynchronous=True)


class Progress:
  """Logs steps/s, examples/s and ETA every `every` steps (and writes them as scalars)."""

  def __init__(self, total_steps: int, start_step: int, global_batch: int, writer=None):
    self.total, self.batch, self.writer = total_steps, global_batch, writer
    self.t0, self.s0 = time.time(), start_step

  def __call__(self, step: int) -> dict[str, float]:
    now = time.time()
    done = step - self.s0
    rate = done / max(now - self.t0, 1e-9)
    eta = (self.total - step) / rate if rate > 0 else math.inf
    self.t0, self.s0 = now, step
    out = {"steps_per_sec": rate, "examples_per_sec": rate * self.batch}
    if self.writer is not None:
      self.writer.write_scalars(step, out)
    logger.info("step %d/%d  %.2f steps/s  %.1f examples/s  ETA %s", step, self.total, rate,
                rate * self.batch, _hms(eta))
    return out


def _hms(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def log_parameter_overview(params, name: str):
  """clu's parameter table (shapes, sizes, statistics) to the log, and the total count."""
  from clu import parameter_overview  # pylint: disable=g-import-not-at-top
  count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
  if jax.process_index() == 0:
    try:
      table = parameter_overview.get_parameter_overview(params, include_stats=False)
    except Exception:  # the overview is a convenience; never fail a run for it
      table = ""
    logger.info("%s: %s parameters\n%s", name, f"{count:,}", table)
  return count


def image_grid(images, ncols: int | None = None, pad: int = 2) -> np.ndarray:
  """(N, H, W, C) float in [-1, 1] or uint8 -> one uint8 (rows*H, cols*W, C) grid image."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    images = to_uint8(images)
  n, h, w, c = images.shape
  ncols = ncols or int(math.ceil(math.sqrt(n)))
  nrows = int(math.ceil(n / ncols))
  grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
  for i in range(n):
    r, col = divmod(i, ncols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h,
         pad + col * (w + pad):pad + col * (w + pad) + w] = images[i]
  return grid


def save_png(path: str, image: np.ndarray):
  """Writes a uint8 (H, W, C) image as a PNG atomically (temporary file + rename)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = np.asarray(image)
  with fileio.atomic_path(path) as tmp:
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(tmp, format="PNG")


class MetricsLog:
  """Appends one JSON line per logged step to workdir/metrics.jsonl (host 0), for scripts.

  Each line is one write() to a file opened for appending, so a kill can tear only the last
  line. `resume_step` (the step a run starts or resumes from) first rewrites the file, atomically,
  without the lines of later steps and without torn lines: the steps after the checkpoint are
  logged again by the resumed run, and must not appear twice.
  """

  def __init__(self, workdir: str, resume_step: int | None = None):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = jax.process_index() == 0
    if self.enabled and resume_step is not None:
      truncate_metrics(self.path, resume_step)

  def write(self, step: int, metrics: dict[str, float]):
    if self.enabled:
      line = json.dumps({"step": int(step), **{k: float(v) for k, v in metrics.items()}}) + "\n"
      with open(self.path, "a", encoding="utf-8") as f:
        f.write(line)


def truncate_metrics(path: str, step: int) -> int:
  """Drops the lines of a metrics.jsonl after `step`, and torn or unreadable ones; rewrites the
  file atomically if anything was dropped. Returns the number of lines dropped."""
  try:
    with open(path, encoding="utf-8", errors="replace") as f:
      text = f.read()
  except FileNotFoundError:
    return 0
  kept, dropped = [], 0
  for line in text.splitlines(keepends=True):
    try:
      record = json.loads(line) if line.endswith("\n") else None
    except ValueError:
      record = None
    if isinstance(record, dict) and isinstance(record.get("step"), int) and \
        record["step"] <= step:
      kept.append(line)
    else:
      dropped += 1
  if dropped:
    logger.info("metrics.jsonl: dropped %d lines after step %d (or torn)", dropped, step)
    fileio.atomic_write_text(path, "".join(kept))
  return dropped

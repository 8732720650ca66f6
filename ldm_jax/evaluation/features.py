"""Inception features of a whole image set: read by the input pipeline, resized on the host as
pytorch-fid resizes, extracted in batches sharded over every device and host, and cached as
reference statistics.

Images of any sizes mix in one set: each is resized to 299x299 on the host with the bilinear
rule of torch's F.interpolate (align_corners=False, no antialiasing) in float32, so batches
share one shape and one compiled program. Host h extracts its slice of every global batch; the
features are gathered so every host returns all of them, in the set's order.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from ldm_jax import fileio
from ldm_jax.data.pipeline import InputPipeline, to_global
from ldm_jax.data.sources import Source
from ldm_jax.errors import DataError
from ldm_jax.evaluation import metrics
from ldm_jax.evaluation.inception import SIZE, FeatureExtractor

logger = logging.getLogger("ldm_jax")

# Bump when the preprocessing changes: cached reference statistics record it.
PREPROCESSING = "pytorch-fid: bilinear 299 (align_corners=False, no antialias), 2x-1; v1"


def _linear_weights(n_in: int, n_out: int):
  """Source indices and weights of torch's bilinear resize along one axis."""
  src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * n_in / n_out - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  w = (src - lo).astype(np.float32)
  return lo, hi, w


def resize_299(image: np.ndarray) -> np.ndarray:
  """uint8 (H, W, C) -> float32 (299, 299, 3) in [0, 1], as F.interpolate(bilinear,
  align_corners=False) resizes a float image; grey images become RGB."""
  x = np.asarray(image, np.float32) / 255.0
  if x.ndim == 2:
    x = x[..., None]
  if x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  x = x[..., :3]
  h, w = x.shape[:2]
  if (h, w) == (SIZE, SIZE):
    return x
  lo, hi, wy = _linear_weights(h, SIZE)
  x = x[lo] * (1.0 - wy)[:, None, None] + x[hi] * wy[:, None, None]
  lo, hi, wx = _linear_weights(w, SIZE)
  return x[:, lo] * (1.0 - wx)[None, :, None] + x[:, hi] * wx[None, :, None]


def _example(example: dict, rng) -> dict:
  del rng
  return {"image": resize_299(example["image"])}


def extract(source: Source, extractor: FeatureExtractor, *, batch_size: int = 64,
            workers: int = 0, description: str = "") -> dict[str, np.ndarray]:
  """{'pool': (N, 2048) float64, 'logits': (N, 1008) if the weights have them} of every image
  of `source`, in order. batch_size is global and is rounded up to a multiple of the devices."""
  n = len(source)
  if n == 0:
    raise DataError(f"evaluation: {source.description} has no images")
  devices = jax.device_count()
  batch = -(-batch_size // devices) * devices
  sharding = extractor.sharding
  padded = -(-n // batch) * batch
  wrapped = _Padded(source, padded)
  pipe = InputPipeline(wrapped, _example, global_batch=batch, seed=0, shuffle=False,
                       workers=workers)
  out: dict[str, list] = {}
  t0 = time.time()
  try:
    for i, local in enumerate(pipe.read(range(padded // batch))):
      images = local["image"] if sharding is None else to_global(local, sharding)["image"]
      for key, value in extractor.extract_global(images).items():
        out.setdefault(key, []).append(value)
      done = min((i + 1) * batch, n)
      if i % 20 == 0 or done == n:
        logger.info("inception features %s: %d/%d (%.1f images/s)", description, done, n,
                    done / max(time.time() - t0, 1e-9))
  finally:
    pipe.close()
  return {k: np.concatenate(v)[:n] for k, v in out.items()}


class _Padded(Source):
  """`source` extended to `length` by repeating its first image (dropped after extraction)."""

  def __init__(self, source: Source, length: int):
    self.source, self.length = source, length
    self.description = source.description

  def __len__(self):
    return self.length

  def __getitem__(self, index):
    return self.source[index if index < len(self.source) else 0]


def statistics(features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """What a reference set contributes: mu, sigma and the pool features (for KID and PR)."""
  mu, sigma = metrics.gaussian_stats(features["pool"])
  return {"mu": mu, "sigma": sigma, "features": features["pool"].astype(np.float32)}


def cache_key(spec: dict) -> str:
  return hashlib.sha256(json.dumps({**spec, "preprocessing": PREPROCESSING},
                                   sort_keys=True).encode()).hexdigest()[:16]


def cached_statistics(cache_dir: str, spec: dict, compute) -> dict[str, np.ndarray]:
  """Reference statistics keyed by `spec` (dataset, split, resolution, count...) and the
  preprocessing: read from <cache_dir>/<key>.npz, else computed once and written (process 0)."""
  path = os.path.join(cache_dir, f"reference-{cache_key(spec)}.npz")
  if os.path.exists(path):
    logger.info("reference statistics from %s", path)
    return read_statistics(path)
  stats = compute()
  if jax.process_index() == 0:
    with fileio.atomic_path(path) as tmp:
      with open(tmp, "wb") as f:
        np.savez(f, **stats, spec=json.dumps({**spec, "preprocessing": PREPROCESSING}))
    logger.info("reference statistics written to %s", path)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("ldm_jax reference statistics")
  return stats


def read_statistics(path: str) -> dict[str, np.ndarray]:
  """A statistics .npz: ldm_jax's (mu, sigma, features) or the mu/sigma files other FID tools
  publish for ImageNet and CIFAR-10 (no features: FID only)."""
  try:
    with np.load(path) as data:
      if "mu" not in data.files or "sigma" not in data.files:
        raise DataError(f"'{path}' has no 'mu' and 'sigma' arrays (found {data.files}): not "
                        f"FID reference statistics")
      out = {"mu": np.asarray(data["mu"], np.float64),
             "sigma": np.asarray(data["sigma"], np.float64)}
      if "features" in data.files:
        out["features"] = np.asarray(data["features"])
      return out
  except (OSError, ValueError) as e:
    raise DataError(f"cannot read reference statistics '{path}': {e}") from None

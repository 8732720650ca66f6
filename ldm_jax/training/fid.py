"""FID during training: every evaluation, the stage's generated images for a fixed set of
held-out batches against those batches' own images, through the FID Inception.

Stage 1 generates reconstructions (rFID), stage 2 samples with each batch's conditions and
fixed noise (FID). The held-out batches, the noise and hence the real statistics are the same
at every evaluation, so the numbers are comparable along a run. Generated images are
quantised to uint8 levels first, as they would be when written as PNGs and read by an FID tool.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ldm_jax.data.pipeline import eval_batches, to_global
from ldm_jax.evaluation import metrics
from ldm_jax.evaluation.inception import FeatureExtractor


def _unit_levels(images):
  """[-1, 1] -> [0, 1] on the 256 levels of a PNG."""
  return jnp.round((jnp.clip(images, -1.0, 1.0) + 1.0) * 127.5) / 255.0


class TrainingFid:
  """fid(generate, state, frozen) -> the Frechet distance of this evaluation.

  generate(state, batch, frozen) -> (real, generated) global image batches in [-1, 1].
  """

  def __init__(self, weights: str, mesh, source, example_fn, *, batch_size: int,
               num_samples: int, seed: int, on_bad_image: str = "error"):
    self.extractor = FeatureExtractor(weights, NamedSharding(mesh, P(("data", "fsdp"))))
    self.source, self.example_fn, self.seed = source, example_fn, seed
    self.batch_size, self.on_bad_image = batch_size, on_bad_image
    self.num_batches = max(1, math.ceil(num_samples / batch_size))
    self.real_stats = None   # the held-out images' statistics, computed at the first call
    self._levels = jax.jit(_unit_levels)

  @property
  def num_samples(self) -> int:
    return self.num_batches * self.batch_size

  def __call__(self, generate, state, frozen) -> float:
    real, fake = [], []
    for local in eval_batches(self.source, self.example_fn, global_batch=self.batch_size,
                              num_batches=self.num_batches, seed=self.seed,
                              on_bad_image=self.on_bad_image):
      x, generated = generate(state, to_global(local, self.extractor.sharding), frozen)
      fake.append(self.extractor.extract_global(self._levels(generated))["pool"])
      if self.real_stats is None:
        real.append(self.extractor.extract_global(self._levels(x))["pool"])
    if self.real_stats is None:
      self.real_stats = metrics.gaussian_stats(np.concatenate(real))
    mu, sigma = metrics.gaussian_stats(np.concatenate(fake))
    return metrics.frechet_distance(mu, sigma, *self.real_stats)

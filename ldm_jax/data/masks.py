"""Random inpainting masks (1 = region to fill) in the paper's style, seeded per example.

The paper trains its inpainting models on LaMa-style masks: free-form brush strokes, thick and
thin, plus boxes. A mask here is built shape by shape (each shape a thick stroke, a thin stroke
or a box, with equal odds) until its coverage reaches a target drawn uniformly from `coverage`
(cond.mask_coverage; the paper's hardest setting is 40-50%); a shape that would overshoot the
range's top is redrawn (at most `max_shapes` draws in all), so the coverage never exceeds the
range's top and falls short of its bottom only when the draws run out.

  thick stroke  radius 4-9% of the shorter side, 2-5 segments of 10-40% of the longer side
  thin stroke   radius 1-3%, 3-8 segments of 10-40%
  box           sides 10-50% of the image's, anywhere
"""
from __future__ import annotations

import numpy as np

DEFAULT_COVERAGE = (0.1, 0.5)


def _stroke(rng, height, width, radius_range, segments_range):
  yy, xx = np.mgrid[:height, :width]
  out = np.zeros((height, width), bool)
  radius = max(0.75, rng.uniform(*radius_range) * min(height, width))
  y, x = rng.uniform(0, height), rng.uniform(0, width)
  for _ in range(rng.integers(*segments_range)):
    angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.4) * max(height, width)
    ny = np.clip(y + length * np.sin(angle), 0, height - 1)
    nx = np.clip(x + length * np.cos(angle), 0, width - 1)
    # Distance of every pixel to the segment (y, x) -> (ny, nx).
    dy, dx = ny - y, nx - x
    t = np.clip(((yy - y) * dy + (xx - x) * dx) / max(dy * dy + dx * dx, 1e-9), 0, 1)
    out |= (yy - (y + t * dy)) ** 2 + (xx - (x + t * dx)) ** 2 <= radius ** 2
    y, x = ny, nx
  return out


def _box(rng, height, width):
  out = np.zeros((height, width), bool)
  h = max(1, int(rng.uniform(0.1, 0.5) * height))
  w = max(1, int(rng.uniform(0.1, 0.5) * width))
  top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
  out[top:top + h, left:left + w] = True
  return out


def _shape(rng, height, width):
  kind = rng.integers(3)
  if kind == 0:
    return _stroke(rng, height, width, (0.04, 0.09), (2, 6))
  if kind == 1:
    return _stroke(rng, height, width, (0.01, 0.03), (3, 9))
  return _box(rng, height, width)


def random_mask(rng: np.random.Generator, height: int, width: int,
                coverage: tuple[float, float] = DEFAULT_COVERAGE,
                max_shapes: int = 64) -> np.ndarray:
  """(H, W, 1) float32 mask of strokes and boxes whose coverage is drawn from `coverage`."""
  lo, hi = coverage
  if not 0.0 < lo <= hi <= 1.0:
    raise ValueError(f"cond.mask_coverage: expected 0 < low <= high <= 1, got {coverage}")
  target = rng.uniform(lo, hi)
  mask = np.zeros((height, width), bool)
  for _ in range(max_shapes):
    if mask.mean() >= target:
      break
    candidate = mask | _shape(rng, height, width)
    if candidate.mean() <= hi:
      mask = candidate
  return mask.astype(np.float32)[..., None]

"""Random inpainting masks (1 = region to fill): boxes and brush strokes, seeded per example."""
from __future__ import annotations

import numpy as np


def random_mask(rng: np.random.Generator, height: int, width: int,
                max_fraction: float = 0.5) -> np.ndarray:
  """(H, W, 1) float32 mask of 1-2 boxes and 1-3 thick strokes, covering roughly 10-50%."""
  mask = np.zeros((height, width), np.float32)
  for _ in range(rng.integers(1, 3)):
    h = rng.integers(height // 8, max(height // 8 + 1, int(height * max_fraction)))
    w = rng.integers(width // 8, max(width // 8 + 1, int(width * max_fraction)))
    top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
    mask[top:top + h, left:left + w] = 1.0
  yy, xx = np.mgrid[:height, :width]
  for _ in range(rng.integers(1, 4)):
    radius = max(1.0, rng.uniform(0.03, 0.08) * min(height, width))
    y, x = rng.uniform(0, height), rng.uniform(0, width)
    for _ in range(rng.integers(3, 8)):
      angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.3) * max(height, width)
      ny = np.clip(y + length * np.sin(angle), 0, height - 1)
      nx = np.clip(x + length * np.cos(angle), 0, width - 1)
      for s in np.linspace(0.0, 1.0, 8):
        cy, cx = y + s * (ny - y), x + s * (nx - x)
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2] = 1.0
      y, x = ny, nx
  return mask[..., None]

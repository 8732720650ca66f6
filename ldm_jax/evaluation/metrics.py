"""Image-quality metrics: PSNR and SSIM (JAX, batched); the Frechet distance, KID, Inception
Score and improved precision/recall of feature sets (numpy, float64)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _to_unit(x):
  """[-1, 1] -> [0, 1], clipped, float32."""
  return jnp.clip((jnp.asarray(x, jnp.float32) + 1.0) / 2.0, 0.0, 1.0)


def psnr(x, y):
  """Per-image PSNR in dB of images in [-1, 1] (computed on [0, 1]): shape (B,)."""
  mse = jnp.mean(jnp.square(_to_unit(x) - _to_unit(y)), axis=(1, 2, 3))
  return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


def _gaussian_window(size: int = 11, sigma: float = 1.5):
  g = np.exp(-((np.arange(size) - (size - 1) / 2) ** 2) / (2 * sigma ** 2))
  return (g / g.sum()).astype(np.float32)


def ssim(x, y, window: int = 11, sigma: float = 1.5):
  """Per-image SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 .01, K2 .03) of
  images in [-1, 1], computed on [0, 1] per channel ('valid' windows) and averaged: (B,)."""
  x, y = _to_unit(x), _to_unit(y)
  window = min(window, x.shape[1], x.shape[2])
  g = jnp.asarray(_gaussian_window(window, sigma))
  c = x.shape[-1]

  def blur(img):  # separable depthwise Gaussian, valid padding
    kh = jnp.tile(g[:, None, None, None], (1, 1, 1, c))
    kw = jnp.tile(g[None, :, None, None], (1, 1, 1, c))
    dn = ("NHWC", "HWIO", "NHWC")
    img = jax.lax.conv_general_dilated(img, kh, (1, 1), "VALID", dimension_numbers=dn,
                                       feature_group_count=c)
    return jax.lax.conv_general_dilated(img, kw, (1, 1), "VALID", dimension_numbers=dn,
                                        feature_group_count=c)

  c1, c2 = 0.01 ** 2, 0.03 ** 2
  mx, my = blur(x), blur(y)
  sxx = blur(x * x) - mx ** 2
  syy = blur(y * y) - my ** 2
  sxy = blur(x * y) - mx * my
  s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
  return jnp.mean(s, axis=(1, 2, 3))


def gaussian_stats(features: np.ndarray):
  """Mean and covariance (float64) of (N, D) features."""
  f = np.asarray(features, np.float64)
  return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), by symmetric eigendecompositions.

  The symmetric form has the same trace as tr((S1 S2)^1/2) and stays real and stable.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
  w, v = np.linalg.eigh(s1)
  root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  m = root1 @ s2 @ root1
  eig = np.linalg.eigvalsh((m + m.T) / 2)
  tr_cross = float(np.sum(np.sqrt(np.clip(eig, 0, None))))
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * tr_cross)


def kid(real: np.ndarray, fake: np.ndarray, *, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
  """Kernel Inception Distance (Binkowski et al. 2018): the unbiased MMD^2 with the cubic
  polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over `subsets` random subsets of
  min(subset_size, N) features of each set. Returns (mean, standard deviation over subsets)."""
  real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
  m = min(subset_size, len(real), len(fake))
  if m < 2:
    raise ValueError("KID needs at least 2 features in each set")
  d = real.shape[1]
  rng = np.random.default_rng(seed)
  values = []
  for _ in range(subsets):
    x = real[rng.choice(len(real), m, replace=False)]
    y = fake[rng.choice(len(fake), m, replace=False)]
    kxx, kyy, kxy = ((a @ b.T / d + 1.0) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    off = m * (m - 1)
    values.append((kxx.sum() - np.trace(kxx)) / off + (kyy.sum() - np.trace(kyy)) / off
                  - 2.0 * kxy.mean())
  return float(np.mean(values)), float(np.std(values))


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
  """Inception Score (Salimans et al. 2016) of (N, classes) logits: exp(E_x KL(p(y|x) || p(y)))
  per split of the samples, as (mean, standard deviation) over the splits."""
  logits = np.asarray(logits, np.float64)
  p = np.exp(logits - logits.max(axis=1, keepdims=True))
  p /= p.sum(axis=1, keepdims=True)
  scores = []
  for part in np.array_split(p, splits):
    marginal = part.mean(axis=0, keepdims=True)
    kl = np.sum(part * (np.log(part + 1e-30) - np.log(marginal + 1e-30)), axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


def _kth_neighbour_radii(features: np.ndarray, k: int, block: int = 4096) -> np.ndarray:
  """Distance of each feature to its k-th nearest other feature of the same set."""
  sq = np.sum(features ** 2, axis=1)
  radii = np.empty(len(features))
  for start in range(0, len(features), block):
    rows = features[start:start + block]
    d2 = np.maximum(sq[start:start + block, None] + sq[None] - 2.0 * rows @ features.T, 0.0)
    radii[start:start + block] = np.sqrt(np.partition(d2, k, axis=1)[:, k])  # [:, 0] is self
  return radii


def _inside(points: np.ndarray, centres: np.ndarray, radii: np.ndarray,
            block: int = 4096) -> np.ndarray:
  """Whether each point lies within radius of some centre (the k-NN manifold estimate)."""
  sq = np.sum(centres ** 2, axis=1)
  out = np.empty(len(points), bool)
  for start in range(0, len(points), block):
    rows = points[start:start + block]
    d2 = np.sum(rows ** 2, axis=1)[:, None] + sq[None] - 2.0 * rows @ centres.T
    out[start:start + block] = np.any(np.sqrt(np.maximum(d2, 0.0)) <= radii[None], axis=1)
  return out


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
  """Improved precision and recall (Kynkaanniemi et al. 2019): precision is the fraction of
  fake features inside the real manifold (balls reaching each real feature's k-th nearest real
  neighbour), recall the fraction of real features inside the fake manifold."""
  real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
  if min(len(real), len(fake)) <= k:
    raise ValueError(f"precision/recall with k={k} needs more than {k} features per set")
  precision = _inside(fake, real, _kth_neighbour_radii(real, k)).mean()
  recall = _inside(real, fake, _kth_neighbour_radii(fake, k)).mean()
  return float(precision), float(recall)

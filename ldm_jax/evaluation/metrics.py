"""Image-quality metrics: PSNR and SSIM (JAX, batched), and the Frechet distance (numpy)."""
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

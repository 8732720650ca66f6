"""Low-resolution inputs for super-resolution training: bicubic, or a BSR-style random chain.

'bicubic' is the SR3 / LDM-SR setting: the image downsampled with PIL's antialiased bicubic
filter. 'bsr' follows the idea of BSRGAN's degradation model (Zhang et al. 2021) that the
paper's LDM-BSR uses: a random chain of blurs, resizings, noises and JPEG re-compression in a
shuffled order, so a model trained on it upscales real, messy low-resolution photos. Each
operation of the chain, with the ranges drawn from (all per example, from the example's rng):

  blur (twice)    p=0.9 each: isotropic Gaussian, sigma ~ U(0.2, 1.0 + 0.25 * factor), or
                  (half the time) anisotropic: sigmas ~ U(0.2, 1.0 + 0.5 * factor) each, rotated
                  by ~ U(0, pi); kernel 2 * ceil(3 sigma_max) + 1 pixels, at most 21
  resize          p=0.5: by ~ U(0.5, 1.5) of the current size, mode ~ {bilinear, bicubic, box}
  gaussian noise  p=0.8: sigma ~ U(1, 20) / 255, colour (per channel) or grey with equal odds
  poisson noise   p=0.3: counts at 10 ** U(2, 4) photons per unit intensity
  jpeg            p=0.7: quality ~ U{30, ..., 95}

then the final resize to the target size (mode ~ {bilinear, bicubic, box}) and, with p=0.5, a
last JPEG (quality 30-95). Only the blur widths scale, with the downsampling factor; the rest
are absolute. Everything runs on the host in numpy/PIL/scipy (the pipeline's workers).

`back_project` goes the other way: it makes an upscaled image consistent with its input under
the 'bicubic' degradation (sample.py's upscale task applies it to LDM-SR outputs).
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image
from scipy import signal

from ldm_jax.data.preprocess import to_float, to_uint8

DEGRADATIONS = ("bicubic", "bsr")
_MODES = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC, Image.Resampling.BOX)


def _pil(u8: np.ndarray) -> Image.Image:
  return Image.fromarray(u8[..., 0] if u8.shape[-1] == 1 else u8)


def _array(pil: Image.Image) -> np.ndarray:
  a = np.asarray(pil)
  return a[..., None] if a.ndim == 2 else a


def _resize(x: np.ndarray, h: int, w: int, mode) -> np.ndarray:
  """Float HWC (any range) -> (h, w), through PIL in float mode per channel (no 8-bit
  rounding)."""
  chans = [np.asarray(Image.fromarray(x[..., c].astype(np.float32), mode="F").resize((w, h), mode))
           for c in range(x.shape[-1])]
  return np.stack(chans, axis=-1)


def bicubic(image: np.ndarray, size: int) -> np.ndarray:
  """A uint8 or float [-1, 1] image -> float [-1, 1] (size, size), PIL's antialiased bicubic."""
  u8 = image if image.dtype == np.uint8 else to_uint8(image)
  return to_float(_array(_pil(u8).resize((size, size), Image.Resampling.BICUBIC)))


def gaussian_kernel(sigma_x: float, sigma_y: float, theta: float, max_size: int = 21):
  """A normalised 2-D Gaussian kernel with axis sigmas (sigma_x, sigma_y) rotated by theta."""
  radius = min(max_size // 2, int(np.ceil(3 * max(sigma_x, sigma_y))))
  yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1].astype(np.float64)
  c, s = np.cos(theta), np.sin(theta)
  u, v = c * xx + s * yy, -s * xx + c * yy
  k = np.exp(-0.5 * ((u / sigma_x) ** 2 + (v / sigma_y) ** 2))
  return (k / k.sum()).astype(np.float32)


def _blur(x, rng, factor):
  if rng.random() < 0.5:
    s = rng.uniform(0.2, 1.0 + 0.25 * factor)
    k = gaussian_kernel(s, s, 0.0)
  else:
    hi = 1.0 + 0.5 * factor
    k = gaussian_kernel(rng.uniform(0.2, hi), rng.uniform(0.2, hi), rng.uniform(0, np.pi))
  return convolve_reflect(x, k)


def convolve_reflect(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
  """HWC `x` convolved per channel with an odd square `kernel`, edges mirrored: the values of
  scipy.ndimage.convolve(mode='reflect'), through an FFT, which is 4x faster at 32 px with
  the chain's 21-tap kernels (the blurs were half of the chain's host time)."""
  r = kernel.shape[0] // 2
  padded = np.pad(x, ((r, r), (r, r), (0, 0)), mode="symmetric")
  return signal.fftconvolve(padded, kernel[..., None], mode="valid", axes=(0, 1)).astype(
      np.float32)


def _random_resize(x, rng, factor):
  del factor
  scale = rng.uniform(0.5, 1.5)
  h, w = (max(2, int(round(d * scale))) for d in x.shape[:2])
  return _resize(x, h, w, _MODES[rng.integers(len(_MODES))])


def _gaussian_noise(x, rng, factor):
  del factor
  sigma = rng.uniform(1, 20) / 255
  shape = x.shape if rng.random() < 0.5 else x.shape[:2] + (1,)
  return x + rng.normal(0.0, sigma, shape).astype(np.float32)


def _poisson_noise(x, rng, factor):
  del factor
  photons = 10 ** rng.uniform(2, 4)
  return (rng.poisson(np.clip(x, 0, 1) * photons) / photons).astype(np.float32)


def _jpeg(x, rng, factor=None):
  del factor
  buf = io.BytesIO()
  _pil(to_uint8(np.clip(x, 0, 1) * 2 - 1)).save(buf, format="JPEG",
                                                quality=int(rng.integers(30, 96)))
  return _array(Image.open(io.BytesIO(buf.getvalue()))).astype(np.float32) / 255


# (operation, probability); the chain applies them in a random order.
_CHAIN = ((_blur, 0.9), (_blur, 0.9), (_random_resize, 0.5), (_gaussian_noise, 0.8),
          (_poisson_noise, 0.3), (_jpeg, 0.7))


def back_project(upscaled: np.ndarray, lowres: np.ndarray, iterations: int = 3) -> np.ndarray:
  """Iterative back-projection (Irani & Peleg 1991): float [-1, 1] `upscaled` (H, W) plus the
  bicubic upsampling of its residual against `lowres` (h, w) under the 'bicubic' degradation,
  `iterations` times, so that its antialiased bicubic downsample approaches `lowres` while the
  detail above the input's band is kept. Clipped to [-1, 1] at the end."""
  y, x = np.asarray(lowres, np.float32), np.asarray(upscaled, np.float32)
  (h, w), (big_h, big_w) = y.shape[:2], x.shape[:2]
  cubic = Image.Resampling.BICUBIC
  for _ in range(iterations):
    x = x + _resize(y - _resize(x, h, w, cubic), big_h, big_w, cubic)
  return np.clip(x, -1.0, 1.0)


def bsr(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  """A uint8 or float [-1, 1] image -> a randomly degraded float [-1, 1] (size, size) version
  (see the module docstring for the chain and its ranges)."""
  x = (image.astype(np.float32) / 255 if image.dtype == np.uint8
       else (np.asarray(image, np.float32) + 1) / 2)
  factor = max(1.0, x.shape[0] / size)
  for i in rng.permutation(len(_CHAIN)):
    op, p = _CHAIN[i]
    if rng.random() < p:
      x = op(x, rng, factor)
  x = np.clip(_resize(x, size, size, _MODES[rng.integers(len(_MODES))]), 0, 1)
  if rng.random() < 0.5:
    x = _jpeg(x, rng)
  return np.clip(x, 0, 1) * 2 - 1


def degrade(kind: str, image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  """The low-resolution input of `image` under degradation `kind` (cond.degradation)."""
  if kind == "bicubic":
    return bicubic(image, size)
  if kind == "bsr":
    return bsr(image, size, rng)
  raise ValueError(f"cond.degradation: unknown '{kind}' (known: {', '.join(DEGRADATIONS)})")

"""Low-resolution inputs: bicubic matches PIL, the BSR chain is seeded, varied and blurs;
back-projection makes an upscale consistent with its input and keeps its detail."""
import numpy as np
import pytest
from PIL import Image

from ldm_jax.data import degradations
from ldm_jax.data.conditions import check_cacheable
from ldm_jax.errors import ConfigError
from tests.conftest import load_config
from tests.helpers import pil_bicubic


def _photo(size=32, seed=0):
  """A smooth colour image with some edges (uint8)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size] / size
  base = np.stack([np.sin(6 * xx + rng.uniform(0, 3)), np.cos(5 * yy), xx * yy], -1)
  base[size // 3:size // 2, :] = 1.0
  return np.clip((base + 1) * 127.5, 0, 255).astype(np.uint8)


def test_bicubic_is_pils_antialiased_bicubic():
  image = _photo()
  expected = np.asarray(Image.fromarray(image).resize((8, 8), Image.Resampling.BICUBIC))
  got = degradations.bicubic(image, 8)
  np.testing.assert_allclose((got + 1) * 127.5, expected, atol=1e-3)


def test_bsr_is_a_function_of_its_seed_and_varies_across_seeds():
  image = _photo()
  a = degradations.bsr(image, 8, np.random.default_rng(1))
  b = degradations.bsr(image, 8, np.random.default_rng(1))
  np.testing.assert_array_equal(a, b)
  outs = [degradations.bsr(image, 8, np.random.default_rng(s)) for s in range(8)]
  assert all(o.shape == (8, 8, 3) and o.dtype == np.float32 for o in outs)
  assert all(-1 <= o.min() and o.max() <= 1 for o in outs)
  spread = np.std(np.stack(outs), axis=0).mean()
  assert spread > 0.02, "the chain should differ from seed to seed"
  # ...while staying a degraded version of the same picture, close to its bicubic downsample.
  bic = degradations.bicubic(image, 8)
  assert np.mean([np.abs(o - bic).mean() for o in outs]) < 0.25


def test_gaussian_kernels_are_normalised_and_anisotropic_ones_rotate():
  iso = degradations.gaussian_kernel(1.5, 1.5, 0.0)
  assert iso.sum() == pytest.approx(1.0, abs=1e-6)
  np.testing.assert_allclose(iso, iso.T, atol=1e-7)
  wide = degradations.gaussian_kernel(3.0, 0.5, 0.0)          # long along x
  turned = degradations.gaussian_kernel(3.0, 0.5, np.pi / 2)  # long along y
  np.testing.assert_allclose(wide, turned.T, atol=1e-6)
  assert wide[wide.shape[0] // 2].sum() > wide[:, wide.shape[1] // 2].sum()


def test_blur_step_smooths_an_edge():
  x = np.zeros((16, 16, 1), np.float32)
  x[:, 8:] = 1.0
  blurred = degradations._blur(x, np.random.default_rng(0), 4.0)  # pylint: disable=protected-access
  assert 0.05 < blurred[8, 7, 0] < 0.95 and blurred.sum() == pytest.approx(x.sum(), rel=1e-4)


def test_bsr_refuses_a_latent_cache_naming_the_field():
  c = load_config("tiny_ldm", "lowres")
  c.cond.degradation = "bsr"
  with pytest.raises(ConfigError, match="cond.degradation='bsr'"):
    check_cacheable(c.cond)
  c.cond.degradation = "bicubic"
  check_cacheable(c.cond)


@pytest.mark.parametrize("size", [32, 16, 5])   # 5 px: the padding wraps more than once
def test_convolve_reflect_matches_scipy_ndimage(size):
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(size)
  x = rng.random((size, size, 3)).astype(np.float32)
  k = degradations.gaussian_kernel(3.0, 0.7, 0.4)
  want = np.stack([ndimage.convolve(x[..., c], k, mode="reflect") for c in range(3)], -1)
  np.testing.assert_allclose(degradations.convolve_reflect(x, k), want, atol=1e-6)


def test_back_projection_makes_the_upscale_consistent_and_keeps_its_detail():
  high = _photo().astype(np.float32) / 127.5 - 1
  low = degradations.bicubic(_photo(), 8)
  rng = np.random.default_rng(0)
  # An upscale whose colours are off (a low-frequency error) plus detail of its own.
  detail = 0.1 * np.where((np.indices((32, 32)).sum(0) % 2)[..., None] == 0, 1.0, -1.0)
  upscaled = np.clip(0.7 * high + 0.2 + detail + 0.02 * rng.normal(size=high.shape), -1, 1)
  before = np.abs(pil_bicubic(upscaled, 8, 8) - low).mean()
  fixed = degradations.back_project(upscaled, low, iterations=3)
  after = np.abs(pil_bicubic(fixed, 8, 8) - low).mean()
  assert after < 0.1 * before, (before, after)
  # The checkerboard lies above the 8 px band: back-projection leaves most of it.
  sign = np.sign(detail[..., 0])
  kept = ((fixed - pil_bicubic(fixed, 8, 8).repeat(4, 0).repeat(4, 1)).mean(-1) * sign).mean()
  assert kept > 0.05, kept
  np.testing.assert_array_equal(degradations.back_project(upscaled, low, iterations=0),
                                upscaled.astype(np.float32))

"""Seamless inpainting composites: the harmonic correction solves the Laplace equation (checked
against a plain Jacobi iteration and on a linear ramp), and the known pixels stay the input's."""
import numpy as np

from ldm_jax import compositing


def _jacobi(residual, fill, iterations=20000):
  """The same problem by fixed-point iteration; 'edge' padding is the mirror border."""
  h = np.where(fill[..., None], 0.0, residual)
  for _ in range(iterations):
    p = np.pad(h, ((1, 1), (1, 1), (0, 0)), mode="edge")
    mean = (p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:]) / 4
    h = np.where(fill[..., None], mean, residual)
  return h


def test_correction_matches_jacobi_on_a_mask_touching_the_border():
  rng = np.random.default_rng(0)
  residual = rng.normal(size=(12, 10, 3))
  fill = np.zeros((12, 10), bool)
  fill[2:7, 3:9] = True
  fill[8:, :4] = True          # reaches two image borders
  got = compositing.harmonic_correction(residual, fill)
  np.testing.assert_allclose(got, _jacobi(residual, fill), atol=1e-4)
  np.testing.assert_array_equal(got[~fill], residual[~fill].astype(np.float32))


def test_a_linear_residual_is_continued_exactly_into_an_interior_hole():
  yy, xx = np.mgrid[:16, :16].astype(np.float64)
  ramp = np.stack([0.03 * xx - 0.02 * yy, 0.01 * yy, np.full_like(xx, 0.2)], -1)
  fill = np.zeros((16, 16), bool)
  fill[4:12, 3:13] = True
  np.testing.assert_allclose(compositing.harmonic_correction(ramp, fill), ramp, atol=1e-5)


def test_composite_keeps_the_known_pixels_and_removes_a_colour_shift():
  rng = np.random.default_rng(1)
  image = np.clip(rng.normal(0, 0.3, (16, 16, 3)), -1, 1).astype(np.float32)
  mask = np.zeros((16, 16, 1), np.float32)
  mask[5:11, 5:11] = 1.0
  texture = 0.05 * rng.normal(size=image.shape).astype(np.float32)
  generated = np.clip(image + texture + 0.4, -1, 1)     # the image's content, too bright
  for seamless in (True, False):
    out = compositing.composite(image, generated, mask, seamless)
    np.testing.assert_array_equal(out[mask[..., 0] == 0], image[mask[..., 0] == 0])
  pasted = compositing.composite(image, generated, mask, seamless=False)
  np.testing.assert_array_equal(pasted, mask * generated + (1 - mask) * image)
  inside = mask[..., 0] == 1
  error = lambda x: np.abs(x - image)[inside].mean()  # noqa: E731
  assert error(compositing.composite(image, generated, mask)) < 0.3 * error(pasted)


def test_a_mask_over_the_whole_image_gets_no_correction():
  residual = np.ones((4, 4, 3), np.float32)
  np.testing.assert_allclose(
      compositing.harmonic_correction(residual, np.ones((4, 4), bool)), 0.0, atol=1e-6)

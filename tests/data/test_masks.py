"""Inpainting masks: seeded, in the configured coverage band, with strokes of both widths and
boxes, and the band checked at config time."""
import numpy as np
import pytest

from ldm_jax import config as config_lib
from ldm_jax.data import masks
from ldm_jax.errors import ConfigError
from tests.conftest import load_config


def test_masks_are_seeded_and_their_coverage_lies_in_the_band():
  a = masks.random_mask(np.random.default_rng(3), 64, 64, (0.4, 0.5))
  np.testing.assert_array_equal(a, masks.random_mask(np.random.default_rng(3), 64, 64,
                                                     (0.4, 0.5)))
  for lo, hi in ((0.1, 0.2), (0.4, 0.5), (0.2, 0.6)):
    cover = [masks.random_mask(np.random.default_rng(s), 64, 64, (lo, hi)).mean()
             for s in range(40)]
    assert min(cover) >= lo - 0.01 and max(cover) <= hi, (lo, hi, min(cover), max(cover))
    assert np.std(cover) > 0.005                         # the target varies within the band


def test_shapes_include_thick_and_thin_strokes_and_boxes():
  rng = np.random.default_rng(0)
  thick = masks._stroke(rng, 128, 128, (0.04, 0.09), (2, 6))   # pylint: disable=protected-access
  thin = masks._stroke(rng, 128, 128, (0.01, 0.03), (3, 9))    # pylint: disable=protected-access
  box = masks._box(rng, 128, 128)                              # pylint: disable=protected-access
  # Area per unit of stroke length ~ the width: a thick stroke is several times wider.
  def width(m):
    from scipy import ndimage  # pylint: disable=g-import-not-at-top
    skeleton_len = max(1, (m & ~ndimage.binary_erosion(m)).sum() / 2)
    return m.sum() / skeleton_len
  assert width(thick) > 2 * width(thin)
  rows, cols = np.flatnonzero(box.any(1)), np.flatnonzero(box.any(0))
  assert box.sum() == len(rows) * len(cols)                    # a filled rectangle


def test_a_bad_coverage_band_names_the_field():
  c = load_config("tiny_ldm", "inpaint")
  c.cond.mask_coverage = (0.6, 0.3)
  with pytest.raises(ConfigError, match="cond.mask_coverage"):
    config_lib.validate(c)

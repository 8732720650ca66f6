"""Host-side conditioning routes: spatial conditions stay aligned with their image through
random crops and flips, and latent-cache entries flip latent and conditions together."""
import ml_collections
import numpy as np

from ldm_jax import config as config_lib
from ldm_jax.data import conditions


def seg_config(size=32, resize_mode="short_side"):
  c = config_lib.defaults("ldm")
  c.unlock()
  c.data.image_size, c.data.resize_mode = size, resize_mode
  c.data.random_crop = c.data.random_flip = True
  c.cond.type, c.cond.concat, c.cond.seg_classes = "concat", "segmentation", 4
  return c


def map_of(image):
  """A segmentation derived from the image itself: the red channel in four bands."""
  return (image[..., 0].astype(np.int32) * 4) // 256


def test_segmentation_map_follows_its_image_through_crop_and_flip():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (32, 57, 3), np.uint8)   # short side = size: crops, no resize
  fn = conditions.route_example_fn(seg_config(), train=True, latent_size=8)
  offsets, flips = set(), 0
  for seed in range(40):
    out = fn({"image": image, "segmentation": map_of(image)}, np.random.default_rng(seed))
    pixels = out["image"]   # uint8 until the device
    np.testing.assert_array_equal(out["segmentation"], map_of(pixels))
    # Where the crop came from, and whether it was flipped, read off the output.
    for left in range(57 - 32 + 1):
      window = image[:, left:left + 32]
      if np.array_equal(pixels, window):
        offsets.add(left)
      elif np.array_equal(pixels, window[:, ::-1]):
        offsets.add(left)
        flips += 1
  assert len(offsets) > 5 and 5 < flips < 35   # crops and flips really happened


def test_segmentation_map_stays_aligned_when_the_image_is_resized():
  rng = np.random.default_rng(1)
  blocks = rng.integers(0, 4, (6, 9))
  labels = np.kron(blocks, np.ones((8, 8), np.int64))           # 48 x 72, 8-px blocks
  image = np.repeat((labels * 64 + 32).astype(np.uint8)[..., None], 3, axis=-1)
  fn = conditions.route_example_fn(seg_config(size=24), train=True, latent_size=6)
  for seed in range(10):
    out = fn({"image": image, "segmentation": labels}, np.random.default_rng(seed))
    recovered = np.clip(np.round((out["image"][..., 0].astype(np.float32) - 32) / 64), 0, 3)
    # Bicubic image vs nearest map: they agree away from the block edges.
    assert np.mean(recovered == out["segmentation"]) > 0.85


def test_cached_entries_flip_latent_and_conditions_together():
  latent = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
  lowres = np.arange(2 * 3, dtype=np.float32).reshape(2, 3, 1)
  example = {"latent": latent, "lowres": lowres, "label": 3}
  seen = set()
  for seed in range(20):
    out = conditions.cached_example(example, np.random.default_rng(seed), flip=True)
    flipped = not np.array_equal(out["latent"], latent)
    seen.add(flipped)
    want = (latent[:, ::-1], lowres[:, ::-1]) if flipped else (latent, lowres)
    np.testing.assert_array_equal(out["latent"], want[0])
    np.testing.assert_array_equal(out["lowres"], want[1])
    assert out["label"] == 3
  assert seen == {True, False}


def test_routes_are_named_by_context_and_concat():
  cond = ml_collections.ConfigDict({"type": "hybrid", "context": "text", "concat": "inpaint"})
  assert conditions.context_kind(cond) == "text" and conditions.concat_kind(cond) == "inpaint"
  cond.type = "adm"
  assert conditions.context_kind(cond) == "" and conditions.needs_labels(cond)

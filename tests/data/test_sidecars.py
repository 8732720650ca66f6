"""Sidecar conditions of an image folder: captions, masks, segmentation maps and boxes load, and
stay aligned with their image through resize, random crop and flip."""
import json

import numpy as np
import pytest
from PIL import Image

from ldm_jax import config as config_lib
from ldm_jax.data import preprocess, sidecars, sources
from ldm_jax.errors import BadImageError, DataError


def _save(path, array):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


def _half_white(h, w):
  """An image whose left half is white (and right half black), its mask and its label map."""
  image = np.zeros((h, w, 3), np.uint8)
  image[:, :w // 2] = 255
  mask = np.zeros((h, w), np.uint8)
  mask[:, :w // 2] = 255            # nonzero = region to fill
  labels = np.where(mask > 0, 7, 2).astype(np.uint8)
  return image, mask, labels


def _folder(tmp_path, shapes=((32, 48), (48, 72))):
  for i, (h, w) in enumerate(shapes):
    image, mask, labels = _half_white(h, w)
    _save(tmp_path / "images" / "train" / f"{i}.jpg", image)
    _save(tmp_path / "masks" / "train" / f"{i}.png", mask)
    _save(tmp_path / "labels" / "train" / f"{i}.png", labels)
  c = config_lib.defaults("autoencoder")
  c.data.source, c.data.path = "image_folder", str(tmp_path / "images")
  c.data.mask_dir, c.data.segmentation_dir = str(tmp_path / "masks"), str(tmp_path / "labels")
  return c.data


def test_masks_and_segmentation_follow_crops_and_flips(tmp_path):
  src = sources.open_source(_folder(tmp_path), "train")
  assert "masks" in src.description and "segmentation maps" in src.description
  flipped = set()
  for i in range(len(src)):
    ex = src[i]
    assert ex["mask"].dtype == np.uint8 and set(np.unique(ex["mask"])) == {0, 1}
    assert ex["segmentation"].dtype == np.int32 and ex["mask"].shape == ex["image"].shape[:2]
    for seed in range(8):
      out = preprocess.preprocess_image(
          ex["image"], np.random.default_rng(seed), size=32, random_flip=True,
          aligned={"mask": ex["mask"], "segmentation": ex["segmentation"]})
      white = out["image"].mean(-1) > 0
      mask, seg = out["mask"] == 1, out["segmentation"]
      assert out["mask"].dtype == np.uint8 and seg.dtype == np.int32
      np.testing.assert_array_equal(seg, np.where(mask, 7, 2))
      if i == 0:   # 32 high: cropped, not resampled, so exactly the white pixels
        np.testing.assert_array_equal(mask, white)
      else:        # resampled: the one column on the edge may be grey
        assert (mask != white).sum(axis=1).max() <= 1
      assert 0 < mask.sum() < mask.size   # the crop holds part of each half
      flipped.add(bool(mask[0, -1]))
      # The maps do not change the image, nor the RNG draws it gets.
      alone = preprocess.preprocess_image(ex["image"], np.random.default_rng(seed), size=32,
                                          random_flip=True)
      np.testing.assert_array_equal(alone, out["image"])
  assert flipped == {True, False}


def test_old_single_map_form_still_works():
  image, _, labels = _half_white(32, 48)
  got_image, got_seg = preprocess.preprocess_image(image, np.random.default_rng(3), size=16,
                                                   random_flip=True, aligned=labels[..., None])
  new = preprocess.preprocess_image(image, np.random.default_rng(3), size=16, random_flip=True,
                                    aligned={"segmentation": labels}, uint8=True)
  np.testing.assert_array_equal(got_seg, new["segmentation"])
  assert got_seg.dtype == np.int32 and new["image"].dtype == np.uint8
  assert list(preprocess.preprocess_image(image, np.random.default_rng(3), size=16,
                                          aligned={})) == ["image"]
  np.testing.assert_array_equal(preprocess.to_uint8(got_image), new["image"])
  with pytest.raises(DataError, match="mask map"):
    preprocess.preprocess_image(image, np.random.default_rng(0), size=16,
                                aligned={"mask": labels[:5]})


def test_mask_errors_name_both_files(tmp_path):
  data = _folder(tmp_path, shapes=((32, 48), (32, 48)))
  _save(tmp_path / "masks" / "train" / "1.png", np.zeros((10, 10), np.uint8))
  src = sources.open_source(data, "train")
  with pytest.raises(DataError, match=r"data.mask_dir: mask '.*1.png' is 10x10 but image "
                     r"'.*1.jpg' is 48x32"):
    src[1]
  # A damaged sidecar is a bad file like a damaged image (data.on_bad_image applies).
  (tmp_path / "labels" / "train" / "0.png").write_bytes(b"\x89PNG broken")
  with pytest.raises(BadImageError, match=r"data.segmentation_dir: cannot decode") as bad:
    src[0]
  assert bad.value.path.endswith("0.png")
  (tmp_path / "labels" / "train" / "0.png").unlink()
  with pytest.raises(DataError, match=r"data.segmentation_dir: no segmentation map '.*0.png'"):
    src[0]
  data.mask_dir = str(tmp_path / "nowhere")
  with pytest.raises(DataError, match=r"data.mask_dir: folder '.*nowhere.train' does not"):
    sources.open_source(data, "train")


def _bright_rectangle(h, w, box):
  image = np.full((h, w, 3), 20, np.uint8)
  x0, y0, x1, y1 = box
  image[y0:y1, x0:x1] = 240
  return image


@pytest.mark.parametrize("mode", ["short_side", "pad", "stretch"])
def test_boxes_enclose_their_object_after_crop_and_flip(tmp_path, mode):
  box = (30, 10, 50, 30)   # pixels 30..49 x 10..29; (x1, y1) exclusive
  _save(tmp_path / "a.png", _bright_rectangle(40, 64, box))
  boxes = {"boxes": [{"class": 3, "box": list(box)}, {"class": 5, "box": [0, 0, 4, 4]}]}
  (tmp_path / "a.json").write_text(json.dumps(boxes))
  _save(tmp_path / "b.png", _bright_rectangle(40, 64, box))   # no box file: no boxes
  (tmp_path / "b.json").write_text('{"url": "metadata of another tool"}')
  src = sources.ImageFolderSource(str(tmp_path))
  ex = src[0]
  np.testing.assert_array_equal(ex["boxes"], [box, [0, 0, 4, 4]])
  np.testing.assert_array_equal(ex["box_classes"], [3, 5])
  assert src[1]["boxes"].shape == (0, 4)
  corner_kept = set()
  for seed in range(20):
    out = preprocess.preprocess_image(ex["image"], np.random.default_rng(seed), size=32,
                                      resize_mode=mode, random_flip=True, boxes=ex["boxes"],
                                      box_classes=ex["box_classes"], max_boxes=4)
    assert out["boxes"].shape == (4, 4) and out["boxes"].dtype == np.float32
    classes = list(out["box_classes"])
    rows = np.argwhere(out["image"].mean(-1) > 0.0)
    b = out["boxes"][classes.index(3)] * 32
    assert b[0] < b[2] and b[1] < b[3]
    # The box encloses the bright pixels (within the resampling blur) and no more.
    lo, hi = rows.min(0), rows.max(0) + 1
    np.testing.assert_allclose([b[1], b[0], b[3], b[2]], [lo[0], lo[1], hi[0], hi[1]], atol=1)
    assert classes.count(-1) >= 2 and np.all(out["boxes"][np.array(classes) == -1] == 0)
    corner_kept.add(5 in classes)
  # The corner box is cropped away by some short_side crops, always by pad's centre crop.
  assert corner_kept == {"short_side": {True, False}, "pad": {False}, "stretch": {True}}[mode]


def test_boxes_cut_to_max_boxes_and_dropped_outside():
  image = np.zeros((32, 32, 3), np.uint8)
  boxes = np.array([[0, 0, 8, 8], [40, 0, 50, 8], [4, 4, 12, 12], [1, 1, 2, 2]], np.float32)
  out = preprocess.preprocess_image(image, np.random.default_rng(0), size=16,
                                    resize_mode="pad", boxes=boxes,
                                    box_classes=np.array([0, 1, 2, 3]), max_boxes=2)
  # pad crops the centre 16x16 (offset 8): box 0 is outside, 1 is outside the image.
  np.testing.assert_array_equal(out["box_classes"], [2, -1])
  np.testing.assert_allclose(out["boxes"][0], [0, 0, 4 / 16, 4 / 16])


def test_captions_from_txt_and_jsonl(tmp_path, monkeypatch):
  for name in ("cat/1.jpg", "cat/2.jpg", "dog/1.jpg"):
    _save(tmp_path / name, np.zeros((4, 4, 3), np.uint8))
  (tmp_path / "cat" / "1.txt").write_text("  a sleepy cat \n")
  (tmp_path / "captions.jsonl").write_text(
      '{"file": "cat/1.jpg", "caption": "overridden by 1.txt"}\n\n'
      '{"file": "./dog/1.jpg", "caption": "a dog"}\n')
  src = sources.ImageFolderSource(str(tmp_path), index_dir=str(tmp_path / "index"))
  assert src.classes == ["cat", "dog"]
  assert [src[i]["caption"] for i in range(3)] == ["a sleepy cat", "", "a dog"]
  # Captions come from the index: no image decoded, no file read; slices too.
  reused = sources.ImageFolderSource(str(tmp_path), index_dir=str(tmp_path / "index"))
  monkeypatch.setattr(sidecars, "read_bytes", None)
  assert [reused.caption(i) for i in range(3)] == ["a sleepy cat", "", "a dog"]
  assert sources.Subset(reused, 2, 3).caption(0) == "a dog"
  assert sources.ArraySource(np.zeros((1, 2, 2, 3), np.uint8), captions=["x"]).caption(0) == "x"


def test_bad_sidecar_files_are_data_errors_naming_the_file(tmp_path):
  _save(tmp_path / "a.png", np.zeros((4, 4, 3), np.uint8))
  (tmp_path / "captions.jsonl").write_text('{"file": "a.png", "caption": "ok"}\n{"file": 3}\n')
  with pytest.raises(DataError, match=r"'.*captions.jsonl' line 2 needs string fields"):
    sources.ImageFolderSource(str(tmp_path))
  (tmp_path / "captions.jsonl").write_text("{not json\n")
  with pytest.raises(DataError, match=r"'.*captions.jsonl' line 1 is not JSON"):
    sources.ImageFolderSource(str(tmp_path))
  (tmp_path / "captions.jsonl").unlink()
  (tmp_path / "a.json").write_text('{"boxes": [{"class": 1, "box": [5, 0, 2, 3]}]}')
  with pytest.raises(DataError, match=r"box file '.*a.json': box 0 .* needs x0 < x1"):
    sources.ImageFolderSource(str(tmp_path))
  (tmp_path / "a.json").write_text('{"boxes": [{"box": [0, 0, 2, 3]}]}')
  with pytest.raises(DataError, match=r"box file '.*a.json': box 0 needs a 'class'"):
    sources.ImageFolderSource(str(tmp_path))
  (tmp_path / "a.json").write_text("{")
  with pytest.raises(DataError, match=r"box file '.*a.json' is not JSON"):
    sources.ImageFolderSource(str(tmp_path))
  (tmp_path / "a.json").unlink()
  (tmp_path / "a.txt").write_bytes(b"\xff\xfe caption")
  with pytest.raises(DataError, match=r"caption file '.*a.txt' is not UTF-8"):
    sources.ImageFolderSource(str(tmp_path))

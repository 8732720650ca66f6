"""Example sources on real data: the CIFAR-10 JPEG folder tree, MNIST IDX files, tfds."""
import gzip

import numpy as np
import pytest
from PIL import Image

from ldm_jax import config as config_lib
from ldm_jax.data import sources
from ldm_jax.data.sources import DataError
from tests.helpers import CAPTIONED_DIGITS, NUMBER_WORDS, captioned_digits_tfds


def test_image_folder_with_class_subfolders(cifar_folder):
  src = sources.ImageFolderSource(str(cifar_folder / "train"))
  assert len(src) == 200
  assert src.classes == sorted(["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                "horse", "ship", "truck"])
  assert src.num_classes == 10
  ex = src[0]
  assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
  assert ex["label"] == 0
  assert src[199]["label"] == 9
  grey = sources.ImageFolderSource(str(cifar_folder / "train"), channels=1)
  assert grey[0]["image"].shape == (32, 32, 1)


def test_flat_folder_of_any_sizes(tmp_path):
  rng = np.random.default_rng(0)
  for i, (h, w) in enumerate([(40, 60), (100, 30), (17, 17)]):
    Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(tmp_path / f"{i}.png")
  (tmp_path / "notes.txt").write_text("not an image")
  src = sources.ImageFolderSource(str(tmp_path))
  assert len(src) == 3 and src.num_classes == 0
  assert src[1]["image"].shape == (100, 30, 3)
  assert "label" not in src[0]


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
  with pytest.raises(DataError, match=r"data.path: image folder '.*nowhere' does not exist"):
    sources.ImageFolderSource(str(tmp_path / "nowhere"))
  (tmp_path / "empty" / "class_a").mkdir(parents=True)
  with pytest.raises(DataError, match=r"data.path: no images .* found under '.*empty'"):
    sources.ImageFolderSource(str(tmp_path / "empty"))


def test_unreadable_image_names_the_file(tmp_path):
  (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
  src = sources.ImageFolderSource(str(tmp_path))
  with pytest.raises(DataError, match=r"cannot read image '.*broken.jpg'"):
    src[0]


def test_mnist_idx_files(shared_data):
  src = sources.mnist_source(str(shared_data / "mnist"), "t10k")
  assert len(src) == 10_000 and src.num_classes == 10
  assert [src[i]["label"] for i in range(10)] == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
  image = src[0]["image"]
  assert image.shape == (28, 28, 1) and image.max() == 255 and image[0, 0, 0] == 0


def test_packaged_mnist_equals_the_shared_files(shared_data):
  packaged = sources.mnist_source(sources.packaged_mnist_dir(), "t10k")
  shared = sources.mnist_source(str(shared_data / "mnist"), "t10k")
  np.testing.assert_array_equal(packaged.images, shared.images)
  np.testing.assert_array_equal(packaged.labels, shared.labels)


def test_truncated_idx_file(tmp_path, shared_data):
  data = gzip.open(shared_data / "mnist" / "t10k-images-idx3-ubyte.gz").read()
  bad = tmp_path / "t10k-images-idx3-ubyte.gz"
  bad.write_bytes(gzip.compress(data[:5000]))
  with pytest.raises(DataError, match="truncated"):
    sources.read_idx(str(bad))
  with pytest.raises(DataError, match=r"has no .*t10k-labels-idx1-ubyte.gz"):
    sources.mnist_source(str(tmp_path), "t10k")


@pytest.mark.parametrize("split,expected", [
    ("t10k", (0, 10_000)), ("t10k[:9000]", (0, 9000)), ("t10k[9000:]", (9000, 10_000)),
    ("t10k[:-1000]", (0, 9000)), ("t10k[10%:20%]", (1000, 2000)),
])
def test_split_slices(split, expected):
  c = config_lib.defaults("autoencoder")
  c.data.source = "packaged_mnist"
  c.data.channels = 1
  src = sources.open_source(c.data, split)
  assert len(src) == expected[1] - expected[0]
  full = sources.open_source(c.data, "t10k")
  np.testing.assert_array_equal(src[0]["image"], full[expected[0]]["image"])


def test_bad_splits():
  c = config_lib.defaults("autoencoder")
  c.data.source = "packaged_mnist"
  with pytest.raises(DataError, match="selects no examples"):
    sources.open_source(c.data, "t10k[500:100]")
  with pytest.raises(DataError, match="bad slice bound 'x'"):
    sources.open_source(c.data, "t10k[x:]")
  with pytest.raises(DataError, match="the 't10k' split"):
    sources.open_source(c.data, "train")


def test_image_folder_split_subfolder(cifar_folder):
  c = config_lib.defaults("autoencoder")
  c.data.source = "image_folder"
  c.data.path = str(cifar_folder)
  assert len(sources.open_source(c.data, "train[:50]")) == 50
  with pytest.raises(DataError, match="has no sub-folder 'test'"):
    sources.open_source(c.data, "test")


def test_tfds_array_record_source(tmp_path):
  """A tfds dataset built in ArrayRecord format is read by random access (the catalog path)."""
  data_dir = captioned_digits_tfds(tmp_path)
  digits = sources.mnist_source(sources.packaged_mnist_dir(), "t10k")
  src = sources.TfdsSource("captioned_digits", "train[:30]", data_dir=data_dir,
                           caption_key="captions/text", channels=1)
  assert len(src) == 30 and src.num_classes == 10
  whole = sources.TfdsSource("captioned_digits", "train", data_dir=data_dir, channels=1)
  # tfds stores examples in its own (hashed) order: compare the split as a multiset.
  assert sorted(whole[i]["label"] for i in range(CAPTIONED_DIGITS)) == sorted(
      digits[i]["label"] for i in range(CAPTIONED_DIGITS))
  ex = src[0]
  assert ex["image"].shape == (28, 28, 1)
  assert ex["caption"] == f"a handwritten {NUMBER_WORDS[ex['label']]}"
  with pytest.raises(DataError, match="has no feature 'img'"):
    sources.TfdsSource("captioned_digits", "train", data_dir=data_dir, image_key="img")
  with pytest.raises(DataError, match="is not prepared"):
    sources.TfdsSource("captioned_digits", "train", data_dir=str(tmp_path / "other"),
                       prepare=False)


def test_only_process_0_prepares_a_tfds_dataset(tmp_path, monkeypatch):
  """Another host never builds the dataset itself: it waits for process 0 (a barrier on
  several hosts) and reads what it wrote, or says where process 0 should have written it."""
  import jax
  from tests.helpers import _captioned_digits_builder
  _captioned_digits_builder()
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  with pytest.raises(DataError, match="process 0 prepares it"):
    sources.TfdsSource("captioned_digits", "train", data_dir=str(tmp_path / "fresh"))
  assert not any((tmp_path / "fresh").rglob("*.array_record*"))


def test_tfds_boxes_become_pixel_corner_boxes():
  """tfds BBoxFeature rows are (ymin, xmin, ymax, xmax) in [0, 1]; box files hold pixels."""
  from ldm_jax.data.sources import tfds_boxes  # pylint: disable=g-import-not-at-top
  boxes, classes = tfds_boxes([[0.1, 0.2, 0.5, 1.0], [0.0, 0.0, 1.0, 0.5]], [3, 7], (100, 200))
  np.testing.assert_allclose(boxes, [[40, 10, 200, 50], [0, 0, 100, 100]], atol=1e-4)
  np.testing.assert_array_equal(classes, [3, 7])
  _, none = tfds_boxes(np.zeros((0, 4)), None, (10, 10))
  assert none.shape == (0,)

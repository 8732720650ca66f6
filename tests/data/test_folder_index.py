"""The image-folder index: built once, reused, rebuilt when stale or damaged; bad image files."""
import logging
import os
import pickle

import jax
import numpy as np
import pytest
from jax.experimental import multihost_utils
from PIL import Image, ImageFile

from ldm_jax import config as config_lib
from ldm_jax.data import folder_index, sources
from ldm_jax.errors import BadImageError, DataError


def _png(path, value=0, size=(6, 8)):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.full(size + (3,), value, np.uint8)).save(path)


@pytest.fixture
def folder(tmp_path):
  root = tmp_path / "pets"
  for cls in ("cat", "dog"):
    for i in range(3):
      _png(root / cls / f"{i}.png", value=10 * i)
  _png(root / "dog" / "deep" / "nested.png")
  return root


@pytest.fixture
def walks(monkeypatch):
  """Counts the walks of a whole tree."""
  calls = []
  real = folder_index.walk_images

  def counting(root, ignore=()):
    calls.append(root)
    return real(root, ignore)
  monkeypatch.setattr(folder_index, "walk_images", counting)
  return calls


def _config(root, index_dir="", **data):
  c = config_lib.defaults("autoencoder")
  c.data.source, c.data.path, c.data.index_dir = "image_folder", str(root), str(index_dir)
  for key, value in data.items():
    setattr(c.data, key, value)
  return c.data


def test_index_is_built_once_and_reused(folder, tmp_path, walks, caplog):
  index_dir = tmp_path / "index"
  with caplog.at_level(logging.INFO, logger="ldm_jax"):
    first = sources.ImageFolderSource(str(folder), index_dir=str(index_dir))
    second = sources.open_source(_config(folder, index_dir), "")
  assert len(walks) == 1
  assert "building index" in caplog.text and "reusing index" in caplog.text
  assert first.files == second.files and len(first) == 7
  assert first.classes == ["cat", "dog"] and list(first.labels) == [0, 0, 0, 1, 1, 1, 1]
  assert first.relative[3] == "dog/0.png" and first.relative[-1] == "dog/deep/nested.png"
  assert first.sizes[0] == os.path.getsize(folder / "cat" / "0.png")
  np.testing.assert_array_equal(second[4]["image"], np.full((6, 8, 3), 10, np.uint8))
  # One file per folder, named after it; the loop's index_dir is used when data's is ''.
  names = os.listdir(index_dir)
  assert len(names) == 1 and names[0].startswith("pets-") and names[0].endswith(".index.json")
  sources.open_source(_config(folder), "", index_dir=str(index_dir))
  assert len(walks) == 1
  # Neither index_dir: an in-memory list, as before indexes existed.
  sources.open_source(_config(folder), "")
  assert len(walks) == 2 and os.listdir(index_dir) == names


def test_new_top_level_entry_rebuilds(folder, tmp_path, walks):
  index_dir = str(tmp_path / "index")
  sources.ImageFolderSource(str(folder), index_dir=index_dir)
  _png(folder / "eel" / "0.png")
  src = sources.ImageFolderSource(str(folder), index_dir=index_dir)
  assert len(walks) == 2 and src.classes == ["cat", "dog", "eel"] and len(src) == 8
  # Files added to a class folder change its modification time: rebuilt too.
  _png(folder / "cat" / "9.png")
  os.utime(folder / "cat", ns=(1, 1))
  assert len(sources.ImageFolderSource(str(folder), index_dir=index_dir)) == 9
  assert len(walks) == 3
  sources.ImageFolderSource(str(folder), index_dir=index_dir)
  assert len(walks) == 3


def test_edited_or_damaged_index_is_rebuilt(folder, tmp_path, walks, caplog):
  index_dir = tmp_path / "index"
  sources.ImageFolderSource(str(folder), index_dir=str(index_dir))
  path = index_dir / os.listdir(index_dir)[0]
  text = path.read_text()
  path.write_text(text.replace('"cat/0.png"', '"cat/x.png"'))   # header left as it was
  with caplog.at_level(logging.INFO, logger="ldm_jax"):
    src = sources.ImageFolderSource(str(folder), index_dir=str(index_dir))
  assert len(walks) == 2 and src.relative[0] == "cat/0.png"
  assert "fingerprint does not match" in caplog.text
  assert path.read_text() == text
  path.write_text("garbage")
  assert len(sources.ImageFolderSource(str(folder), index_dir=str(index_dir))) == 7
  assert len(walks) == 3


def test_rebuild_index_flag_forces_a_rebuild(folder, tmp_path, walks):
  data = _config(folder, tmp_path / "index")
  sources.open_source(data, "")
  sources.open_source(data, "")
  assert len(walks) == 1
  data.rebuild_index = True
  sources.open_source(data, "")
  assert len(walks) == 2


def test_index_inside_the_folder_does_not_make_it_stale(folder, walks):
  for index_dir in (folder, folder / "cat" / "index", folder / "index"):
    for _ in range(2):
      src = sources.ImageFolderSource(str(folder), index_dir=str(index_dir))
      assert len(src) == 7 and src.classes == ["cat", "dog"]
  assert len(walks) == 3


def test_other_hosts_wait_for_process_0_and_read_its_index(folder, tmp_path, walks,
                                                           monkeypatch):
  barriers = []
  monkeypatch.setattr(multihost_utils, "sync_global_devices", barriers.append)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  index_dir = str(tmp_path / "index")
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  with pytest.raises(DataError, match=r"data.index_dir: cannot use the index .*\(no index yet\)"):
    sources.ImageFolderSource(str(folder), index_dir=index_dir)
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  built = sources.ImageFolderSource(str(folder), index_dir=index_dir, rebuild_index=True)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  read = sources.ImageFolderSource(str(folder), index_dir=index_dir, rebuild_index=True)
  assert len(walks) == 1 and read.files == built.files and len(barriers) == 3
  # Process 0 fails only after the barrier, so the other hosts are not left waiting.
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match="no images"):
    sources.ImageFolderSource(str(tmp_path / "empty"), index_dir=index_dir)
  assert len(barriers) == 4


def test_source_pickles_small_and_works_after(folder):
  src = sources.ImageFolderSource(str(folder))
  data = pickle.dumps(src)
  assert len(data) < 2000
  np.testing.assert_array_equal(pickle.loads(data)[1]["image"], src[1]["image"])


@pytest.mark.parametrize("content", [b"", b"not an image at all", "truncated"])
def test_undecodable_images_raise_bad_image_error(tmp_path, content):
  assert not ImageFile.LOAD_TRUNCATED_IMAGES
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).save(tmp_path / "good.jpg")
  if content == "truncated":
    content = (tmp_path / "good.jpg").read_bytes()[:-400]
  (tmp_path / "bad.jpg").write_bytes(content)
  src = sources.ImageFolderSource(str(tmp_path))
  assert src.relative == ["bad.jpg", "good.jpg"] and src.sizes[0] == len(content)
  with pytest.raises(BadImageError, match=r"cannot read image '.*bad.jpg'") as e:
    src[0]
  assert e.value.path == str(tmp_path / "bad.jpg")
  assert src[1]["image"].shape == (64, 64, 3)


def test_an_index_dir_that_cannot_be_made_is_one_data_error(tmp_path):
  folder = tmp_path / "images"
  folder.mkdir()
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(folder / "a.png")
  (tmp_path / "taken").write_text("a file, not a folder")
  with pytest.raises(DataError, match=r"data.index_dir: cannot index image folder"):
    folder_index.open_index(str(folder), str(tmp_path / "taken" / "index"))

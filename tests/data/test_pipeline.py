"""The input pipeline: deterministic given the seed, split exactly across hosts, resumable."""
import multiprocessing
import os
import signal
import time

import numpy as np
import pytest

from ldm_jax import config as config_lib
from ldm_jax.data import preprocess
from ldm_jax.data.pipeline import InputPipeline, eval_batches
from ldm_jax.data.sources import ArraySource, DataError, ImageFolderSource
from ldm_jax.errors import BadImageError


def _source(n=50):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (n, 12, 12, 3), np.uint8)
  return ArraySource(images, labels=np.arange(n) % 7)


def _fn(example, rng):
  # Records which example was used and one draw from its RNG (to check augmentation seeding).
  return {"label": np.int32(example["label"]), "image": example["image"],
          "draw": np.float32(rng.random())}


def _take(pipe, k):
  return [next(pipe) for _ in range(k)]


def test_same_seed_same_batches_and_full_epochs():
  a = InputPipeline(_source(), _fn, global_batch=10, seed=3)
  b = InputPipeline(_source(), _fn, global_batch=10, seed=3, prefetch=1)
  batches_a, batches_b = _take(a, 10), _take(b, 10)
  for x, y in zip(batches_a, batches_b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  # Each epoch of 50 examples (5 batches) visits every example exactly once.
  first_epoch = np.concatenate([np.asarray([bt["image"][i, 0, 0, 0] for i in range(10)])
                                for bt in batches_a[:5]])
  assert sorted(first_epoch) == sorted(_source().images[:, 0, 0, 0])
  c = InputPipeline(_source(), _fn, global_batch=10, seed=4)
  assert not np.array_equal(next(c)["image"], batches_a[0]["image"])
  for p in (a, b, c):
    p.close()


def test_hosts_split_the_global_batch():
  single = InputPipeline(_source(), _fn, global_batch=12, seed=1, process_index=0,
                         process_count=1)
  hosts = [InputPipeline(_source(), _fn, global_batch=12, seed=1, process_index=h,
                         process_count=3) for h in range(3)]
  for _ in range(4):
    whole = next(single)
    parts = [next(h) for h in hosts]
    for key in whole:
      np.testing.assert_array_equal(whole[key], np.concatenate([p[key] for p in parts]))
  for p in [single] + hosts:
    p.close()
  with pytest.raises(DataError, match="divisible by the number of hosts"):
    InputPipeline(_source(), _fn, global_batch=10, seed=1, process_index=0, process_count=3)


def test_resume_from_state_continues_the_stream():
  straight = InputPipeline(_source(), _fn, global_batch=8, seed=5)
  expected = _take(straight, 9)
  first = InputPipeline(_source(), _fn, global_batch=8, seed=5)
  _take(first, 4)
  state = first.get_state()
  first.close()
  resumed = InputPipeline(_source(), _fn, global_batch=8, seed=5)
  resumed.set_state(state)
  for want, got in zip(expected[4:], _take(resumed, 5)):
    for k in want:
      np.testing.assert_array_equal(want[k], got[k])
  with pytest.raises(DataError, match="seeded with 5 but this run uses seed 6"):
    InputPipeline(_source(), _fn, global_batch=8, seed=6).set_state(state)
  straight.close()
  resumed.close()


def test_errors_in_worker_threads_reach_the_caller(tmp_path):
  (tmp_path / "a.png").write_bytes(b"garbage")
  pipe = InputPipeline(ImageFolderSource(str(tmp_path)), _fn, global_batch=2, seed=0)
  with pytest.raises(DataError, match="cannot read image"):
    next(pipe)
  pipe.close()


def test_eval_batches_are_fixed():
  a = list(eval_batches(_source(), _fn, global_batch=10, num_batches=2, seed=0))
  b = list(eval_batches(_source(), _fn, global_batch=10, num_batches=2, seed=0))
  np.testing.assert_array_equal(a[1]["image"], b[1]["image"])
  np.testing.assert_array_equal(a[0]["image"], _source().images[:10])


def test_preprocess_modes_and_determinism():
  rng_img = np.random.default_rng(0).integers(0, 255, (40, 60, 3), np.uint8)
  out = preprocess.preprocess_image(rng_img, np.random.default_rng(1), size=32)
  assert out.shape == (32, 32, 3) and out.dtype == np.float32
  assert -1.0 <= out.min() and out.max() <= 1.0
  again = preprocess.preprocess_image(rng_img, np.random.default_rng(1), size=32)
  np.testing.assert_array_equal(out, again)
  # Centre crop without resampling when the short side already fits.
  square = rng_img[:32, :40]
  centre = preprocess.preprocess_image(square, np.random.default_rng(0), size=32,
                                       random_crop=False)
  np.testing.assert_array_equal(preprocess.to_uint8(centre), square[:, 4:36])
  digit = np.zeros((28, 28, 1), np.uint8)
  digit[0, 0] = 255
  padded = preprocess.preprocess_image(digit, np.random.default_rng(0), size=32,
                                       resize_mode="pad")
  assert padded.shape == (32, 32, 1) and padded[2, 2, 0] == 1.0 and padded[0, 0, 0] == -1.0
  flips = {preprocess.preprocess_image(square, np.random.default_rng(s), size=32,
                                       random_crop=False, random_flip=True)[0, 0, 0]
           for s in range(20)}
  assert len(flips) == 2  # both flipped and unflipped crops occur


def test_image_example_fn_on_cifar(cifar_folder):
  c = config_lib.defaults("autoencoder")
  c.data.image_size = 24
  fn = preprocess.image_example_fn(c.data, train=True)
  src = ImageFolderSource(str(cifar_folder / "train"))
  pipe = InputPipeline(src, fn, global_batch=8, seed=0)
  batch = next(pipe)
  pipe.close()
  assert batch["image"].shape == (8, 24, 24, 3) and batch["label"].dtype == np.int32


def _batches_equal(want, got):
  for x, y in zip(want, got, strict=True):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_two_worker_processes_give_the_same_batches_and_resume():
  expected = _take(InputPipeline(_source(), _fn, global_batch=6, seed=2), 7)
  workers = InputPipeline(_source(), _fn, global_batch=6, seed=2, workers=2)
  _batches_equal(expected[:2], _take(workers, 2))
  # SIGTERM / Ctrl-C reach the whole process group; the workers leave them to the trainer.
  children = multiprocessing.active_children()
  assert len(children) >= 2
  for child in children:
    os.kill(child.pid, signal.SIGTERM)
  time.sleep(0.5)
  assert all(child.is_alive() for child in children)
  _batches_equal(expected[2:4], _take(workers, 2))
  state = workers.get_state()
  workers.close()
  resumed = InputPipeline(_source(), _fn, global_batch=6, seed=2, workers=2)
  resumed.set_state(state)
  _batches_equal(expected[4:], _take(resumed, 3))
  resumed.close()


def test_a_run_resumes_on_another_number_of_hosts():
  single = InputPipeline(_source(), _fn, global_batch=8, seed=7)
  expected = _take(single, 6)
  two = [InputPipeline(_source(), _fn, global_batch=8, seed=7, process_index=h,
                       process_count=2) for h in range(2)]
  for _ in range(3):
    parts = [next(h) for h in two]
  assert two[0].get_state() == two[1].get_state()
  state = two[0].get_state()
  np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]),
                                expected[2]["image"])
  one = InputPipeline(_source(), _fn, global_batch=8, seed=7, process_index=0, process_count=1)
  one.set_state(state)
  _batches_equal(expected[3:], _take(one, 3))
  four = [InputPipeline(_source(), _fn, global_batch=8, seed=7, process_index=h,
                        process_count=4) for h in range(4)]
  for h in four:
    h.set_state(state)
  for want in expected[3:]:
    parts = [next(h) for h in four]
    np.testing.assert_array_equal(np.concatenate([p["label"] for p in parts]), want["label"])


class _WithBadFiles(ArraySource):
  """Examples 3 and 11 are unreadable files."""

  def __getitem__(self, index):
    if index in (3, 11):
      raise BadImageError(f"data: cannot read image 'img{index}.jpg'", f"img{index}.jpg")
    return super().__getitem__(index)


def _bad_source():
  base = _source(20)
  return _WithBadFiles(base.images, base.labels)


def test_skip_replaces_bad_files_deterministically_counts_them_and_resumes_exactly(caplog):
  pipe = InputPipeline(_bad_source(), _fn, global_batch=5, seed=1, on_bad_image="skip")
  batches = _take(pipe, 8)     # two epochs: each bad file is met twice, logged once
  assert pipe.get_state()["skipped"] == 4
  warned = [r.getMessage() for r in caplog.records if "skipped unreadable" in r.getMessage()]
  assert len(warned) == 2 and any("img3.jpg" in w for w in warned)
  seen = np.concatenate([b["image"] for b in batches[:4]])
  src = _bad_source()
  for bad in (3, 11):
    assert not (seen == src.images[bad]).all(axis=(1, 2, 3)).any()
  # Resuming mid-way sees the same substitutes and carries the count on.
  first = InputPipeline(_bad_source(), _fn, global_batch=5, seed=1, on_bad_image="skip")
  _take(first, 3)
  resumed = InputPipeline(_bad_source(), _fn, global_batch=5, seed=1, on_bad_image="skip")
  resumed.set_state(first.get_state())
  _batches_equal(batches[3:], _take(resumed, 5))
  assert resumed.get_state()["skipped"] == 4
  for p in (pipe, first, resumed):
    p.close()


def test_error_names_the_bad_file_when_its_batch_is_asked_for():
  pipe = InputPipeline(_bad_source(), _fn, global_batch=5, seed=1, workers=0)
  handed = 0
  with pytest.raises(BadImageError, match="img(3|11).jpg"):
    for _ in range(4):
      next(pipe)
      handed += 1
  # The state still points at the failing batch: a rerun loses nothing before it.
  assert pipe.get_state()["position"] == 5 * handed
  pipe.close()
  # It crosses from a worker process whole (grain pickles it), path included.
  import pickle
  again = pickle.loads(pickle.dumps(BadImageError("data: cannot read image 'x.jpg'", "x.jpg")))
  assert isinstance(again, BadImageError) and again.path == "x.jpg" and "x.jpg'" in str(again)


def test_device_prefetch_state_counts_only_the_batches_handed_out():
  import jax
  from ldm_jax.data.pipeline import DevicePrefetch
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  pipe = InputPipeline(_bad_source(), _fn, global_batch=5, seed=1, on_bad_image="skip")
  device = DevicePrefetch(pipe, sharding, ahead=2)
  got = [next(device) for _ in range(3)]
  assert pipe.get_state()["position"] == 25          # two more already sent ahead
  assert device.get_state()["position"] == 15
  expected = _take(InputPipeline(_bad_source(), _fn, global_batch=5, seed=1,
                                 on_bad_image="skip"), 3)
  _batches_equal(expected, [jax.device_get(b) for b in got])
  pipe.close()

"""The sharded latent cache: addressed by global index, bf16 at half the size, resumable, and
refused when built from something else. A mean-pool stands in for the autoencoder."""
import json
import os
import pickle

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from ldm_jax.data.latent_cache import LatentCacheSource, build_latent_cache
from ldm_jax.data.sources import ArraySource, DataError

N, BATCH = 40, 8
FINGERPRINT = {"first_stage": "mean-pool", "data": "arrays"}


def _source(n=N):
  images = np.random.default_rng(0).integers(0, 256, (n, 8, 8, 3), np.uint8)
  return ArraySource(images, labels=np.arange(n) % 5, captions=[f"image {i}" for i in range(n)])


def _example_fn(example, rng):
  del rng
  return {"image": example["image"], "label": np.int32(example["label"]),
          "lowres": example["image"][::4, ::4]}


def _encode(x):
  """float images (B, 8, 8, 3) -> (B, 2, 2, 3) 4x4 means."""
  return x.reshape(x.shape[0], 2, 4, 2, 4, 3).mean((2, 4))


def _build(directory, source=None, example_fn=_example_fn, **kwargs):
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  kwargs = {"fingerprint": FINGERPRINT, "shard_size": 12, "dtype": "float32", **kwargs}
  return build_latent_cache(str(directory), source or _source(), example_fn, _encode,
                            global_batch=BATCH, batch_sharding=sharding, num_classes=5, **kwargs)


def _all(cache):
  return {key: np.stack([np.asarray(cache[i][key]) for i in range(len(cache))])
          for key in cache[0]}


def test_shards_hold_examples_at_their_global_index(tmp_path):
  source = _source()
  cache = _build(tmp_path / "cache", source)   # 12 per shard: 3 full shards and 4 examples
  assert sorted(os.listdir(tmp_path / "cache" / "shards")) == ["00000", "00001", "00002",
                                                                "00003"]
  assert len(cache) == N and cache.num_classes == 5 and cache[0]["latent"].dtype == np.float32
  expected = _encode(source.images.astype(np.float32) / 127.5 - 1.0)
  got = _all(cache)
  np.testing.assert_allclose(got["latent"], expected, atol=1e-6)
  np.testing.assert_array_equal(got["label"], source.labels)
  np.testing.assert_array_equal(got["lowres"], source.images[:, ::4, ::4])
  assert [cache[i]["caption"] for i in (11, 12, 39)] == ["image 11", "image 12", "image 39"]
  assert cache.caption(-1) == "image 39" and cache.info["conditions"] == ["lowres"]
  # Float images in [-1, 1] give the same latents as uint8 ones.
  as_float = lambda e, r: {**_example_fn(e, r), "image": e["image"] / np.float32(127.5) - 1}  # noqa: E731
  np.testing.assert_allclose(_all(_build(tmp_path / "float", source, as_float))["latent"],
                             got["latent"], atol=1e-6)
  # Pickles without its open shards (for data-loading workers) and reads the same.
  copy = pickle.loads(pickle.dumps(cache))
  assert not copy._open and len(pickle.dumps(cache)) < 2000  # pylint: disable=protected-access
  np.testing.assert_array_equal(copy[13]["latent"], got["latent"][13])
  os.remove(tmp_path / "cache" / "complete.json")
  with pytest.raises(DataError, match="is not a finished latent cache"):
    LatentCacheSource(str(tmp_path / "cache"))


def test_bfloat16_shards_are_half_the_size_and_round_the_float32_latents(tmp_path):
  f32 = _build(tmp_path / "f32", shard_size=N)
  bf16 = _build(tmp_path / "bf16", shard_size=N, dtype="bfloat16")
  assert bf16[0]["latent"].dtype == jnp.bfloat16
  assert json.loads((tmp_path / "bf16" / "manifest.json").read_text())["dtype"] == "bfloat16"

  def data_bytes(directory):
    path = directory / "shards" / "00000" / "latents.npy"
    return os.path.getsize(path) - np.load(path, mmap_mode="r").offset

  assert 2 * data_bytes(tmp_path / "bf16") == data_bytes(tmp_path / "f32")
  np.testing.assert_array_equal(_all(bf16)["latent"].view(np.uint16),
                                _all(f32)["latent"].astype(ml_dtypes.bfloat16).view(np.uint16))


def test_an_interrupted_build_resumes_with_the_missing_shards_only(tmp_path):
  calls, limit = [], [3 * BATCH]

  def counting(example, rng):
    calls.append(1)
    if len(calls) > limit[0]:
      raise RuntimeError("interrupted")
    return _example_fn(example, rng)

  with pytest.raises(RuntimeError, match="interrupted"):
    _build(tmp_path / "cache", example_fn=counting)
  shards = tmp_path / "cache" / "shards"
  # Batches 0-2 ([0, 24)) were encoded before batch 3 failed: shards [0, 12) and [12, 24).
  assert sorted(os.listdir(shards)) == ["00000", "00001"]
  assert not (tmp_path / "cache" / "complete.json").exists()
  (shards / ".00002.123.abcd1234.tmp").mkdir()     # what a killed build leaves behind
  calls.clear()
  limit[0] = N
  resumed = _build(tmp_path / "cache", example_fn=counting)
  # Shards 2-3 ([24, 40)) lie in batches 3-4; batches 0-2 are not read again.
  assert len(calls) == 2 * BATCH
  assert sorted(os.listdir(shards)) == ["00000", "00001", "00002", "00003"]
  straight = _all(_build(tmp_path / "straight"))
  for key, values in _all(resumed).items():
    np.testing.assert_array_equal(values, straight[key])


def test_a_cache_of_another_fingerprint_is_refused(tmp_path):
  _build(tmp_path / "cache", shard_size=N)
  with pytest.raises(DataError) as error:
    _build(tmp_path / "cache", shard_size=N, fingerprint={**FINGERPRINT, "data": "other"})
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith("first_stage.latent_cache: ") and "was built from" in message
  assert "delete it or point first_stage.latent_cache elsewhere" in message

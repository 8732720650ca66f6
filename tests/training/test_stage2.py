"""Stage-2 training: sharded steps equal single-device steps, the frozen autoencoder never
changes, scale_by_std is computed from the first batch and restored on resume, the latent cache,
and text conditioning with a tokenizer trained on the captions."""
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.checkpoint import load_inference
from ldm_jax.data import sources
from ldm_jax.data.latent_cache import LatentCacheSource
from ldm_jax.data.preprocess import image_example_fn, model_inputs
from ldm_jax.data.sources import DataError
from ldm_jax.errors import ConfigError
from ldm_jax.training.loop import Trainer, train_and_evaluate
from tests.helpers import captioned_digits_tfds, tiny_ldm_config, train_on_digits


@pytest.fixture
def autoencoder(tiny_autoencoder):
  return tiny_autoencoder


def ldm_config(autoencoder, variant="class", **overrides):
  """The suite's tiny LDM (tests.helpers.tiny_ldm_config) on the packaged digits: 4 steps,
  checkpoints every 2."""
  return tiny_ldm_config(autoencoder, variant,
                         **{"train__num_steps": 4, "train__ckpt_every": 2, **overrides})


def losses(history):
  return np.array([h["loss"] for h in history])


def test_sharded_steps_equal_single_device_steps(tiny_autoencoder, class_ldm, tmp_path):
  """The session's one-device run against the same 3 steps on a (data 2, fsdp 2) mesh: both
  axes, every kernel that divides sharded, half the devices' compile and run time of all 8."""
  single, _ = class_ldm
  config = tiny_ldm_config(tiny_autoencoder, mesh__fsdp=2, mesh__min_shard_size=0)
  sharded = train_on_digits(config, tmp_path / "sharded", devices=jax.devices()[:4])
  assert losses(sharded)[-1] < losses(sharded)[0]
  np.testing.assert_allclose(losses(sharded), losses(single), rtol=1e-5)


def test_frozen_autoencoder_is_bit_identical_and_not_checkpointed(autoencoder, tmp_path):
  before, _, _ = load_inference(autoencoder)
  trainer = Trainer(ldm_config(autoencoder), str(tmp_path),
                    devices=jax.devices()[:1])
  try:
    trainer.train()
    after = jax.device_get(trainer.frozen["autoencoder"])
    state_keys = set(trainer.state.params)
  finally:
    trainer.close()
  for a, b in zip(jax.tree_util.tree_leaves(before["autoencoder"]),
                  jax.tree_util.tree_leaves(after)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert state_keys == {"unet", "cond"}
  reread, _, _ = load_inference(autoencoder)  # the export on disk is untouched too
  for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(reread)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_scale_by_std_survives_resume_and_config_changes_are_checked(autoencoder, tmp_path,
                                                                     caplog):
  config = ldm_config(autoencoder, diffusion__scale_by_std=True, train__num_steps=2)
  trainer = Trainer(config, str(tmp_path), devices=jax.devices()[:1])
  try:
    stage, first = trainer.stage, trainer.stage.first
    batch = trainer.pipeline.batch_at(0)
    posterior = first.encode(first.variables, model_inputs(batch)["image"])
    z = posterior.sample(jax.random.PRNGKey(0))
    want = 1.0 / float(jnp.std(z))
    scale = float(trainer.state.model_state["scale_factor"])
    trainer.train()
  finally:
    trainer.close()
  assert stage.config.diffusion.scale_by_std
  np.testing.assert_allclose(scale, want, rtol=1e-5)
  assert abs(scale - 1.0) > 0.01
  # A changed learning rate resumes with a warning naming it...
  logging.getLogger("ldm_jax").addHandler(caplog.handler)   # whether or not it propagates
  try:
    resumed = Trainer(ldm_config(autoencoder, diffusion__scale_by_std=True, train__lr=5e-4),
                      str(tmp_path), devices=jax.devices()[:1])
  finally:
    logging.getLogger("ldm_jax").removeHandler(caplog.handler)
  try:
    assert int(resumed.state.step) == 2
    assert float(resumed.state.model_state["scale_factor"]) == scale
    assert "train.lr 0.01 -> 0.0005" in caplog.text
  finally:
    resumed.close()
  # ...a changed architecture stops with one line naming the field.
  with pytest.raises(ConfigError, match=r"^unet.channel_mult \[1\] -> \[1, 1\]: the "
                     r"checkpoint in .* cannot resume as a different model"):
    Trainer(ldm_config(autoencoder, diffusion__scale_by_std=True, unet__channel_mult=(1, 1)),
            str(tmp_path),
            devices=jax.devices()[:1])


@pytest.mark.slow  # compile-bound on CPU; run with -m slow
def test_latent_cache_is_built_once_and_matches_the_encoder(autoencoder, tmp_path):
  cached = dict(first_stage__precompute_latents=True, first_stage__latent_dtype="float32")
  config = ldm_config(autoencoder, data__split="t10k[:40]", train__num_steps=2, **cached)
  history = train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
  assert np.all(np.isfinite(losses(history)))
  cache = tmp_path / "latents"
  source = LatentCacheSource(str(cache))
  latents = np.stack([source[i]["latent"] for i in range(len(source))])
  assert latents.shape == (40, 8, 8, 6)  # KL moments [mean | logvar] on the 8x8 grid
  labels = np.array([source[i]["label"] for i in range(len(source))])
  digits = sources.mnist_source(sources.packaged_mnist_dir(), "t10k")
  np.testing.assert_array_equal(labels, digits.labels[:40])
  trainer = Trainer(config, str(tmp_path / "check"), devices=jax.devices()[:1])
  try:
    first = trainer.stage.first
    x = image_example_fn(config.data, False)(digits[3], np.random.default_rng(0))["image"]
    x = model_inputs({"image": jnp.asarray(x)[None]})["image"]
    posterior = first.encode(first.variables, x)
    np.testing.assert_allclose(latents[3], np.concatenate(
        [posterior.mean[0], posterior.logvar[0]], -1), rtol=1e-4, atol=1e-5)
  finally:
    trainer.close()
  shard = cache / "shards" / "00000" / "latents.npy"
  mtime = os.path.getmtime(shard)
  train_and_evaluate(ldm_config(autoencoder, data__split="t10k[:40]", train__num_steps=3,
                                **cached), str(tmp_path), devices=jax.devices()[:1])
  assert os.path.getmtime(shard) == mtime  # reused, not re-encoded
  with pytest.raises(DataError, match="was built from"):
    Trainer(ldm_config(autoencoder, data__split="t10k[:50]", **cached), str(tmp_path),
            devices=jax.devices()[:1])


@pytest.mark.slow  # compile-bound on CPU; run with -m slow
def test_text_conditioning_with_a_tokenizer_trained_on_captions(autoencoder, tmp_path):
  data_dir = captioned_digits_tfds(tmp_path / "tfds")
  config = ldm_config(autoencoder, "text", mesh__fsdp=1, train__num_steps=3)
  config.data.source, config.data.tfds_name, config.data.data_dir = "tfds", "captioned_digits", \
      data_dir
  config.data.split, config.data.caption_key = "train", "captions/text"
  history = train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1])
  assert np.all(np.isfinite(losses(history)))
  tokenizer = json.loads((tmp_path / "run" / "tokenizer.json").read_text())
  vocab = tokenizer["model"]["vocab"]
  assert "handwritten" in vocab and "seven" in vocab


def test_missing_first_stage_is_a_clear_error(tmp_path):
  from ldm_jax.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
  with pytest.raises(CheckpointError, match="is not a folder"):
    Trainer(ldm_config(str(tmp_path / "nowhere")), str(tmp_path / "run"))
  (tmp_path / "notarun").mkdir()
  with pytest.raises(CheckpointError, match="has no config.json"):
    Trainer(ldm_config(str(tmp_path / "notarun")), str(tmp_path / "run"))

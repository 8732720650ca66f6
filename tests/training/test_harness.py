"""The shared training harness on a tiny autoencoder and real digits, on 8 CPU devices.

Sharded and single-device runs agree; resumed runs reproduce uninterrupted ones (exactly on the
same mesh, to float tolerance on another mesh); bad checkpoints and divergence are clear errors.
"""
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ldm_jax.checkpoint import Checkpointer, CheckpointError
from ldm_jax.data.pipeline import HostBatch, InputPipeline
from ldm_jax.data.preprocess import model_inputs
from ldm_jax.data.sources import open_source
from ldm_jax.errors import ConfigError, Preempted
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.training import loop as loop_lib
from ldm_jax.training.loop import Trainer, TrainingDiverged, train_and_evaluate
from ldm_jax.training.stage1 import AutoencoderStage
from ldm_jax.training.stages import accumulate_gradients
from ldm_jax.compilation import run_once_options
from tests.conftest import load_config

# Sharded runs sum in a different order than one device does. Until the GAN starts, the float32
# losses agree to ~1e-7 relative. The discriminator's first Adam updates are sign-like per
# element (m / sqrt(v)), so elements whose gradient is ~0 move by a full step in a direction
# set by rounding; after that the reconstruction losses agree to a few 1e-3 (KL: 3.3e-3 at step
# 6 in one run) and the GAN terms
# (whose adaptive weight is a ratio of gradient norms) to about 1%.
RTOL_NO_GAN = 1e-5
RTOL_GAN = 5e-3
RTOL_GAN_TERMS = 3e-2
STEPS = 6


def small_config(**overrides):
  c = load_config("tiny_ae")
  c.data.image_size = 16
  c.data.resize_mode = "stretch"
  c.model.ch_mult = (1, 2)
  c.model.num_res_blocks = 1
  c.loss.disc_start = 2          # the GAN (and BatchNorm statistics) are on from step 3
  c.train.batch_size = 16
  c.train.num_steps = STEPS
  c.train.log_every = 1
  c.train.ckpt_every = 3
  c.train.eval_every = 10_000
  c.train.ema_decay = 0.99
  c.mesh.fsdp = 2
  c.mesh.min_shard_size = 0      # shard every kernel that divides, to exercise real sharding
  c.data.eval_split = ""         # no evaluation: saves compiling it in every test
  for key, value in overrides.items():
    section, field = key.split("__")
    c[section][field] = value
  return c


def losses(history, key="loss"):
  return np.array([h[key] for h in history])


ONE_DEVICE = dict(mesh__fsdp=1)


def run(workdir, sharded=False, **overrides):
  """Trains small_config in workdir: on the (4, 2) mesh of 8 devices, or on one device."""
  if sharded:
    return train_and_evaluate(small_config(**overrides), str(workdir))
  return train_and_evaluate(small_config(**{**ONE_DEVICE, **overrides}), str(workdir),
                            devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """Six steps on the (4, 2) data x fsdp mesh of 8 devices."""
  workdir = tmp_path_factory.mktemp("straight")
  return run(workdir, sharded=True), workdir


@pytest.fixture(scope="module")
def single(tiny_ae_six_steps):
  """The same six steps on one device (the session's run; checkpoints 3 and 6)."""
  return tiny_ae_six_steps[0]


@pytest.fixture
def copy_of_three_steps(tiny_ae_six_steps, tmp_path):
  """A workdir holding the checkpoint of the first three single-device steps: a copy of the
  six-step run without its step-6 checkpoint."""
  history, six = tiny_ae_six_steps
  shutil.copytree(six, tmp_path / "run")
  shutil.rmtree(tmp_path / "run" / "checkpoints" / "6")
  return history[:3], tmp_path / "run"


def test_losses_fall_and_metrics_are_logged(uninterrupted):
  history, workdir = uninterrupted
  assert [h["step"] for h in history] == list(range(1, STEPS + 1))
  assert losses(history, "rec_loss")[-1] < losses(history, "rec_loss")[0]
  assert losses(history, "disc_factor").tolist() == [0, 0, 1, 1, 1, 1]
  assert (pathlib.Path(workdir) / "metrics.jsonl").read_text().count("\n") == STEPS
  assert (pathlib.Path(workdir) / "config.json").exists()
  assert Checkpointer(str(workdir / "checkpoints")).all_steps() == [3, 6]


def test_params_are_sharded_over_fsdp(tmp_path):
  trainer = Trainer(small_config(train__num_steps=1), str(tmp_path))
  try:
    kernel = trainer.state.params["ae"]["decoder"]["conv_in"]["kernel"]
    assert kernel.sharding.spec == P(None, None, None, "fsdp")
    assert {s.data.shape for s in kernel.addressable_shards} == {(3, 3, 3, 32)}
    mu = trainer.state.opt_state.inner_states["gen"].inner_state[0].mu
    assert mu["ae"]["decoder"]["conv_in"]["kernel"].sharding.spec == P(None, None, None, "fsdp")
    assert trainer.state.ema_params["decoder"]["conv_in"]["kernel"].sharding.spec == \
        P(None, None, None, "fsdp")
    assert trainer.state.params["logvar"].sharding.spec == P()
  finally:
    trainer.close()


def test_sharded_mesh_matches_single_device(uninterrupted, single):
  sharded, _ = uninterrupted
  for key in ("loss", "rec_loss", "kl_loss", "g_loss", "d_loss", "d_weight"):
    a, b = losses(sharded, key), losses(single, key)
    # Steps 1-3 are computed from parameters trained without the GAN.
    np.testing.assert_allclose(a[:3], b[:3], rtol=RTOL_NO_GAN, atol=1e-6, err_msg=key)
    rtol = RTOL_GAN if key in ("loss", "rec_loss", "kl_loss") else RTOL_GAN_TERMS
    np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-3, err_msg=key)


def test_resume_after_preemption_reproduces_uninterrupted_losses_exactly(single, tmp_path,
                                                                         monkeypatch):
  """A preemption at step 2 saves and stops; rerunning resumes params, optimizer, EMA,
  BatchNorm statistics, step and data position, and steps 3-6 repeat the uninterrupted run bit
  for bit (same device, same programs)."""
  monkeypatch.setattr(Checkpointer, "reached_preemption", lambda self, step: step == 2)
  with pytest.raises(Preempted, match=r"stopped at step 2 .* saved checkpoint") as info:
    run(tmp_path)
  stopped = info.value.history
  assert [h["step"] for h in stopped] == [1, 2]
  assert Checkpointer(str(tmp_path / "checkpoints")).all_steps() == [2]
  monkeypatch.undo()
  rest = run(tmp_path)
  assert [h["step"] for h in rest] == [3, 4, 5, 6]
  for key in ("loss", "d_loss", "d_weight", "psnr"):
    np.testing.assert_array_equal(losses(stopped + rest, key), losses(single, key), key)


def test_resume_onto_another_mesh(uninterrupted, copy_of_three_steps):
  """Saved from one device, resumed on the (4, 2) mesh of 8 devices."""
  straight, _ = uninterrupted
  _, workdir = copy_of_three_steps
  resumed = run(workdir, sharded=True)
  assert [h["step"] for h in resumed] == [4, 5, 6]
  np.testing.assert_allclose(losses(resumed), losses(straight)[3:], rtol=RTOL_GAN)


def test_corrupt_checkpoint_is_a_clear_error(copy_of_three_steps):
  _, workdir = copy_of_three_steps
  data = pathlib.Path(workdir, "checkpoints", "3", "state")
  for path in data.rglob("*"):
    if path.is_file() and "metadata" not in path.name.lower():
      path.write_bytes(b"\0" * 7)
  with pytest.raises(CheckpointError, match=r"checkpoint '.*checkpoints/3' (is corrupt or "
                     r"unreadable|is unreadable|has no state metadata)"):
    Trainer(small_config(**ONE_DEVICE), str(workdir), devices=jax.devices()[:1])


def test_mismatched_checkpoint_names_the_field_then_the_parameters(copy_of_three_steps,
                                                                   monkeypatch):
  _, workdir = copy_of_three_steps
  # The saved config names the changed field first...
  with pytest.raises(ConfigError, match=r"model.ch 32 -> 64: the checkpoint in .* cannot "
                     r"resume as a different model"):
    Trainer(small_config(model__ch=64, **ONE_DEVICE), str(workdir), devices=jax.devices()[:1])
  # ...and without it (checkpoints that record no config) the arrays' shapes still do.
  monkeypatch.setattr(loop_lib, "check_resume_config", lambda *args: None)
  with pytest.raises(CheckpointError, match=r"does not match this config: .*shape mismatch: "
                     r"params/ae/decoder/conv_in/bias: checkpoint \(64,\) vs model \(128,\)"):
    Trainer(small_config(model__ch=64, **ONE_DEVICE), str(workdir), devices=jax.devices()[:1])


def test_stage_two_pins_the_first_stage_step_it_started_from(uninterrupted):
  """A stage-2 run that recorded first-stage step 3 keeps loading step 3 after the stage-1
  workdir has saved step 6; a fresh run takes the latest; a vanished step is one clear line."""
  from ldm_jax.training.stage2 import LatentDiffusionStage  # pylint: disable=g-import-not-at-top
  _, workdir = uninterrupted
  assert Checkpointer(str(workdir / "checkpoints")).all_steps() == [3, 6]
  c = load_config("tiny_ldm", "uncond")
  c.first_stage.checkpoint = str(workdir)
  mesh = mesh_lib.create_mesh(c.mesh, jax.devices()[:1])
  fresh = LatentDiffusionStage(c, mesh).first
  pinned = LatentDiffusionStage(c, mesh, facts={"first_stage": {"step": 3}}).first
  assert (fresh.identity["step"], pinned.identity["step"]) == (6, 3)
  assert fresh.identity["path"] == pinned.identity["path"] == str(workdir)
  a = jax.tree_util.tree_leaves(fresh.variables)[0]
  b = jax.tree_util.tree_leaves(pinned.variables)[0]
  assert not np.array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(CheckpointError, match=r"trained on step 9 of .* which no longer exists"):
    LatentDiffusionStage(c, mesh, facts={"first_stage": {"step": 9}})


def test_nan_stops_training_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  """A batch of NaN images at step 4 makes the loss NaN; checkpoint 3 stays, nothing later."""
  real_call = HostBatch.__call__

  def poisoned(self, batch_number):
    batch, bad = real_call(self, batch_number)
    if batch_number >= 3:   # float NaNs in place of the uint8 pixels
      batch["image"] = np.full(batch["image"].shape, np.nan, np.float32)
    return batch, bad

  monkeypatch.setattr(HostBatch, "__call__", poisoned)
  with pytest.raises(TrainingDiverged, match=r"loss = nan at step 4; the last good checkpoint "
                     r"is step 3"):
    run(tmp_path)
  assert Checkpointer(str(tmp_path / "checkpoints")).all_steps() == [3]


def test_gradient_accumulation_matches_one_big_batch():
  """The mean gradient of two micro-batches of 8 equals the gradient of the batch of 16.

  On the VQ model before disc_start the loss is a deterministic mean over examples (no
  posterior noise, no per-micro-batch adaptive weight), so the two must agree.
  """
  config = small_config(model__type="vq", loss__disc_start=100, model__ch_mult=(1,),
                        disc__num_layers=1, **ONE_DEVICE)   # one level: cheap to compile
  mesh = mesh_lib.create_mesh(config.mesh, jax.devices()[:1])
  stage = AutoencoderStage(config, mesh)
  pipe = InputPipeline(open_source(config.data, config.data.split),
                       stage.example_fn(train=True), global_batch=16, seed=0)
  batch = model_inputs(jax.device_put(next(pipe), mesh_lib.batch_sharding(mesh)))
  pipe.close()
  state = jax.jit(stage.init, compiler_options=run_once_options())(jax.random.PRNGKey(0),
                                                                       batch)

  def grads(k):
    fn = lambda p, ms, b, r: stage._grads(p, ms, b, r, jnp.int32(5), stage.frozen)  # noqa
    return jax.jit(lambda s, b: accumulate_gradients(fn, s.params, s.model_state, b,
                                                     jax.random.PRNGKey(7), k)[0])(state, batch)

  one, two = grads(1), grads(2)
  for a, b in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(two)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # gradients are O(0.1-1)

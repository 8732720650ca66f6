"""Nothing is lost under faults: damaged or half-written checkpoints, divergence, preemption and
full disks, on the tiny autoencoder of test_harness.

A damaged newest checkpoint is moved aside and the previous one resumes; temporary folders of
killed saves are removed; a non-finite state is never saved; SIGTERM saves the current step and
exits 3 even when repeated; a failed save is one line and the previous checkpoint still restores;
a run killed during an async save resumes with the losses of one never killed; with two real
processes SIGTERM stops both at one step, 2 x 4 devices match 1 x 8, and a two-process resume
matches the straight two-process run.
"""
import contextlib
import json
import logging
import os
import pathlib
import resource
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ldm_jax.checkpoint import Checkpointer, CheckpointError
from ldm_jax.training.loop import Trainer, TrainingDiverged
from tests.conftest import ROOT
from tests.training.test_harness import ONE_DEVICE, run, small_config


@contextlib.contextmanager
def warnings_of_ldm_jax():
  """The ldm_jax logger's warnings (it may not propagate to pytest's caplog)."""
  records = []
  handler = logging.Handler(logging.WARNING)
  handler.emit = records.append
  logger = logging.getLogger("ldm_jax")
  logger.addHandler(handler)
  try:
    yield records
  finally:
    logger.removeHandler(handler)


@pytest.fixture
def six_steps(tiny_ae_six_steps):
  """A single-device workdir with checkpoints 3 and 6 (the session's; copied before use)."""
  workdir = tiny_ae_six_steps[1]
  assert Checkpointer(str(workdir / "checkpoints"), read_only=True).all_steps() == [3, 6]
  return workdir


@pytest.fixture
def workdir(six_steps, tmp_path):
  shutil.copytree(six_steps, tmp_path / "run")
  return tmp_path / "run"


def _moved_aside(checkpoints: pathlib.Path, step: int) -> list[pathlib.Path]:
  return sorted(checkpoints.glob(f"{step}.damaged-*"))


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(workdir):
  checkpoints = workdir / "checkpoints"
  files = [p for p in (checkpoints / "6" / "state").rglob("*") if p.is_file()]
  biggest = max(files, key=lambda p: p.stat().st_size)
  with open(biggest, "r+b") as f:
    f.truncate(biggest.stat().st_size // 2)
  with warnings_of_ldm_jax() as warned:
    trainer = Trainer(small_config(**ONE_DEVICE), str(workdir), devices=jax.devices()[:1])
  try:
    assert trainer.start_step == 3
  finally:
    trainer.close()
  messages = [r.getMessage() for r in warned if "damaged" in r.getMessage()]
  assert len(messages) == 1 and "checkpoints/6' is corrupt or unreadable" in messages[0], messages
  moved = _moved_aside(checkpoints, 6)
  assert len(moved) == 1 and (moved[0] / "state").is_dir()   # moved, not deleted
  assert moved[0].name in messages[0]
  assert Checkpointer(str(checkpoints)).all_steps() == [3]


def test_missing_metadata_falls_back_before_the_stage_is_built(workdir):
  """The resume config check reads the newest step's metadata first: it falls back as well."""
  checkpoints = workdir / "checkpoints"
  shutil.rmtree(checkpoints / "6" / "meta")
  with warnings_of_ldm_jax() as warned:
    assert Checkpointer(str(checkpoints)).readable_step() == 3
  assert any("checkpoints/6' has unreadable metadata" in r.getMessage() for r in warned)
  assert len(_moved_aside(checkpoints, 6)) == 1
  assert Checkpointer(str(checkpoints)).all_steps() == [3]


def test_no_readable_checkpoint_is_an_error_and_moves_nothing(workdir):
  checkpoints = workdir / "checkpoints"
  for step in ("3", "6"):
    shutil.rmtree(checkpoints / step / "meta")
  with pytest.raises(CheckpointError, match=r"checkpoints/6' has unreadable metadata .* and so "
                     r"is every earlier step \(3\); no checkpoint in .* is readable"):
    Checkpointer(str(checkpoints)).readable_step()
  assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["3", "6"]


def test_stale_temporary_folders_are_removed_on_open(tmp_path):
  checkpoints = tmp_path / "checkpoints"
  stale = checkpoints / "9.orbax-checkpoint-tmp-1733000000"
  (stale / "state").mkdir(parents=True)
  (stale / "state" / "part").write_bytes(b"\0" * 10)
  Checkpointer(str(checkpoints), read_only=True)   # reading never touches anything
  assert stale.exists()
  with warnings_of_ldm_jax() as warned:
    checkpointer = Checkpointer(str(checkpoints))
  assert not stale.exists()
  assert checkpointer.all_steps() == []
  assert any("interrupted save" in r.getMessage() for r in warned)


def test_non_finite_state_is_never_saved(tmp_path, monkeypatch):
  """Step 6 makes a parameter NaN while its loss is still finite: the run stops naming step 6,
  checkpoint 6 is not written, and checkpoint 3 (the last good one) is finite."""
  real_compile = Trainer._compile   # pylint: disable=protected-access

  def compile_then_poison(self):
    """The real (cached) step program, then logvar set to NaN after step 6 on the host side:
    the run's programs stay those of the six-step run, so nothing new compiles."""
    real_compile(self)
    step_fn = self.train_step

    def poisoned(state, batch, frozen):
      state, metrics = step_fn(state, batch, frozen)
      if int(state.step) == 6:
        params = dict(state.params)
        params["logvar"] = params["logvar"] * jnp.nan
        state = state.replace(params=type(state.params)(params))
      return state, metrics

    self.train_step = poisoned

  monkeypatch.setattr(Trainer, "_compile", compile_then_poison)
  with pytest.raises(TrainingDiverged, match=r"training diverged: the updated parameters, "
                     r"optimizer state or EMA are not finite at step 6; the last good checkpoint "
                     r"is step 3"):
    run(tmp_path)
  assert Checkpointer(str(tmp_path / "checkpoints")).all_steps() == [3]
  saved = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / "3" / "state")
  leaves = jax.tree_util.tree_leaves(saved)
  assert leaves and all(np.isfinite(np.asarray(x)).all() for x in leaves
                        if np.issubdtype(np.asarray(x).dtype, np.floating))


# ---------------------------------------------------------------------------------------------
# The real CLI in a subprocess
# ---------------------------------------------------------------------------------------------
TINY = ["--config.data.image_size=16", "--config.data.resize_mode=stretch",
        "--config.train.batch_size=8", "--config.train.log_every=1", "--config.data.eval_split=",
        "--config.train.async_checkpointing=True"]


def _train(workdir, *flags, **popen):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, "train.py", "--config=configs/tiny_ae.py",
                           f"--workdir={workdir}", *TINY, *flags], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


@pytest.mark.slow  # compiles the tiny model in a fresh process
def test_sigterm_twice_saves_the_current_step_and_exits_3(tmp_path):
  proc = _train(tmp_path, "--config.train.num_steps=100000", "--config.train.ckpt_every=100000")
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 300
  while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
    assert proc.poll() is None and time.time() < deadline, proc.communicate()
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  time.sleep(0.3)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 3, err
  last = err.strip().splitlines()[-1]
  assert last.startswith("preempted: stopped at step "), err
  step = int(last.split("stopped at step ")[1].split()[0])
  assert "Traceback" not in err
  checkpointer = Checkpointer(str(tmp_path / "checkpoints"), read_only=True)
  assert checkpointer.all_steps() == [step]
  assert checkpointer.read_meta(step)["format"] == 2
  saved = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / str(step) / "state")
  assert int(saved["step"]) == step


@pytest.mark.slow  # two runs of the real CLI
def test_failed_save_is_one_line_and_the_previous_checkpoint_restores(tmp_path):
  first = _train(tmp_path, "--config.train.num_steps=2", "--config.train.ckpt_every=2")
  _, err = first.communicate(timeout=300)
  assert first.returncode == 0, err
  limit = 64 * 1024   # the logs fit; a checkpoint's arrays do not

  def small_files():
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # EFBIG instead of a kill

  second = _train(tmp_path, "--config.train.num_steps=4", "--config.train.ckpt_every=2",
                  preexec_fn=small_files)
  _, err = second.communicate(timeout=300)
  assert second.returncode == 2, err
  errors = [line for line in err.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, err
  assert errors[0].startswith("error: saving checkpoint '"), err
  assert "/checkpoints/4' failed (" in errors[0], errors[0]
  assert "the last complete checkpoint is step 2" in errors[0], errors[0]
  assert "Traceback" not in err, err   # Orbax's threads are stopped before the process exits
  checkpointer = Checkpointer(str(tmp_path / "checkpoints"))   # also removes the half save
  assert checkpointer.all_steps() == [2]
  assert not list((tmp_path / "checkpoints").glob("*orbax-checkpoint-tmp*"))
  assert checkpointer.read_meta(2)["format"] == 2


def _losses(workdir) -> dict:
  """step -> loss from a run's metrics.jsonl."""
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return {r["step"]: r["loss"] for r in map(json.loads, lines)}


@pytest.mark.slow  # three runs of the real CLI
def test_kill_during_an_async_save_resumes_from_the_last_complete_step(tmp_path):
  """SIGKILL while Orbax writes a step: the restart drops the half-written folder, resumes from
  the newest complete checkpoint and logs the same losses as a run that was never killed."""
  steps = ["--config.train.num_steps=12", "--config.train.ckpt_every=1"]
  straight = _train(tmp_path / "straight", *steps)
  _, err = straight.communicate(timeout=300)
  assert straight.returncode == 0, err

  killed_dir = tmp_path / "killed"
  checkpoints = killed_dir / "checkpoints"
  killed = _train(killed_dir, *steps)
  half = None
  deadline = time.time() + 300
  while half is None:
    assert killed.poll() is None and time.time() < deadline, \
        ("the run ended before a save of step >= 3 was seen in progress", killed.communicate())
    names = os.listdir(checkpoints) if checkpoints.is_dir() else []
    half = next((n for n in names if ".orbax-checkpoint-tmp" in n and int(n.split(".")[0]) >= 3),
                None)
    time.sleep(0.0005)
  killed.kill()
  killed.wait()
  in_progress = int(half.split(".")[0])
  complete = Checkpointer(str(checkpoints), read_only=True).all_steps()
  assert complete and max(complete) < in_progress, (complete, half)

  again = _train(killed_dir, *steps)
  _, err = again.communicate(timeout=300)
  assert again.returncode == 0, err
  assert f"resumed from {killed_dir}/checkpoints step {max(complete)}" in err, err
  assert not list(checkpoints.glob("*orbax-checkpoint-tmp*"))
  expected, got = _losses(tmp_path / "straight"), _losses(killed_dir)
  assert sorted(got) == sorted(expected) == list(range(1, 13))
  np.testing.assert_allclose([got[s] for s in sorted(got)],
                             [expected[s] for s in sorted(expected)], rtol=1e-6)


WORKER = """
import os, sys
coordinator, process, processes, workdir, steps, ckpt_every = sys.argv[1:7]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // int(processes)}"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
if int(processes) > 1:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=int(processes),
                             process_id=int(process))
from ldm_jax import cli, config as config_lib
from ldm_jax.data import presets
from ldm_jax.errors import Preempted
from ldm_jax.training.loop import train_and_evaluate
cli.setup_logging()
c = config_lib.defaults("autoencoder")
presets.use_packaged_mnist(c, image_size=16)
c.model.update(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=3, embed_dim=3)
c.loss.lpips_weight = 0.0
c.disc.update(base_channels=32, num_layers=2)
c.train.update(batch_size=16, num_steps=int(steps), log_every=1, ckpt_every=int(ckpt_every),
               image_every=0, scale_lr=False)
c.data.update(eval_split="", resize_mode="stretch")
c.mesh.update(data=-1, fsdp=2)
try:
  train_and_evaluate(c, workdir)
except Preempted as e:
  print("STOPPED", e.step, flush=True)
  sys.exit(3)
"""


def _hosts(processes: int, workdir, steps: int, ckpt_every: int) -> list[subprocess.Popen]:
  """`processes` real JAX processes (8 CPU devices in all, a (4, 2) data x fsdp mesh) training
  the tiny autoencoder in one workdir; with 2 they meet through jax.distributed and gloo."""
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  env.pop("XLA_FLAGS", None)
  return [subprocess.Popen([sys.executable, "-c", WORKER, f"127.0.0.1:{port}", str(i),
                            str(processes), str(workdir), str(steps), str(ckpt_every)],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True) for i in range(processes)]


def _finish(procs, timeout=500) -> list[tuple[str, str]]:
  try:
    return [p.communicate(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()


@pytest.mark.slow  # four multi-device runs, two of them with 2 processes
def test_two_hosts_match_one_and_a_two_host_resume_matches_the_straight_run(tmp_path):
  """2 processes x 4 devices log the losses of 1 process x 8 (same mesh, same global batch;
  only the collectives' reduction order may differ), and a 2-process run resumed from its step-2
  checkpoint logs exactly the losses of the 2-process run that went straight to step 4."""
  for processes, name in ((1, "one"), (2, "two")):
    procs = _hosts(processes, tmp_path / name, steps=4, ckpt_every=2)
    outs = _finish(procs)
    assert all(p.returncode == 0 for p in procs), outs
  resumed = tmp_path / "resumed"
  shutil.copytree(tmp_path / "two", resumed)
  shutil.rmtree(resumed / "checkpoints" / "4")
  procs = _hosts(2, resumed, steps=4, ckpt_every=2)
  outs = _finish(procs)
  assert all(p.returncode == 0 for p in procs), outs
  assert f"resumed from {resumed}/checkpoints step 2" in outs[0][1], outs[0][1]
  one, two, again = (_losses(tmp_path / n) for n in ("one", "two", "resumed"))
  assert sorted(one) == sorted(two) == sorted(again) == [1, 2, 3, 4]
  assert [again[s] for s in range(1, 5)] == [two[s] for s in range(1, 5)]
  np.testing.assert_allclose([two[s] for s in range(1, 5)], [one[s] for s in range(1, 5)],
                             rtol=1e-5)


@pytest.mark.slow  # two processes compile and train on 2 x 4 CPU devices
def test_sigterm_to_one_of_two_hosts_stops_both_at_the_same_step(tmp_path):
  procs = _hosts(2, tmp_path, steps=100000, ckpt_every=100000)
  try:
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 500
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
      assert all(p.poll() is None for p in procs) and time.time() < deadline, \
          [p.communicate() for p in procs]
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)   # the host that does not write the logs
    outs = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert [p.returncode for p in procs] == [3, 3], outs
  steps = {int(out.split("STOPPED ")[1].split()[0]) for out, _ in outs}
  assert len(steps) == 1, outs
  step = steps.pop()
  assert Checkpointer(str(tmp_path / "checkpoints"), read_only=True).all_steps() == [step]

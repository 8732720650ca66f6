"""Workdir and output-folder locks: a second holder stops with one line naming the first (a real
second process), the lock of a killed process is taken over, one from another host never is;
training and sampling take their folder's lock before any other work."""
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from ldm_jax import locks, sampling_job
from ldm_jax.errors import LockError
from ldm_jax.training.loop import Trainer
from tests.conftest import ROOT, load_config

HOLDER = """
import sys, time
from ldm_jax import locks
locks.lock_folder(sys.argv[1], sys.argv[2])
print("locked", flush=True)
time.sleep(600)
"""


def _holder(folder, purpose):
  """A second process that takes the lock of `folder` and sleeps."""
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), purpose], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, text=True)
  line = proc.stdout.readline().strip()
  if line != "locked":
    proc.kill()
    proc.wait()
    pytest.fail(f"the holder process did not take the lock (exit {proc.poll()})")
  return proc


@pytest.fixture
def ldm_jax_log(caplog):
  logger = logging.getLogger("ldm_jax")
  logger.addHandler(caplog.handler)   # whether or not it propagates
  yield caplog
  logger.removeHandler(caplog.handler)


def test_second_holder_is_refused_and_a_killed_holders_lock_is_taken_over(tmp_path,
                                                                          ldm_jax_log):
  proc = _holder(tmp_path, "training run")
  try:
    with pytest.raises(LockError) as error:
      locks.lock_folder(str(tmp_path), "training run")
    message = str(error.value)
    assert re.search(rf"^'{re.escape(str(tmp_path))}' is in use by another training run \(host "
                     rf"{re.escape(socket.gethostname())}, pid {proc.pid}, started \d{{4}}-.* "
                     rf"UTC\); stop it or use another folder", message), message
    assert "\n" not in message
  finally:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
  lock_file = tmp_path / locks.LOCK_NAME
  assert json.loads(lock_file.read_text())["pid"] == proc.pid   # SIGKILL released nothing
  lock = locks.lock_folder(str(tmp_path), "training run")
  assert f"pid {proc.pid}" in ldm_jax_log.text and "no longer running" in ldm_jax_log.text
  assert json.loads(lock_file.read_text())["pid"] == os.getpid()
  with pytest.raises(LockError, match=f"pid {os.getpid()}"):   # not twice, not even by us
    locks.lock_folder(str(tmp_path), "training run")
  lock.release()
  lock.release()
  assert not lock_file.exists()
  assert os.listdir(tmp_path) == []


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
  lock_file = tmp_path / locks.LOCK_NAME
  lock_file.write_text(json.dumps({"host": "elsewhere-42", "pid": 1, "started": "then"}))
  with pytest.raises(LockError, match=r"\(host elsewhere-42, pid 1, started then\); a process "
                     r"on another host cannot be checked from here: if that run is gone, delete "
                     rf"'{re.escape(str(lock_file))}'"):
    locks.lock_folder(str(tmp_path), "sampling job")
  assert lock_file.exists()


def test_an_unwritten_lock_waits_then_counts_as_stale(tmp_path):
  lock_file = tmp_path / locks.LOCK_NAME
  lock_file.write_text("")        # created, not yet written (or its creator died right there)
  with pytest.raises(LockError, match="is being locked by another sampling job right now"):
    locks.lock_folder(str(tmp_path), "sampling job")
  old = time.time() - 2 * locks.UNREADABLE_GRACE_S
  os.utime(lock_file, (old, old))
  with locks.lock_folder(str(tmp_path), "sampling job") as lock:
    assert lock.held
  assert not lock_file.exists()


def test_only_enabled_processes_lock(tmp_path):
  """Hosts other than 0 of a multi-host job take no lock."""
  lock = locks.lock_folder(str(tmp_path / "new"), "training run", enabled=False)
  assert not lock.held and not (tmp_path / "new").exists()
  lock.release()


def test_training_and_sampling_stop_at_a_held_lock_before_any_work(tmp_path):
  proc = _holder(tmp_path, "training run")
  try:
    config = load_config("tiny_ae", "kl")
    with pytest.raises(LockError, match=rf"another training run \(host .*, pid {proc.pid}"):
      Trainer(config, str(tmp_path), devices=None)
    with pytest.raises(LockError, match=rf"pid {proc.pid}"):
      sampling_job.run(None, sampling_job.Job(4), str(tmp_path))   # no model needed to refuse
    assert os.listdir(tmp_path) == [locks.LOCK_NAME]
  finally:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

"""Unreadable images in a training folder (a truncated JPEG and a zero-byte file), through the
real training loop: 'skip' trains on, counts both and resumes exactly; 'error' names the file,
saves the completed step, and a rerun after the fix loses nothing before it."""
import io
import json
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from ldm_jax.errors import DataError
from ldm_jax.training.loop import train_and_evaluate
from tests.training.test_harness import ONE_DEVICE, small_config

# The harness's tiny autoencoder on one device (its compiled programs are in the test cache
# already), on 32 grey files, unshuffled: step 1 reads files 0-15, step 2 files 16-31.
GOOD = 30


def _folder(root):
  """30 small JPEGs, then the two bad files last in sorted order (so in step 2's batch)."""
  root.mkdir()
  rng = np.random.default_rng(0)
  for i in range(GOOD):
    Image.fromarray(rng.integers(0, 256, (20, 20), np.uint8)).save(root / f"{i:02d}.jpg")
  buffer = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)).save(buffer, "JPEG")
  (root / "zz_truncated.jpg").write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
  (root / "zz_empty.jpg").write_bytes(b"")
  return root


def _train(folder, workdir, on_bad_image, steps, ckpt_every=1, log_every=1):
  c = small_config(**ONE_DEVICE, train__num_steps=steps, train__ckpt_every=ckpt_every,
                   train__log_every=log_every, train__keep_checkpoints=10,
                   data__on_bad_image=on_bad_image)
  c.data.source, c.data.path, c.data.split = "image_folder", str(folder), ""
  c.data.shuffle = False
  return train_and_evaluate(c, str(workdir), devices=jax.devices()[:1])


def test_skip_counts_both_files_and_resumes_exactly(tmp_path, tiny_ae_six_steps):
  del tiny_ae_six_steps   # compiles the programs these runs share
  folder = _folder(tmp_path / "images")
  straight = _train(folder, tmp_path / "straight", "skip", 3)
  assert [h["data/skipped_files"] for h in straight] == [0, 2, 2]   # step 3 starts epoch 2
  assert all(np.isfinite(h["loss"]) for h in straight)
  # Resume from step 1 (before the bad files): the same substitutes, losses and counts.
  resumed = tmp_path / "resumed"
  shutil.copytree(tmp_path / "straight", resumed)
  for step in (2, 3):
    shutil.rmtree(resumed / "checkpoints" / str(step))
  again = _train(folder, resumed, "skip", 3)
  assert [h["step"] for h in again] == [2, 3]
  for want, got in zip(straight[1:], again):
    assert got["data/skipped_files"] == want["data/skipped_files"]
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)


def test_error_names_the_file_saves_the_completed_step_and_a_rerun_resumes(tmp_path, caplog,
                                                                          tiny_ae_six_steps):
  del tiny_ae_six_steps   # compiles the programs these runs share
  folder = _folder(tmp_path / "images")
  workdir = tmp_path / "run"
  with pytest.raises(DataError) as error:
    # No periodic save or log line before it: step 1 is logged and saved on the way out.
    _train(folder, workdir, "error", 3, ckpt_every=100, log_every=2)
  message = str(error.value)
  assert "\n" not in message and "zz_" in message and ".jpg" in message
  assert f"saved checkpoint '{workdir}/checkpoints/1'" in message
  assert "data.on_bad_image='skip'" in message
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1"]
  for bad in folder.glob("zz_*"):   # the user removes the bad files and reruns
    bad.unlink()
  caplog.set_level("INFO", logger="ldm_jax")
  history = _train(folder, workdir, "error", 3, ckpt_every=100, log_every=2)
  assert any("resumed from" in r.getMessage() and "step 1" in r.getMessage()
             for r in caplog.records)
  assert [h["step"] for h in history] == [2, 3]
  logged = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").open()]
  assert logged == [1, 2, 3]

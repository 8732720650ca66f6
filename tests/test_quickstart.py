"""The quickstart end to end, shrunk to a few steps: it writes the grid, the checkpoints and the
results, and a rerun resumes instead of starting over."""
import json
import os

import jax
import pytest

from ldm_jax import quickstart
from ldm_jax.checkpoint import Checkpointer


@pytest.mark.slow  # 3-4 min of CPU; tests/test_routes.py runs train -> sample in the default run
def test_quickstart_runs_end_to_end_and_resumes(tmp_path):
  kw = dict(ae_steps=3, ldm_steps=3, per_class=1, classifier_steps=5, train_digits=256,
            devices=jax.devices()[:1])  # as on a CPU machine: one device
  results = quickstart.run(str(tmp_path), **kw)
  assert os.path.exists(results["grid"])
  assert Checkpointer(results["autoencoder_checkpoints"]).all_steps() == [3]
  assert Checkpointer(results["ldm_checkpoints"]).all_steps() == [3]
  assert results["num_samples"] == 10
  assert 0.0 <= results["sample_accuracy"] <= 1.0
  assert results["frechet_real_vs_real"] >= 0.0 and results["frechet_samples_vs_real"] >= 0.0
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["grid"] == results["grid"]
  pngs = sorted(os.listdir(tmp_path / "samples" / "images"))
  mtimes = {p: os.path.getmtime(tmp_path / "samples" / "images" / p) for p in pngs}
  again = quickstart.run(str(tmp_path), **kw)
  # Nothing retrained or resampled: same checkpoints, same files, same numbers.
  assert Checkpointer(again["ldm_checkpoints"]).all_steps() == [3]
  assert {p: os.path.getmtime(tmp_path / "samples" / "images" / p) for p in pngs} == mtimes
  assert again["sample_accuracy"] == results["sample_accuracy"]

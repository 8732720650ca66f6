"""Nothing lost or torn under faults: atomic writes leave no partial file, a resumed run's
metrics.jsonl has no duplicate or torn line, samples.npz is streamed from the PNGs (and loads
like np.savez's), and an interrupted export can be rerun."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from ldm_jax import fileio, sampling_job
from ldm_jax.checkpoint import (CheckpointError, is_inference_export, load_inference,
                                save_inference)
from ldm_jax.training.reporting import MetricsLog, save_png


def test_a_writer_that_raises_leaves_the_old_file_and_no_temporary(tmp_path):
  path = tmp_path / "out" / "job.json"
  fileio.atomic_write_text(str(path), "old")
  with pytest.raises(RuntimeError, match="killed"):
    with fileio.atomic_path(str(path)) as tmp:
      with open(tmp, "w", encoding="utf-8") as f:
        f.write('{"half": ')
      raise RuntimeError("killed")
  assert path.read_text() == "old"
  assert os.listdir(tmp_path / "out") == ["job.json"]
  with pytest.raises(KeyboardInterrupt):   # not only Exceptions
    with fileio.atomic_path(str(tmp_path / "new.txt")):
      raise KeyboardInterrupt
  assert not (tmp_path / "new.txt").exists()


def test_temporaries_keep_the_extension_writers_look_at(tmp_path):
  with fileio.atomic_path(str(tmp_path / "a.npy")) as tmp:
    assert tmp.endswith(".npy") and os.path.dirname(tmp) == str(tmp_path)
    np.save(tmp, np.arange(3))    # np.save would append .npy to any other name
  np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.arange(3))
  save_png(str(tmp_path / "deep" / "g.png"), np.full((4, 5, 1), 7, np.uint8))
  assert np.asarray(Image.open(tmp_path / "deep" / "g.png")).shape == (4, 5)
  assert sorted(os.listdir(tmp_path)) == ["a.npy", "deep"]
  assert os.listdir(tmp_path / "deep") == ["g.png"]


def _steps(path):
  return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_resumed_metrics_have_no_duplicate_steps_and_no_torn_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  log = MetricsLog(str(tmp_path))
  for step in range(1, 7):
    log.write(step, {"loss": step / 10})
  with open(path, "a", encoding="utf-8") as f:
    f.write('{"step": 7, "lo')        # killed mid-line
  # The checkpoint the run resumes from is step 4: steps 5-8 are logged again.
  resumed = MetricsLog(str(tmp_path), resume_step=4)
  assert _steps(path) == [1, 2, 3, 4]
  for step in range(5, 9):
    resumed.write(step, {"loss": float(step)})
  assert _steps(path) == list(range(1, 9))
  assert path.read_text().endswith("\n")
  assert json.loads(path.read_text().splitlines()[4]) == {"step": 5, "loss": 5.0}
  # A run that restarts from scratch (no checkpoint was saved) keeps none of the old lines.
  MetricsLog(str(tmp_path), resume_step=0)
  assert path.read_text() == ""
  MetricsLog(str(tmp_path / "fresh"), resume_step=0)   # no file yet: nothing to do
  assert not (tmp_path / "fresh").exists()


def _job_with_pngs(folder, kind, n=13):
  rng = np.random.default_rng(0)
  channels = 1 if kind == "labels" else 3
  images = rng.integers(0, 256, (n, 8, 6, channels), dtype=np.uint8)
  labels = [int(c) for c in rng.integers(0, 4, n)] if kind == "labels" else None
  prompts = [f"prompt number {i}" * (i % 3 + 1) for i in range(n)] if kind == "prompts" else None
  os.makedirs(folder / "images")
  for i, image in enumerate(images):
    sampling_job.save_png(
        sampling_job._png_path(str(folder), i), image)  # pylint: disable=protected-access
  return sampling_job.Job(n, labels=labels, prompts=prompts), images


@pytest.mark.parametrize("kind", ["labels", "prompts", "unconditional"])
def test_streamed_npz_loads_like_np_savez(tmp_path, monkeypatch, kind):
  job, images = _job_with_pngs(tmp_path, kind)
  reads = []
  real_read = sampling_job._read_png  # pylint: disable=protected-access

  def counted(path):
    reads.append(path)
    return real_read(path)

  def no_stack(*args, **kwargs):
    raise AssertionError("the job's images must not be stacked in memory")

  monkeypatch.setattr(sampling_job, "_read_png", counted)
  monkeypatch.setattr(np, "stack", no_stack)
  sampling_job._write_summaries(str(tmp_path), job)  # pylint: disable=protected-access
  monkeypatch.undo()
  # Each PNG once for the npz, plus the first one and those the grid shows.
  assert len(reads) <= 1 + job.num_samples + min(64, job.num_samples)
  extra = {}
  if job.labels is not None:
    extra["labels"] = np.asarray(job.labels, np.int32)
  if job.prompts is not None:
    extra["prompts"] = np.asarray(job.prompts)
  np.savez_compressed(tmp_path / "reference.npz", images=images, **extra)
  with np.load(tmp_path / "samples.npz") as got, np.load(tmp_path / "reference.npz") as want:
    assert sorted(got.files) == sorted(want.files)
    for key in want.files:
      assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
      np.testing.assert_array_equal(got[key], want[key], key)
  assert Image.open(tmp_path / "grid.png").size[0] > 6
  assert sorted(os.listdir(tmp_path)) == ["grid.png", "images", "reference.npz", "samples.npz"]


def test_a_sample_of_another_shape_is_named(tmp_path):
  job, _ = _job_with_pngs(tmp_path, "unconditional", n=3)
  # pylint: disable=protected-access
  sampling_job.save_png(sampling_job._png_path(str(tmp_path), 2),
                                 np.zeros((9, 6, 3), np.uint8))
  with pytest.raises(sampling_job.JobError, match=r"000002.png' is uint8\[9, 6, 3\], unlike "
                     r"the first sample's uint8\[8, 6, 3\]; delete it and rerun"):
    sampling_job._write_summaries(str(tmp_path), job)  # pylint: disable=protected-access
  assert not (tmp_path / "samples.npz").exists()
  assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


def test_an_interrupted_export_can_be_rerun_and_a_complete_one_is_refused(tmp_path):
  variables = {"autoencoder": {"params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}}}
  out = tmp_path / "export"
  kw = dict(config={"stage": "autoencoder"}, meta={"stage": "autoencoder"})
  # Killed after params/ was saved, before meta.json: here a missing extra file stops it.
  with pytest.raises(FileNotFoundError):
    save_inference(str(out), variables, extra_files={"tokenizer.json": str(tmp_path / "no")},
                   **kw)
  assert (out / "params").is_dir() and not (out / "meta.json").exists()
  (out / "params.orbax-checkpoint-tmp-1234").mkdir()   # an Orbax save killed half-way
  assert not is_inference_export(str(out))
  with pytest.raises(CheckpointError, match=r"holds an interrupted export \(params/ but no "
                     r"meta.json\); rerun the export"):
    load_inference(str(out))
  (tmp_path / "vocab.json").write_text("{}")
  save_inference(str(out), variables, extra_files={"tokenizer.json": str(tmp_path / "vocab.json")},
                 **kw)
  assert is_inference_export(str(out))
  assert sorted(os.listdir(out)) == ["config.json", "meta.json", "params", "tokenizer.json"]
  loaded, meta, config = load_inference(str(out))
  np.testing.assert_array_equal(np.asarray(loaded["autoencoder"]["params"]["w"]),
                                variables["autoencoder"]["params"]["w"])
  assert meta["components"] == ["autoencoder"] and config == {"stage": "autoencoder"}
  with pytest.raises(CheckpointError, match="already holds an export; choose another --out"):
    save_inference(str(out), variables, **kw)

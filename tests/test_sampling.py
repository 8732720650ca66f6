"""Sampling jobs and exports: a resumed job writes exactly the files of an uninterrupted one,
one compilation serves a whole job, samples do not depend on batching, exports round-trip, and
tiled decoding blends tiles exactly; PNGs are written on a thread while the next batch runs,
the compute dtype and attention kernel are set at load time, and the batch can fill the devices."""
import filecmp
import json
import os
import pathlib
import re
import shutil
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from ldm_jax import sampling_job
from ldm_jax.checkpoint import CheckpointError
from ldm_jax.inference import Pipeline, export_pipeline, load_pipeline, tiled_decode
from ldm_jax.data.preprocess import to_uint8
from ldm_jax.first_stage import load_first_stage
from ldm_jax.ldm import LatentDiffusion
from tests.conftest import load_config
from tests.helpers import export_random_autoencoder


ONE_DEVICE = Mesh(np.asarray(jax.devices()[:1]), ("data",))


def run(pipeline, job, out, mesh=ONE_DEVICE):
  return sampling_job.run(pipeline, job, str(out), mesh)


@pytest.fixture(scope="module")
def trained(class_ldm):
  """The session's tiny class-conditional LDM (3 steps; checkpoint in a workdir)."""
  return class_ldm[1]


@pytest.fixture(scope="module")
def pipeline(trained):
  return load_pipeline(trained)


def _files(folder):
  return sorted(os.listdir(os.path.join(folder, "images")))


def test_job_writes_pngs_npz_grid_and_compiles_once(pipeline, tmp_path):
  job = sampling_job.job_for(pipeline, per_class=3, classes=[1, 4, 7], batch_size=4,
                             guidance_scale=2.0)
  assert job.labels == [1, 1, 1, 4, 4, 4, 7, 7, 7]
  result = run(pipeline, job, tmp_path)
  assert result["generated"] == 9 and result["compilations"] == 1
  assert _files(tmp_path) == [f"{i:06d}.png" for i in range(9)]
  data = np.load(tmp_path / "samples.npz")
  assert data["images"].shape == (9, 16, 16, 1) and data["images"].dtype == np.uint8
  np.testing.assert_array_equal(data["labels"], job.labels)
  assert (tmp_path / "grid.png").exists()


def test_resumed_job_writes_exactly_the_uninterrupted_files(pipeline, tmp_path, monkeypatch):
  kw = dict(num_samples=0, per_class=1, batch_size=4, eta=0.5)
  straight = tmp_path / "straight"
  run(pipeline, sampling_job.job_for(pipeline, **kw), straight)
  # Interrupt the second run in its second batch, before anything of that batch is written.
  interrupted = tmp_path / "interrupted"
  real = sampling_job.save_png
  calls = []

  def dying(path, image):
    calls.append(path)
    if len(calls) > 4:
      raise KeyboardInterrupt
    real(path, image)

  monkeypatch.setattr(sampling_job, "save_png", dying)
  with pytest.raises(KeyboardInterrupt):
    run(pipeline, sampling_job.job_for(pipeline, **kw), interrupted)
  monkeypatch.undo()
  assert len(_files(interrupted)) == 4
  result = run(pipeline, sampling_job.job_for(pipeline, **kw), interrupted)
  assert result["skipped"] == 4 and result["generated"] == 6
  assert _files(interrupted) == _files(straight)
  for name in _files(straight):
    assert filecmp.cmp(straight / "images" / name, interrupted / "images" / name, shallow=False)
  assert not list((interrupted / "images").glob("*.tmp"))


def test_samples_do_not_depend_on_batch_size_or_devices(pipeline, tmp_path):
  """Batches of 2 on one device and batches of 8 sharded over 8 devices give the same files."""
  a = tmp_path / "b2"
  b = tmp_path / "b8"
  for out, batch, mesh in ((a, 2, ONE_DEVICE), (b, 8, Mesh(np.asarray(jax.devices()),
                                                           ("data",)))):
    run(pipeline, sampling_job.job_for(pipeline, per_class=1, classes=[2, 3, 5],
                                       batch_size=batch, eta=1.0), out, mesh)
  for name in _files(a):
    assert filecmp.cmp(a / "images" / name, b / "images" / name, shallow=False)


def test_a_different_job_in_the_same_folder_is_refused(pipeline, tmp_path):
  run(pipeline, sampling_job.job_for(pipeline, per_class=1, batch_size=8, classes=[0]),
      tmp_path)
  with pytest.raises(sampling_job.JobError, match="differs in guidance_scale"):
    run(pipeline, sampling_job.job_for(pipeline, per_class=1, batch_size=8, classes=[0],
                                       guidance_scale=5.0), tmp_path)
  with pytest.raises(sampling_job.JobError, match=r"\[12\] outside the model's 10 classes"):
    sampling_job.job_for(pipeline, per_class=1, classes=[12])


def test_export_round_trip_samples_identically(pipeline, trained, tmp_path):
  export_pipeline(pipeline, str(tmp_path / "export"))
  loaded = load_pipeline(str(tmp_path / "export"))
  assert loaded.num_classes == 10 and loaded.scale_factor == pipeline.scale_factor
  for a, b in zip(jax.tree_util.tree_leaves(pipeline.params),
                  jax.tree_util.tree_leaves(loaded.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  job = dict(per_class=1, classes=[3, 8], batch_size=2)
  run(pipeline, sampling_job.job_for(pipeline, **job), tmp_path / "from_run")
  run(loaded, sampling_job.job_for(loaded, **job), tmp_path / "from_export")
  for name in _files(tmp_path / "from_run"):
    assert filecmp.cmp(tmp_path / "from_run" / "images" / name,
                       tmp_path / "from_export" / "images" / name, shallow=False)
  with pytest.raises(CheckpointError, match="already holds an export"):
    export_pipeline(pipeline, str(tmp_path / "export"))
  with pytest.raises(CheckpointError, match="neither an ldm_jax export nor a training workdir"):
    load_pipeline(str(tmp_path))


def test_workdirs_from_before_checkpoints_recorded_the_model_still_load(pipeline, trained,
                                                                         tmp_path):
  """A format-1 workdir (metadata without 'format'/'model'): config.json and the weights give
  the same model; the recorded facts of a current one are what it reads otherwise."""
  old = tmp_path / "old"
  shutil.copytree(trained, old)
  meta_file = old / "checkpoints" / "3" / "meta" / "metadata"
  meta = json.loads(meta_file.read_text())
  assert meta["format"] == 2 and meta["model"]["num_classes"] == 10
  assert meta["model"]["first_stage"]["path"] == pipeline.ldm.first.identity["path"]
  meta_file.write_text(json.dumps({k: v for k, v in meta.items() if k not in ("format", "model")}))
  loaded = load_pipeline(str(old))
  assert loaded.num_classes == 10 and loaded.scale_factor == pipeline.scale_factor
  for a, b in zip(jax.tree_util.tree_leaves(pipeline.params),
                  jax.tree_util.tree_leaves(loaded.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_tiled_decoding_blends_tiles_exactly():
  """With a local decoder (nearest x4 upsampling) tiling must reproduce the whole decode."""
  z = jax.random.normal(jax.random.PRNGKey(0), (2, 20, 28, 3))
  upsample = lambda t: jnp.repeat(jnp.repeat(t, 4, axis=1), 4, axis=2)  # noqa: E731
  tiled = tiled_decode(upsample, z, tile=8, factor=4)
  np.testing.assert_allclose(tiled, upsample(z), rtol=1e-6, atol=1e-6)
  sizes = []

  def recording(t):
    sizes.append(t.shape)
    return upsample(t)

  tiled_decode(recording, z, tile=8, factor=4)
  assert sizes == [(2, 8, 8, 3)]  # one traced decoder call on 8x8 tiles (lax.map)


def test_larger_images_than_training(pipeline, tmp_path):
  job = sampling_job.job_for(pipeline, per_class=1, classes=[1], batch_size=1, image_size=32,
                             tile=8, steps=2)
  run(pipeline, job, tmp_path)
  data = np.load(tmp_path / "samples.npz")
  assert data["images"].shape == (1, 32, 32, 1)


def test_jobs_are_checked_against_the_model(tmp_path):
  """An unconditional model refuses class jobs and needs a sample count (no compile needed)."""
  ae = export_random_autoencoder(tmp_path / "ae", "vq", image_size=16, ch_mult=(1, 2))
  c = load_config("tiny_ldm", "uncond")
  c.first_stage.checkpoint = ae
  c.data.image_size = 16
  ldm = LatentDiffusion(c, load_first_stage(ae))
  pipe = Pipeline(ldm, params={}, frozen={}, scale_factor=1.0, source="random")
  with pytest.raises(sampling_job.JobError, match="not class-conditional"):
    sampling_job.job_for(pipe, per_class=2)
  with pytest.raises(sampling_job.JobError, match="nothing to sample"):
    sampling_job.job_for(pipe)
  assert sampling_job.job_for(pipe, num_samples=3).num_samples == 3


def test_pngs_are_written_on_a_thread_while_the_next_batch_runs(pipeline, tmp_path,
                                                                monkeypatch):
  """Batch k+1 is dispatched before batch k is fetched; a writer thread (not the main one)
  writes the PNGs, and they hold exactly the pixels generate returns."""
  events, real_save, real_condition = [], sampling_job.save_png, pipeline.condition_batch
  real_gather = sampling_job.multihost_utils.process_allgather

  def saving(path, image):
    if os.path.basename(os.path.dirname(path)) == "images":   # not grid.png
      events.append(("write", threading.current_thread() is threading.main_thread()))
    real_save(path, image)

  def gathering(x, **kw):
    if getattr(x, "ndim", 0) == 4:   # images (sync_global_devices gathers too)
      events.append("fetch")
    return real_gather(x, **kw)

  monkeypatch.setattr(sampling_job, "save_png", saving)
  monkeypatch.setattr(pipeline, "condition_batch",
                      lambda *a, **kw: events.append("dispatch") or real_condition(*a, **kw))
  monkeypatch.setattr(sampling_job.multihost_utils, "process_allgather", gathering)
  job = sampling_job.job_for(pipeline, per_class=1, classes=[0, 2, 4, 6, 9], batch_size=2)
  assert run(pipeline, job, tmp_path)["generated"] == 5
  order = [e for e in events if isinstance(e, str)]
  assert order == ["dispatch", "dispatch", "fetch", "dispatch", "fetch", "fetch"]
  assert [e for e in events if not isinstance(e, str)] == [("write", False)] * 5
  # The reference: the job's program called batch by batch on the main thread, as before.
  generate, params, frozen = sampling_job._compile(  # pylint: disable=protected-access
      pipeline, job, ONE_DEVICE)
  expected = []
  for idx in ([0, 1], [2, 3], [4, 4]):
    images = generate(params, frozen, jax.random.PRNGKey(0), jnp.asarray(idx, jnp.int32),
                      real_condition(2, labels=[job.labels[i] for i in idx]))
    expected.extend(to_uint8(np.asarray(images)))
  written = np.load(tmp_path / "samples.npz")["images"]
  np.testing.assert_array_equal(written, np.asarray(expected[:5]))


def test_a_failed_write_is_one_job_error_and_the_job_resumes(pipeline, tmp_path, monkeypatch):
  real, calls = sampling_job.save_png, []

  def full_disk(path, image):
    calls.append(path)
    if len(calls) == 3:
      raise OSError(28, "No space left on device")
    real(path, image)

  monkeypatch.setattr(sampling_job, "save_png", full_disk)
  kw = dict(per_class=1, classes=[1, 3, 5, 7, 8], batch_size=2)
  with pytest.raises(sampling_job.JobError) as caught:
    run(pipeline, sampling_job.job_for(pipeline, **kw), tmp_path)
  message = str(caught.value)
  assert "\n" not in message and "000002.png" in message and "No space left" in message
  assert "rerun the same command" in message
  assert _files(tmp_path) == ["000000.png", "000001.png"]   # nothing after the failure
  assert not list((tmp_path / "images").glob("*.tmp"))
  monkeypatch.undo()
  result = run(pipeline, sampling_job.job_for(pipeline, **kw), tmp_path)
  assert result["skipped"] == 2 and result["generated"] == 3


def test_bfloat16_samples_are_close_to_float32_ones(pipeline, trained, tmp_path):
  """load_pipeline(dtype=...) changes the modules' compute dtype, not the weights; the pixels
  move a little (measured on CPU: mean |diff| 0.86 of 255, max 5, 60% of the pixels differ) and
  the job records the dtype, so a resume in another one is refused. `attention` reaches the
  UNet (through unet.attention_impl) and the autoencoder."""
  bf16 = load_pipeline(trained, dtype="bfloat16", attention="xla")
  assert bf16.config.train.compute_dtype == "bfloat16"
  assert bf16.trained_dtype == pipeline.config.train.compute_dtype
  assert bf16.ldm.unet.dtype == jnp.bfloat16 and bf16.ldm.first.module.dtype == jnp.bfloat16
  for a, b in zip(jax.tree_util.tree_leaves(pipeline.params),
                  jax.tree_util.tree_leaves(bf16.params)):
    assert a.dtype == b.dtype
  assert bf16.ldm.unet.attention_impl == "xla" == bf16.ldm.first.module.attention_impl
  job = dict(per_class=1, classes=[3, 8], batch_size=0)   # auto: 2 on one CPU device
  assert run(pipeline, sampling_job.job_for(pipeline, **job), tmp_path / "f32")[
      "batch_size"] == 2
  run(bf16, sampling_job.job_for(bf16, **job), tmp_path / "bf16")
  f32_images = np.load(tmp_path / "f32" / "samples.npz")["images"].astype(np.float32)
  bf16_images = np.load(tmp_path / "bf16" / "samples.npz")["images"].astype(np.float32)
  diff = np.abs(f32_images - bf16_images)
  assert 0 < diff.mean() < BF16_MEAN_ABS_DIFF and diff.max() <= BF16_MAX_ABS_DIFF, diff
  with pytest.raises(sampling_job.JobError, match=r"differs in dtype\).*--dtype=bfloat16"):
    run(pipeline, sampling_job.job_for(pipeline, **job), tmp_path / "bf16")


BF16_MEAN_ABS_DIFF, BF16_MAX_ABS_DIFF = 3.0, 32   # uint8 levels; ~3x and ~6x the measured


def test_unknown_dtype_or_attention_is_one_job_error(trained):
  with pytest.raises(sampling_job.JobError, match="--attention: expected one of"):
    load_pipeline(trained, attention="flash")
  with pytest.raises(sampling_job.JobError, match="--dtype: expected one of"):
    load_pipeline(trained, dtype="float16")


def test_auto_batch_fills_the_devices():
  """64 per accelerator up to 32x32 latents, fewer by area beyond; 16 in all on CPU; a multiple
  of the device count, and no more than the job (rounded up to the devices)."""
  auto = sampling_job.auto_batch_size
  assert auto(1000, (8, 8), 8, "cpu") == 16 and auto(1000, (8, 8), 1, "cpu") == 16
  assert auto(1000, (8, 8), 3, "cpu") == 15
  assert auto(5, (8, 8), 1, "cpu") == 5 and auto(5, (8, 8), 8, "cpu") == 8
  assert auto(10_000, (32, 32), 8, "gpu") == 512 and auto(10_000, (16, 16), 4, "tpu") == 256
  assert auto(10_000, (64, 64), 8, "gpu") == 128 and auto(10_000, (256, 256), 8, "gpu") == 8
  assert auto(10, (32, 32), 8, "gpu") == 16


def test_readme_documents_the_speed_flags():
  readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
  section = re.search(r"## Sampling and export\n(.*?)\n## ", readme, re.S).group(1)
  for flag in ("--batch_size", "--dtype", "--attention"):
    assert flag in section, flag


def test_file_jobs_from_before_consistency_and_seamless_resume_as_they_ran(tmp_path):
  """Upscale jobs recorded before --consistency were raw, inpaint jobs before --seamless pasted
  (and before --keep_known, an inpainting model's took the concat condition alone):
  their folders resume under those values and refuse the new defaults, naming the field and the
  flag that resumes them."""
  for field, old_value, new_default, flag in (("consistency", 0, 3, "--consistency=0"),
                                              ("seamless", False, True, "--noseamless"),
                                              ("keep_known", False, True, "--nokeep_known")):
    out = str(tmp_path / field)
    os.makedirs(out)
    with open(os.path.join(out, "job.json"), "w", encoding="utf-8") as f:
      json.dump({"task": "x", "dtype": "float32"}, f)
    sampling_job.check_job(out, {"task": "x", "dtype": "float32", field: old_value})
    with pytest.raises(sampling_job.JobError, match=f"differs in {field}\\).*rerun with {flag}"):
      sampling_job.check_job(out, {"task": "x", "dtype": "float32", field: new_default})

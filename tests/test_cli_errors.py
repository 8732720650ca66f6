"""A user's mistake at a CLI ends as one line on stderr naming the field or file, exit status 2,
and no traceback (unless --verbose or LDM_JAX_VERBOSE=1).

Each check runs the real CLI in its own subprocess, the way a user runs it. Most import JAX
(seconds), so only the cheapest, config-flag mistakes that fail before any model is built, run in
the default suite; the rest are marked slow.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "interop"


def run_cli(args, devices: int = 1, timeout: int = 600, **env):
  """Runs `python <args>` from the repository root on CPU, as a user would."""
  full_env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
                  XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **env)
  if "LDM_JAX_VERBOSE" not in env:
    full_env.pop("LDM_JAX_VERBOSE", None)
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True,
                        text=True, timeout=timeout, check=False)


def one_error_line(proc, *names) -> str:
  """The single stderr line of a failed CLI, checked: exit 2, no traceback, names all `names`."""
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 2, proc.stderr
  assert "Traceback" not in proc.stderr, proc.stderr
  assert len(lines) == 1, proc.stderr
  line = lines[0]
  assert line.startswith("error: "), line
  for name in names:
    assert name in line, line
  return line


def train(tmp_path, *flags, config="configs/tiny_ae.py", devices=1, **env):
  return run_cli(["train.py", f"--config={config}", f"--workdir={tmp_path / 'run'}", *flags],
                 devices=devices, **env)


# -- config flags: fail while parsing argv, before any model exists (the default suite) --------
def test_unknown_field_names_the_closest_field(tmp_path):
  line = one_error_line(train(tmp_path, "--config.train.batchsize=3"),
                        "--config.train.batchsize", "did you mean 'train.batch_size'")
  assert "unknown config field" in line


@pytest.mark.slow
def test_misspelled_section_names_the_closest_field(tmp_path):
  one_error_line(train(tmp_path, "--config.modle.ch_mult=(1,2)"),
                 "--config.modle.ch_mult", "did you mean 'model.ch_mult'")


def test_wrong_type_names_the_field_and_the_type(tmp_path):
  one_error_line(train(tmp_path, "--config.train.batch_size=abc"),
                 "--config.train.batch_size=abc", "expected an int")
  # ml_collections takes any tuple; its items are checked against the schema's.
  one_error_line(train(tmp_path, "--config.model.ch_mult=abc"),
                 "--config.model.ch_mult=abc", "expected a tuple of ints")


def test_missing_config_file_is_named(tmp_path):
  one_error_line(train(tmp_path, config="configs/no_such_config.py"),
                 "--config", "configs/no_such_config.py")


def test_unknown_variant_lists_the_variants(tmp_path):
  one_error_line(train(tmp_path, config="configs/tiny_ldm.py:nope"),
                 "configs/tiny_ldm.py:nope", "'nope'", "class")


def test_argparse_clis_report_usage_errors_in_one_line():
  one_error_line(run_cli(["-m", "ldm_jax.export", "--out=x"]), "--workdir", "--help")


def test_sample_task_modes_are_listed_and_a_missing_input_folder_is_named(tmp_path):
  help_text = run_cli(["sample.py", "--helpfull"]).stdout
  for mode in ("generate:", "upscale:", "inpaint:", "semantic:", "layout:"):
    assert mode in help_text
  one_error_line(run_cli(["sample.py", f"--checkpoint={tmp_path}", f"--out={tmp_path}/o",
                          "--task=upscale"]), "--task=upscale", "--inputs")
  one_error_line(run_cli(["sample.py", f"--checkpoint={tmp_path}", f"--out={tmp_path}/o",
                          "--task=layout", f"--inputs={tmp_path}", "--classes=3"]),
                 "--classes", "--task=layout")


def test_verbose_adds_the_traceback(tmp_path):
  for proc in (train(tmp_path, "--config.train.batch_size=abc", "--verbose"),
               train(tmp_path, "--config.train.batch_size=abc", LDM_JAX_VERBOSE="1")):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --config.train.batch_size")


# -- mistakes found once the model or the job is built (slow: they import the whole stack) -----


@pytest.mark.slow
def test_batch_not_divisible_by_the_devices(tmp_path):
  one_error_line(train(tmp_path, "--config.train.batch_size=12", "--config.mesh.fsdp=1",
                       devices=8), "train.batch_size", "8 devices")


@pytest.mark.slow
def test_head_width_not_dividing_the_channels(tmp_path):
  one_error_line(train(tmp_path, "--config.unet.num_head_channels=7",
                       config="configs/tiny_ldm.py"), "unet.num_head_channels")


@pytest.mark.slow
def test_out_folder_of_another_job_is_refused(tmp_path):
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  from ldm_jax.first_stage import load_first_stage
  from ldm_jax.inference import LatentDiffusion, Pipeline, export_pipeline
  from tests.conftest import load_config
  from tests.helpers import export_random_autoencoder
  ae = export_random_autoencoder(tmp_path / "ae", "kl", image_size=16, ch_mult=(1, 2))
  c = load_config("tiny_ldm", "class")
  c.first_stage.checkpoint, c.data.image_size = ae, 16
  ldm = LatentDiffusion(c, load_first_stage(ae), num_classes=10)
  params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), ldm.abstract_params())
  export = export_pipeline(Pipeline(ldm, params, {"autoencoder": ldm.first.variables}, 1.0,
                                    "random"), str(tmp_path / "export"))
  out = tmp_path / "samples"
  out.mkdir()
  (out / "job.json").write_text(json.dumps({"num_samples": 3, "seed": 1}))
  proc = run_cli(["sample.py", f"--checkpoint={export}", f"--out={out}", "--per_class=1"])
  one_error_line(proc, str(out), "different job", "--out")


@pytest.mark.slow
def test_corrupt_safetensors_is_named(tmp_path):
  vae = tmp_path / "vae"
  vae.mkdir()
  shutil.copy(FIXTURES / "vae_kl" / "config.json", vae / "config.json")
  (vae / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10\x00\x00\x00not safetensors")
  proc = run_cli(["-m", "ldm_jax.interop.convert", "diffusers", f"--vae={vae}",
                  f"--out={tmp_path / 'export'}"])
  one_error_line(proc, "diffusion_pytorch_model.safetensors")


@pytest.mark.slow
def test_corrupt_ckpt_is_named(tmp_path):
  pytest.importorskip("torch")
  ckpt = tmp_path / "model.ckpt"
  ckpt.write_bytes(b"PK\x03\x04 this is not a torch checkpoint" * 4)
  proc = run_cli(["-m", "ldm_jax.interop.convert", "compvis", f"--ckpt={ckpt}",
                  f"--yaml={FIXTURES / 'compvis_kl_ae.yaml'}", f"--out={tmp_path / 'export'}"])
  one_error_line(proc, "model.ckpt")

"""Config schema: defaults validate, bad fields give one clear line, every field is documented."""
import pathlib
import subprocess
import sys

import pytest

from ldm_jax import config as config_lib
from ldm_jax.config import ConfigError
from tests.conftest import ROOT, load_config

CONFIG_FILES = sorted(p.stem for p in (ROOT / "configs").glob("*.py"))


@pytest.mark.parametrize("stage", config_lib.STAGES)
def test_defaults_have_documented_fields(stage):
  for path, field in config_lib.fields(stage).items():
    assert len(field.doc) > 15, f"{path} has no real documentation"
    if field.choices:
      assert field.default in field.choices, path


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_shipped_config_validates(name):
  config = load_config(name)
  config_lib.validate(config)


def test_docs_are_current():
  docs = (ROOT / "docs" / "config.md").read_text()
  assert docs.strip() == config_lib.to_markdown().strip(), (
      "docs/config.md is stale: run `python -m ldm_jax.config > docs/config.md`")


def _tiny():
  return load_config("tiny_ae")


def test_unknown_field_names_it_with_a_suggestion():
  c = _tiny()
  c.train.bach_size = 8
  with pytest.raises(ConfigError, match=r"unknown config field 'train.bach_size'.*"
                     r"did you mean 'train.batch_size'"):
    config_lib.validate(c)


def test_locked_defaults_reject_unknown_assignment():
  c = config_lib.defaults("autoencoder")
  with pytest.raises(AttributeError, match="chh"):
    c.model.chh = 3


@pytest.mark.parametrize("field,value,message", [
    ("model.type", "vae", r"model.type: expected one of \['kl', 'vq'\], got 'vae'"),
    ("train.grad_accum", 3, r"train.batch_size \(16\) must be divisible by train.grad_accum"),
    ("data.image_size", 30, r"data.image_size \(30\) must be divisible by the downsampling"),
    ("model.attn_resolutions", (5,), r"model.attn_resolutions: 5 is not a feature-map side"),
    ("train.lr", -1.0, r"train.lr: must be positive"),
    ("mesh.data", 0, r"mesh.data: must be >= 1 or -1"),
])
def test_bad_values_are_named(field, value, message):
  c = _tiny()
  section, key = field.split(".")
  c[section][key] = value
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(c)


def test_wrong_type_in_a_plain_config():
  """Configs built as plain dicts (not from defaults) are type-checked by validate."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict(_tiny().to_dict(), type_safe=False)
  c.train.batch_size = "8"
  with pytest.raises(ConfigError, match=r"train.batch_size: expected int, got str '8'"):
    config_lib.validate(c)


def test_missing_stage_and_missing_field():
  c = _tiny()
  del c.train["ema_decay"]
  with pytest.raises(ConfigError, match="missing config field 'train.ema_decay'"):
    config_lib.validate(c)
  c = _tiny()
  c.stage = "diffusion"
  with pytest.raises(ConfigError, match="stage: expected one of"):
    config_lib.validate(c)


def test_train_cli_reports_unknown_override_in_one_line(tmp_path):
  """The command line rejects a misspelt override before any work starts."""
  result = subprocess.run(
      [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/tiny_ae.py"),
       f"--workdir={tmp_path}", "--config.train.bach_size=4"],
      capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert result.returncode != 0
  assert "bach_size" in result.stderr


def test_train_cli_reports_config_error_in_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/tiny_ae.py"),
       f"--workdir={tmp_path}", "--config.data.image_size=30"],
      capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert result.returncode == 2, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: data.image_size (30) must be divisible"), last
  assert not pathlib.Path(tmp_path, "checkpoints").exists()

"""Config schema: defaults validate, bad fields give one clear line, every field is documented."""
import pathlib
import re
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


def _variants(name):
  text = (ROOT / "configs" / f"{name}.py").read_text()
  match = re.search(r"^VARIANTS = \(([^)]*)\)", text, re.M)
  return [None] + ([v.strip().strip('"') for v in match.group(1).split(",") if v.strip()]
                   if match else [])


@pytest.mark.parametrize("name,variant", [(n, v) for n in CONFIG_FILES for v in _variants(n)])
def test_every_shipped_config_and_variant_validates(name, variant):
  config = load_config(name, variant)
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


@pytest.mark.parametrize("field,value,message", [
    ("unet.attention_resolutions", (2, 8), r"unet.attention_resolutions: 8 is not a downsample "
     r"factor of this UNet \(factors are \[1, 2\]"),
    ("unet.num_head_channels", 24, r"unet.num_head_channels \(24\) must divide the 64 "
     r"channels of level 1"),
    ("unet.model_channels", 48, r"unet.model_channels \(48\) x unet.channel_mult \(1, 2\) "
     r"must be divisible by unet.norm_groups \(32\)"),
    ("unet.use_spatial_transformer", False, r"unet.use_spatial_transformer: cond.type='class'"),
    ("cond.p_uncond", 1.0, r"cond.p_uncond: expected a probability in \[0, 1\)"),
    ("sample.steps", 2000, r"sample.steps \(2000\) exceeds diffusion.timesteps \(1000\)"),
    ("first_stage.checkpoint", "", r"first_stage.checkpoint: required"),
])
def test_bad_ldm_values_are_named(field, value, message):
  """The stage-2 checks owned by models/build.py, models/conditioning.py and schedules.py."""
  c = load_config("tiny_ldm", "class")
  section, key = field.split(".")
  c[section][key] = value
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(c)


def test_heads_are_checked_at_every_attended_level():
  """The middle block attends at the last level even when attention_resolutions omits it."""
  c = load_config("tiny_ldm", "class")
  c.unet.attention_resolutions = ()
  c.unet.channel_mult = (1, 3)
  c.unet.num_head_channels = 64
  with pytest.raises(ConfigError, match=r"unet.num_head_channels \(64\) must divide the 96 "
                     r"channels of level 1"):
    config_lib.validate(c)
  c.unet.num_head_channels, c.unet.num_heads = -1, 5
  with pytest.raises(ConfigError, match=r"unet.num_heads \(5\) must divide the 96 channels"):
    config_lib.validate(c)
  c.unet.num_heads = 3
  config_lib.validate(c)


def test_text_conditioning_checks():
  c = load_config("tiny_ldm", "text")
  c.cond.text_heads = 3
  with pytest.raises(ConfigError, match=r"cond.text_heads \(3\) must divide cond.embed_dim"):
    config_lib.validate(c)
  c = load_config("tiny_ldm", "text")
  c.cond.text_tokenizer = "vocab"
  with pytest.raises(ConfigError, match=r"cond.text_vocab: text conditioning"):
    config_lib.validate(c)


def test_guidance_needs_a_condition():
  c = load_config("tiny_ldm", "uncond")
  c.sample.guidance_scale = 3.0
  with pytest.raises(ConfigError, match=r"sample.guidance_scale \(3.0\): cond.type='none'"):
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


def test_segmentation_rescaler_channels_are_checked():
  c = load_config("tiny_ldm", "class")
  c.cond.update({"type": "concat", "concat": "segmentation", "seg_classes": 5,
                 "rescaler_channels": -1})
  c.unet.use_spatial_transformer = False
  with pytest.raises(ConfigError, match=r"cond.rescaler_channels: expected 0 \(the one-hot map "
                     r"as it is\) or a channel count, got -1"):
    config_lib.validate(c)
  c.cond.rescaler_channels = 3
  config_lib.validate(c)

"""Resuming with a config that gained fields since the checkpoint (ldm_jax/training/resume.py):
a field that shapes one concat route only stops runs on that route."""
import json

import pytest

from ldm_jax.errors import ConfigError
from ldm_jax.training.resume import check_resume_config
from tests.conftest import load_config

ROUTE_FIELDS = ("rescaler_channels", "rescaler_antialias", "inpaint_convention")


def _saved_before_the_fields(config) -> dict:
  saved = json.loads(config.to_json_best_effort())
  for field in ROUTE_FIELDS:
    saved["cond"].pop(field)
  return saved


def test_segmentation_fields_stop_only_segmentation_runs():
  """Old runs' rescalers antialiased (ADDED_FIELDS: True); the new default is False."""
  config = load_config("tiny_ldm", "class")
  check_resume_config(_saved_before_the_fields(config), config, "w")   # no rescaler: no change
  config.cond.update({"type": "concat", "concat": "segmentation", "seg_classes": 5})
  saved = _saved_before_the_fields(config)
  with pytest.raises(ConfigError, match=r"^cond.rescaler_antialias True -> False: the "
                     r"checkpoint in w was trained with the old value"):
    check_resume_config(saved, config, "w")
  config.cond.rescaler_antialias = True
  check_resume_config(saved, config, "w")
  config.cond.rescaler_channels = 3
  with pytest.raises(ConfigError, match=r"^cond.rescaler_channels 0 -> 3"):
    check_resume_config(saved, config, "w")


def test_stage_one_configs_have_no_route():
  config = load_config("tiny_ae")
  saved = json.loads(config.to_json_best_effort())
  check_resume_config(saved, config, "w")
  config.model.ch = 64
  with pytest.raises(ConfigError, match=r"^model.ch 32 -> 64"):
    check_resume_config(saved, config, "w")


def test_old_autoencoders_resume_with_mid_attention():
  """Runs from before model.mid_attention had it (ADDED_FIELDS: True)."""
  config = load_config("tiny_ae")
  saved = json.loads(config.to_json_best_effort())
  saved["model"].pop("mid_attention")
  check_resume_config(saved, config, "w")
  config.model.mid_attention = False
  with pytest.raises(ConfigError, match=r"^model.mid_attention True -> False"):
    check_resume_config(saved, config, "w")

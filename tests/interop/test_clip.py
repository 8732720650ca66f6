"""CLIP text encoders (Stable Diffusion's conditioning) against transformers' CLIPTextModel, on
the tiny random fixtures of tests/fixtures/make_sd_fixtures.py (SD 1.x: quick-GELU, padded with
<|endoftext|>; SD 2.x: GELU, padded with '!', and its OpenCLIP single-file layout)."""
import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from ldm_jax.data.text import ClipTokenizer
from ldm_jax.interop import clip
from ldm_jax.interop.weights import ConversionError, UnsupportedError

SD = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "sd"


@pytest.fixture(scope="module")
def outputs():
  return load_file(str(SD / "outputs.safetensors"))


def _texts():
  p = json.loads((SD / "prompts.json").read_text())
  return p["prompts"] + p["negative"] + [p["long"]]


def rel(got, want):
  return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_tokenizer_pads_as_the_released_pipelines(name, outputs):
  tok = ClipTokenizer(str(SD / f"tokenizer_{name}"))
  ids = tok.encode(_texts())
  np.testing.assert_array_equal(ids, outputs[f"{name}_ids"])
  pad = ids[2, -1]   # the short negative prompt ends in padding
  assert pad == (tok.eos_id if name == "sd1" else 0) == tok.pad_id
  assert ids[-1, -1] == tok.eos_id   # the long prompt is truncated to 77 and still ends


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_last_and_penultimate_hidden_states_match_transformers(name, outputs):
  ids = jnp.asarray(outputs[f"{name}_ids"])
  hidden = outputs[f"{name}_hidden"]           # (layers + 1, N, 77, width)
  module, variables, fields = clip.load_transformers(str(SD / f"text_encoder_{name}"))
  assert fields["activation"] == ("quick_gelu" if name == "sd1" else "gelu")
  out, ours = module.apply(variables, ids, return_hidden=True)
  assert rel(out, outputs[f"{name}_last"]) < 1e-5
  for i, h in enumerate(ours):
    assert rel(h, hidden[i]) < 1e-5, i
  # penultimate: the hidden state before the last layer, through the final LayerNorm
  # (diffusers' clip_skip=1); the last layer is not even built.
  pen, pen_vars, _ = clip.load_transformers(str(SD / f"text_encoder_{name}"),
                                            layer="penultimate")
  assert f"layers_{fields['layers'] - 1}" not in pen_vars["params"]
  got = pen.apply(pen_vars, ids)
  h = hidden[-2].astype(np.float64)
  p = variables["params"]["final_layer_norm"]
  mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
  want = (h - mu) / np.sqrt(var + 1e-5) * np.asarray(p["scale"]) + np.asarray(p["bias"])
  assert rel(got, want) < 1e-5


def test_openclip_layout_loads_as_the_penultimate_encoder(outputs):
  """SD 2.x single files hold OpenCLIP's text tower; with its last resblock skipped it equals
  the transformers model diffusers stores."""
  state = load_file(str(SD / "openclip_sd2.safetensors"))
  hf = clip.openclip_to_transformers(state, "fixture")
  fields = clip.fields_from_state(hf, heads_width=12, activation="gelu", layer="penultimate",
                                  where="fixture")
  assert fields["layers"] == 4 and fields["heads"] == 2
  module, variables = clip.from_state(hf, fields, "fixture")
  got = module.apply(variables, jnp.asarray(outputs["sd2_ids"]))
  assert rel(got, outputs["sd2_last"]) < 1e-5


def test_round_trip_through_the_transformers_layout(tmp_path, outputs):
  module, variables, fields = clip.load_transformers(str(SD / "text_encoder_sd1"))
  clip.save_transformers(str(tmp_path / "te"), fields, variables, bos=1, eos=2, pad=2)
  again, again_vars, again_fields = clip.load_transformers(str(tmp_path / "te"))
  assert again_fields == fields
  ids = jnp.asarray(outputs["sd1_ids"])
  np.testing.assert_array_equal(module.apply(variables, ids), again.apply(again_vars, ids))


def test_bad_text_encoders_stop_with_one_line(tmp_path):
  with pytest.raises(ConversionError, match="has no CLIP text encoder"):
    clip.load_transformers(str(tmp_path))
  (tmp_path / "te").mkdir()
  config = json.loads((SD / "text_encoder_sd1" / "config.json").read_text())
  (tmp_path / "te" / "config.json").write_text(
      json.dumps(dict(config, architectures=["T5EncoderModel"], model_type="t5")))
  (tmp_path / "te" / "model.safetensors").write_bytes(
      (SD / "text_encoder_sd1" / "model.safetensors").read_bytes())
  with pytest.raises(UnsupportedError, match="T5EncoderModel .* is not supported"):
    clip.load_transformers(str(tmp_path / "te"))
  (tmp_path / "te" / "config.json").write_text(json.dumps(dict(config, hidden_act="relu")))
  with pytest.raises(UnsupportedError, match="hidden_act='relu'"):
    clip.load_transformers(str(tmp_path / "te"))

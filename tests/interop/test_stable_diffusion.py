"""Stable Diffusion checkpoints through ldm_jax against diffusers' StableDiffusionPipeline:
10-step guided text-to-image latents from a pipeline folder (SD 1.x-like eps, SD 2.x-like v),
the same model from CompVis single files (SD 1.x CLIP and SD 2.x OpenCLIP layouts), exports,
and the way back to a diffusers folder. Tiny random fixtures: tests/fixtures/make_sd_fixtures.py
(text encoders, tokenizers, reference outputs) and the interop fixtures' unet_linear / vae_kl."""
import dataclasses
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ldm_jax.data.sources import DataError
from ldm_jax.inference import SampleSettings, load_pipeline
from ldm_jax.interop import clip, stable_diffusion
from ldm_jax.interop.convert import main as convert_main
from ldm_jax.interop.weights import ConversionError, UnsupportedError
from tests.interop.helpers import FIXTURES, SD, compvis_state, rel_err, sd_pipeline_folder

PROMPTS = json.loads((SD / "prompts.json").read_text())
TOL = 1e-4
# The released families' rules, at fixture size: the fixtures' UNet has 2 heads, their text
# encoders 12-channel heads (the released models: 8 heads / 64-channel heads, and 64).
TOWERS = {k: dict(v, head_width=12) for k, v in clip.CLIP_TOWERS.items()}
FAMILIES = {k: dataclasses.replace(f, unet_heads=2, unet_head_channels=-1, image_size=16)
            for k, f in stable_diffusion.FAMILIES.items()}
TINY = {"towers": TOWERS, "families": FAMILIES}


@pytest.fixture(scope="module")
def reference():
  return load_file(str(SD / "outputs.safetensors"))


def single_file(root: pathlib.Path, name: str) -> pathlib.Path:
  """A CompVis SD single file: the fixture's UNet and KL first stage under their CompVis names
  and the text encoder under SD 1.x's (CLIP) or SD 2.x's (OpenCLIP) prefix."""
  state = compvis_state("sd")
  if name == "sd1":
    te = load_file(str(SD / "text_encoder_sd1" / "model.safetensors"))
    state.update({"cond_stage_model.transformer." + k: v for k, v in te.items()})
  else:
    te = load_file(str(SD / "openclip_sd2.safetensors"))
    state.update({"cond_stage_model.model." + k: v for k, v in te.items()})
  path = root / f"{name}.safetensors"
  save_file({k: np.asarray(v, np.float32) for k, v in state.items()}, str(path))
  return path


def latents(pipe, x_T):
  batch = pipe.condition_batch(2, prompts=PROMPTS["prompts"],
                               negative_prompts=PROMPTS["negative"])
  settings = SampleSettings("ddim", PROMPTS["steps"], 0.0, PROMPTS["guidance"], "uniform")
  return pipe.ldm.sample(pipe.params, pipe.frozen["autoencoder"], pipe.scale_factor, batch,
                         jnp.asarray(x_T), jax.random.PRNGKey(0), settings)


@pytest.mark.parametrize("name,prediction", [("sd1", "eps"), ("sd2", "v")])
def test_folder_text_to_image_equals_diffusers(name, prediction, reference, tmp_path):
  pipe = load_pipeline(str(sd_pipeline_folder(tmp_path, name)))
  assert pipe.config.diffusion.parameterization == prediction
  assert pipe.config.cond.clip_layer == "last" and pipe.scale_factor == 0.5
  z = latents(pipe, reference[f"{name}_x_T"])
  assert rel_err(z, reference[f"{name}_latents"]) < TOL
  images = pipe.ldm.decode(pipe.frozen["autoencoder"], z, pipe.scale_factor)
  got = (np.clip(np.asarray(images), -1, 1) + 1) / 2
  assert rel_err(got, reference[f"{name}_images"]) < TOL
  # negative prompts are the null condition: without them the samples differ
  batch = pipe.condition_batch(2, prompts=PROMPTS["prompts"])
  plain = pipe.ldm.sample(pipe.params, pipe.frozen["autoencoder"], pipe.scale_factor, batch,
                          jnp.asarray(reference[f"{name}_x_T"]), jax.random.PRNGKey(0),
                          SampleSettings("ddim", 10, 0.0, PROMPTS["guidance"], "uniform"))
  assert rel_err(plain[0], z[0]) > 1e-2   # "blurry" vs "" for the first sample
  assert rel_err(plain[1], z[1]) < TOL     # "" for the second: the same null


def test_single_files_equal_the_folder(reference, tmp_path):
  sd1 = single_file(tmp_path, "sd1")
  tokenizer = str(SD / "tokenizer_sd1")
  pipe = load_pipeline(str(sd1), sd_options={"tokenizer": tokenizer, **TINY})
  assert "SD 1.x read from the checkpoint's keys (eps prediction)" in pipe.source
  assert rel_err(latents(pipe, reference["sd1_x_T"]), reference["sd1_latents"]) < TOL
  # ... and with the YAML it was (notionally) released with
  yaml = tmp_path / "sd.yaml"
  shutil.copy(FIXTURES / "compvis_sd.yaml", yaml)
  pipe = load_pipeline(str(sd1), sd_options={"tokenizer": tokenizer, "yaml": str(yaml),
                                             "towers": TOWERS})
  assert rel_err(latents(pipe, reference["sd1_x_T"]), reference["sd1_latents"]) < TOL
  # SD 2.x: OpenCLIP's layout, the penultimate layer; eps or v must be said
  sd2 = single_file(tmp_path, "sd2")
  options = {"tokenizer": str(SD / "tokenizer_sd2"), **TINY}
  with pytest.raises(ConversionError, match="give --prediction=eps or --prediction=v"):
    load_pipeline(str(sd2), sd_options=options)
  pipe = load_pipeline(str(sd2), sd_options=dict(options, prediction="v"))
  assert pipe.config.cond.clip_layer == "penultimate"
  assert rel_err(latents(pipe, reference["sd2_x_T"]), reference["sd2_latents"]) < TOL


def test_export_and_back_to_a_diffusers_folder(reference, tmp_path, capsys):
  folder = sd_pipeline_folder(tmp_path, "sd2")
  convert_main(["sd", "--checkpoint", str(folder), "--out", str(tmp_path / "export")])
  pipe = load_pipeline(str(tmp_path / "export"))
  assert (tmp_path / "export" / "tokenizer" / "vocab.json").is_file()
  assert rel_err(latents(pipe, reference["sd2_x_T"]), reference["sd2_latents"]) < TOL
  convert_main(["to-diffusers", "--export", str(tmp_path / "export"),
                "--out", str(tmp_path / "hf")])
  for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
    assert (tmp_path / "hf" / part).is_dir(), part
  scheduler = json.loads((tmp_path / "hf" / "scheduler" / "scheduler_config.json").read_text())
  assert scheduler["prediction_type"] == "v_prediction"
  assert scheduler["beta_schedule"] == "scaled_linear"
  again = load_pipeline(str(tmp_path / "hf"))
  assert rel_err(latents(again, reference["sd2_x_T"]), reference["sd2_latents"]) < TOL
  # an SD 2.x single file's penultimate encoder is written as diffusers stores SD 2.x: the
  # layers it runs, read as 'last'
  single = load_pipeline(str(single_file(tmp_path, "sd2")), sd_options={
      "tokenizer": str(SD / "tokenizer_sd2"), "prediction": "v", **TINY})
  from ldm_jax.interop import stable_diffusion as sd_lib  # pylint: disable=g-import-not-at-top
  sd_lib.save_pipeline_parts(str(tmp_path / "hf2"), single)
  te = json.loads((tmp_path / "hf2" / "text_encoder" / "config.json").read_text())
  assert te["num_hidden_layers"] == 3 and te["hidden_act"] == "gelu"


@pytest.mark.parametrize("drop,message", [
    (("text_encoder",), "has no text_encoder/"),
    (("tokenizer",), "holds no CLIP tokenizer"),
])
def test_incomplete_folders_stop_with_one_line(drop, message, tmp_path):
  folder = sd_pipeline_folder(tmp_path, "sd1", drop=drop)
  with pytest.raises((ConversionError, DataError), match=message):
    load_pipeline(str(folder))


def test_bad_single_files_stop_with_one_line(tmp_path):
  sd1 = single_file(tmp_path, "sd1")
  with pytest.raises(ConversionError, match="give --tokenizer=DIR"):
    load_pipeline(str(sd1))
  state = load_file(str(sd1))
  weird = {k.replace("cond_stage_model.transformer.", "cond_stage_model.t5."): v
           for k, v in state.items()}
  save_file(weird, str(tmp_path / "t5.safetensors"))
  with pytest.raises(UnsupportedError, match=r"unknown text-encoder architecture "
                     r"\(cond_stage_model.t5.\*\)"):
    load_pipeline(str(tmp_path / "t5.safetensors"),
                  sd_options={"tokenizer": str(SD / "tokenizer_sd1")})
  bare = {k: v for k, v in state.items() if not k.startswith("cond_stage_model.")}
  save_file(bare, str(tmp_path / "bare.safetensors"))
  with pytest.raises(ConversionError, match="cannot tell SD 1.x from 2.x"):
    load_pipeline(str(tmp_path / "bare.safetensors"),
                  sd_options={"tokenizer": str(SD / "tokenizer_sd1")})


def test_sample_py_runs_a_stable_diffusion_folder(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from tests.test_cli_errors import one_error_line, run_cli  # pylint: disable=g-import-not-at-top
  folder = sd_pipeline_folder(tmp_path, "sd1")
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("\n".join(PROMPTS["prompts"]) + "\n")
  proc = run_cli(["sample.py", f"--checkpoint={folder}", f"--out={tmp_path}/out",
                  f"--prompts={prompts}", "--steps=3", "--guidance_scale=5",
                  "--negative_prompt=blurry", "--sampler=ddim"])
  assert proc.returncode == 0, proc.stderr
  images = [np.asarray(Image.open(tmp_path / "out" / "images" / f"{i:06d}.png"))
            for i in range(2)]
  assert images[0].shape == (16, 16, 3)
  assert np.abs(images[0].astype(int) - images[1]).mean() > 1   # the prompt changes the image
  one_error_line(run_cli(["sample.py", f"--checkpoint={single_file(tmp_path, 'sd1')}",
                          f"--out={tmp_path}/o2", f"--prompts={prompts}"]), "--tokenizer")

"""Fixtures of the interop tests (helpers.py reads the files)."""
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tests.interop.helpers import FIXTURES, compvis_state


@pytest.fixture(scope="session")
def outputs():
  """Inputs and PyTorch outputs (NHWC) of the fixture models."""
  return load_file(str(FIXTURES / "outputs.safetensors"))


@pytest.fixture(scope="session")
def outputs_groups8():
  """Inputs and PyTorch outputs (NHWC) of the GroupNorm-8 fixture models (unet_g8, vae_g8)."""
  return load_file(str(FIXTURES / "outputs_groups8.safetensors"))


@pytest.fixture(scope="session")
def outputs_concat():
  """Inputs and PyTorch outputs (NHWC) of the concat-conditioned CompVis fixtures (sr, inpaint,
  semantic): UNet eps on [z | condition], the inpainting condition, the SpatialRescaler."""
  return load_file(str(FIXTURES / "outputs_concat.safetensors"))


@pytest.fixture(scope="session")
def outputs_noattn():
  """Inputs and PyTorch outputs (NHWC) of vq_noattn, the autoencoder without attention:
  encoding, decoding and CompVis' inpainting condition."""
  return load_file(str(FIXTURES / "outputs_noattn.safetensors"))


@pytest.fixture(scope="session")
def fixture_dir():
  return FIXTURES


@pytest.fixture(scope="session")
def compvis_files(tmp_path_factory):
  """name -> (checkpoint .safetensors, yaml) of the CompVis fixtures. The cin checkpoint's
  non-EMA UNet weights are perturbed: only its EMA copy (model_ema.*) reproduces the outputs."""
  out = tmp_path_factory.mktemp("compvis")
  files = {}
  for name in ("cin", "sd", "kl_ae", "sr", "inpaint", "semantic", "inpaint_noattn"):
    state = compvis_state(name)
    if name == "cin":
      rng = np.random.default_rng(0)
      for k in state:
        if k.startswith("model.diffusion_model."):
          state[k] = (state[k] * 1.5 + rng.normal(0, 0.1, state[k].shape)).astype(np.float32)
    path = out / f"{name}.safetensors"
    save_file(state, str(path))
    yaml = out / f"{name}.yaml"
    shutil.copy(FIXTURES / f"compvis_{name}.yaml", yaml)
    files[name] = (str(path), str(yaml))
  return files

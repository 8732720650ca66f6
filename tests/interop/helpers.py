"""Helpers of the interop tests: the PyTorch-made files of tests/fixtures/interop (see
tests/fixtures/make_interop_fixtures.py) and CompVis checkpoints assembled from them."""
import gzip
import json
import pathlib
import shutil

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "interop"
WEIGHTS = "diffusion_pytorch_model.safetensors"
# Row tables of the CompVis fixtures, and the tensor files their non-folder sources name.
KEY_FILES = ("compvis_keys.json.gz", "compvis_concat_keys.json.gz",
             "compvis_noattn_keys.json.gz")
TENSOR_FILES = {"extras": "compvis_extras.safetensors", "concat": "compvis_concat.safetensors"}


def rel_err(got, want) -> float:
  """max |got - want| / max |want|."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def assert_same_tree(a, b):
  """Same structure, bit-identical leaves."""
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def compvis_state(name: str) -> dict:
  """The CompVis-layout state dict `name` ('cin', 'sd', 'kl_ae', 'sr', 'inpaint', 'semantic',
  'inpaint_noattn') as float32 numpy arrays."""
  tables = {}
  for file in KEY_FILES:
    with gzip.open(FIXTURES / file, "rt") as f:
      tables.update(json.load(f))
  sources, state = {}, {}
  for key, source, dkey, shape in tables[name]:
    if source not in sources:
      sources[source] = load_file(str(FIXTURES / TENSOR_FILES.get(source, f"{source}/{WEIGHTS}")))
    value = sources[source][dkey]
    state[key] = value.reshape(shape).astype(np.float32 if value.dtype.kind == "f"
                                             else value.dtype)
  return state


def copy_diffusers(src: pathlib.Path, dst: pathlib.Path, config_edit=None, state_edit=None):
  """A copy of a diffusers fixture folder with its config and/or weights edited."""
  dst.mkdir(parents=True, exist_ok=True)
  config = json.loads((src / "config.json").read_text())
  if config_edit:
    config_edit(config)
  (dst / "config.json").write_text(json.dumps(config))
  if state_edit:
    state = load_file(str(src / WEIGHTS))
    state_edit(state)
    save_file(state, str(dst / WEIGHTS))
  else:
    shutil.copy(src / WEIGHTS, dst / WEIGHTS)
  return dst


def vq_noattn_folder(dst: pathlib.Path) -> pathlib.Path:
  """The diffusers folder of vq_noattn (no attention anywhere): its stored config.json and
  vq/'s weights without the attention tensors (exactly its weights)."""
  dst.mkdir(parents=True, exist_ok=True)
  shutil.copy(FIXTURES / "vq_noattn" / "config.json", dst / "config.json")
  state = load_file(str(FIXTURES / "vq" / WEIGHTS))
  save_file({k: v for k, v in state.items() if ".attentions." not in k}, str(dst / WEIGHTS))
  return dst


SD = FIXTURES.parent / "sd"


def sd_pipeline_folder(root: pathlib.Path, name: str, drop=()) -> pathlib.Path:
  """A diffusers StableDiffusionPipeline folder of the SD fixture `name` ('sd1': eps, 'sd2': v):
  the interop fixtures' unet_linear and vae_kl with tests/fixtures/sd's text encoder, tokenizer
  and scheduler; `drop` leaves parts out."""
  d = root / name
  if d.exists():
    shutil.rmtree(d)
  parts = {"unet": FIXTURES / "unet_linear", "vae": FIXTURES / "vae_kl",
           "text_encoder": SD / f"text_encoder_{name}", "tokenizer": SD / f"tokenizer_{name}",
           "scheduler": SD / "scheduler"}
  for part, src in parts.items():
    if part not in drop:
      shutil.copytree(src, d / part)
  if "scheduler" not in drop:
    file = d / "scheduler" / "scheduler_config.json"
    config = json.loads(file.read_text())
    config["prediction_type"] = "epsilon" if name == "sd1" else "v_prediction"
    file.write_text(json.dumps(config))
  (d / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
  return d

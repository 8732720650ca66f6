"""CLIP text encoders of Stable Diffusion checkpoints to and from ldm_jax's CLIPTextEncoder.

Three layouts hold the same weights:
  transformers  a diffusers pipeline's text_encoder/ (config.json + model.safetensors), and
                CompVis SD 1.x single files under cond_stage_model.transformer.;
  OpenCLIP      CompVis SD 2.x single files under cond_stage_model.model. (fused in_proj
                q|k|v, c_fc / c_proj, ln_final, positional_embedding as a bare array).
OpenCLIP tensors are renamed into the transformers layout first, so one name map (data, below)
fills the Flax tree. No torch is needed.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import fileio
from ldm_jax.interop import names
from ldm_jax.interop.weights import (ConversionError, UnsupportedError, params_to_state,
                                     read_state_dict, state_to_params, write_safetensors)
from ldm_jax.models.clip import ACTIVATIONS, CLIPTextEncoder

HF_PREFIX = "text_model."
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
# transformers-layout tensors that are not weights of the text transformer itself.
_IGNORED = ("text_model.embeddings.position_ids", "text_projection.", "logit_scale")
# Per-layer renames, OpenCLIP (resblocks.i.<from>) -> transformers (layers.i.<to>).
_OPENCLIP_LAYER = (("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."),
                   ("attn.out_proj.", "self_attn.out_proj."), ("mlp.c_fc.", "mlp.fc1."),
                   ("mlp.c_proj.", "mlp.fc2."))
# CompVis cond_stage_config targets of the released SD text towers, and what their weights'
# shapes cannot tell: where they are, their layout, activation, output layer, head width.
CLIP_TOWERS = {
    "FrozenCLIPEmbedder": dict(prefix="cond_stage_model.transformer.", layout="transformers",
                               activation="quick_gelu", layer="last", head_width=64),
    "FrozenOpenCLIPEmbedder": dict(prefix="cond_stage_model.model.", layout="openclip",
                                   activation="gelu", layer="penultimate", head_width=64),
}
ENCODER_FIELDS = ("vocab_size", "max_length", "width", "layers", "heads", "intermediate",
                  "activation", "layer", "eps")


# ---------------------------------------------------------------------------------------------
# The name map (data)
# ---------------------------------------------------------------------------------------------
def entries(layers_run: int) -> list[names.Entry]:
  """The transformers names of a CLIPTextEncoder's parameters (its first `layers_run`
  layers)."""
  out = [names.Entry(("token_embedding",), "text_model.embeddings.token_embedding", "embed"),
         names.Entry(("position_embedding",), "text_model.embeddings.position_embedding",
                     "embed"),
         names.Entry(("final_layer_norm",), "text_model.final_layer_norm", "norm")]
  for i in range(layers_run):
    ours, theirs = f"layers_{i}", f"text_model.encoder.layers.{i}"
    out += [names.Entry((ours, "layer_norm1"), f"{theirs}.layer_norm1", "norm"),
            names.Entry((ours, "layer_norm2"), f"{theirs}.layer_norm2", "norm"),
            names.Entry((ours, "mlp_fc1"), f"{theirs}.mlp.fc1", "dense"),
            names.Entry((ours, "mlp_fc2"), f"{theirs}.mlp.fc2", "dense")]
    out += [names.Entry((ours, f"self_attn_{p}_proj"), f"{theirs}.self_attn.{p}_proj", "dense")
            for p in ("q", "k", "v", "out")]
  return out


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------
def fields_from_transformers(config: dict, where: str, layer: str = "last") -> dict:
  """CLIPTextEncoder fields of a transformers CLIPTextConfig (config.json of text_encoder/)."""
  arch = (config.get("architectures") or [config.get("_class_name", "CLIPTextModel")])[0]
  if arch not in _CLASSES or config.get("model_type", "clip_text_model") != "clip_text_model":
    raise UnsupportedError(f"{where}: text encoder {arch} (model_type "
                           f"{config.get('model_type')!r}) is not supported; ldm_jax runs "
                           f"CLIP text encoders ({', '.join(_CLASSES)})")
  act = config.get("hidden_act", "quick_gelu")
  if act not in ACTIVATIONS:
    raise UnsupportedError(f"{where}: hidden_act={act!r} is not supported "
                           f"({', '.join(ACTIVATIONS)} are)")
  width, heads = int(config.get("hidden_size", 512)), int(config.get("num_attention_heads", 8))
  if width % heads:
    raise ConversionError(f"{where}: hidden_size {width} is not a multiple of "
                          f"num_attention_heads {heads}")
  return dict(vocab_size=int(config.get("vocab_size", 49408)),
              max_length=int(config.get("max_position_embeddings", 77)), width=width,
              layers=int(config.get("num_hidden_layers", 12)), heads=heads,
              intermediate=int(config.get("intermediate_size", 2048)), activation=act,
              layer=layer, eps=float(config.get("layer_norm_eps", 1e-5)))


def transformers_config(fields: dict, *, bos: int, eos: int, pad: int) -> dict:
  """The config.json of a transformers CLIPTextModel with these fields (all layers run; a
  'penultimate' encoder is written with the layers it runs, as diffusers stores SD 2.x)."""
  layers = fields["layers"] - (1 if fields.get("layer") == "penultimate" else 0)
  return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
          "vocab_size": fields["vocab_size"], "hidden_size": fields["width"],
          "intermediate_size": fields["intermediate"], "num_hidden_layers": layers,
          "num_attention_heads": fields["heads"],
          "max_position_embeddings": fields["max_length"], "hidden_act": fields["activation"],
          "layer_norm_eps": fields["eps"], "projection_dim": fields["width"],
          "attention_dropout": 0.0, "dropout": 0.0, "initializer_range": 0.02,
          "initializer_factor": 1.0, "bos_token_id": bos, "eos_token_id": eos,
          "pad_token_id": pad, "torch_dtype": "float32"}


def module_of(fields: dict, dtype=jnp.float32) -> CLIPTextEncoder:
  return CLIPTextEncoder(**{k: fields[k] for k in ENCODER_FIELDS}, dtype=dtype)


def shapes_of(module: CLIPTextEncoder):
  tokens = jax.ShapeDtypeStruct((1, module.max_length), jnp.int32)
  return jax.eval_shape(lambda t: module.init(jax.random.PRNGKey(0), t), tokens)["params"]


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def from_state(state: dict, fields: dict, where: str):
  """(module, {'params'}) of a transformers-named state dict (prefix stripped to
  'text_model.'). A 'penultimate' encoder leaves the last layer's tensors unused."""
  module = module_of(fields)
  ignore = _IGNORED
  if module.layers_run < fields["layers"]:
    ignore += (f"text_model.encoder.layers.{fields['layers'] - 1}.",)
  params = state_to_params(state, entries(module.layers_run), shapes_of(module), where, ignore)
  return module, {"params": jax.tree_util.tree_map(jnp.asarray, params)}


def with_text_model_prefix(state: dict) -> dict:
  """transformers 5 saves CLIPTextModel without the 'text_model.' prefix the released SD folders
  (transformers 4.x) have; either reads the same."""
  return {(k if k.startswith(("text_model.", "text_projection.", "logit_scale"))
           else HF_PREFIX + k): v for k, v in state.items()}


def text_encoder_dir(path: str) -> str:
  """A text encoder folder: `path` itself, or a diffusers pipeline folder's text_encoder/."""
  for folder in (path, os.path.join(path, "text_encoder")):
    if os.path.isfile(os.path.join(folder, "config.json")) and any(
        os.path.isfile(os.path.join(folder, w)) for w in WEIGHT_FILES):
      return folder
  raise ConversionError(f"'{path}' has no CLIP text encoder: expected text_encoder/config.json "
                        f"with {' or '.join(WEIGHT_FILES)} (a diffusers Stable Diffusion "
                        f"folder) or those files in the folder itself")


def load_transformers(path: str, layer: str = "last"):
  """(module, variables, fields) of a transformers CLIP text model folder (or a diffusers
  pipeline folder's text_encoder/)."""
  folder = text_encoder_dir(path)
  where = f"CLIP text encoder '{folder}'"
  with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
    config = json.load(f)
  fields = fields_from_transformers(config, where, layer)
  weights = next(os.path.join(folder, w) for w in WEIGHT_FILES
                 if os.path.isfile(os.path.join(folder, w)))
  state = with_text_model_prefix(read_state_dict(weights))
  module, variables = from_state(state, fields, where)
  return module, variables, fields


def openclip_to_transformers(state: dict, where: str) -> dict:
  """An OpenCLIP text tower's tensors (prefix stripped) renamed into the transformers layout;
  the fused in_proj [q; k; v] rows are split."""
  out = {}
  for key, w in state.items():
    if key.startswith("transformer.resblocks."):
      i, rest = key[len("transformer.resblocks."):].split(".", 1)
      base = f"text_model.encoder.layers.{i}."
      if rest.startswith("attn.in_proj_"):
        kind = rest[len("attn.in_proj_"):]
        if w.shape[0] % 3:
          raise ConversionError(f"{where}: {key} has {w.shape[0]} rows, not q|k|v thirds")
        for name, part in zip("qkv", np.split(np.asarray(w), 3, axis=0)):
          out[f"{base}self_attn.{name}_proj.{kind}"] = part
        continue
      for old, new in _OPENCLIP_LAYER:
        if rest.startswith(old):
          out[base + new + rest[len(old):]] = w
          break
      else:
        out[key] = w     # reported as unexpected
    elif key == "token_embedding.weight":
      out["text_model.embeddings.token_embedding.weight"] = w
    elif key == "positional_embedding":
      out["text_model.embeddings.position_embedding.weight"] = w
    elif key.startswith("ln_final."):
      out["text_model.final_layer_norm." + key[len("ln_final."):]] = w
    elif key in ("text_projection", "logit_scale", "attn_mask"):
      continue           # the joint embedding's projection: not part of SD's conditioning
    else:
      out[key] = w
  return out


def from_checkpoint(state: dict, tower: dict, where: str, layer: str | None = None):
  """(module, variables, fields) of the text tower of a CompVis SD checkpoint; `tower` is a
  CLIP_TOWERS entry, `layer` overrides its output layer."""
  prefix = tower["prefix"]
  part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
  if not part:   # unsupported, not broken: the autoencoder and the UNet still convert
    raise UnsupportedError(f"{where}: the checkpoint holds no text encoder weights ({prefix}*)")
  part = (openclip_to_transformers(part, where) if tower["layout"] == "openclip"
          else with_text_model_prefix(part))
  fields = fields_from_state(part, heads_width=tower["head_width"],
                             activation=tower["activation"], layer=layer or tower["layer"],
                             where=where)
  module, variables = from_state(part, fields, f"{where} text encoder ({prefix}*)")
  return module, variables, fields


def fields_from_state(state: dict, *, heads_width: int, activation: str, layer: str,
                      where: str) -> dict:
  """CLIPTextEncoder fields read off a transformers-layout state dict's shapes; the head count
  comes from `heads_width` (channels per head), which shapes cannot tell."""
  try:
    vocab, width = state["text_model.embeddings.token_embedding.weight"].shape
    positions = state["text_model.embeddings.position_embedding.weight"].shape[0]
    intermediate = state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
  except KeyError as e:
    raise ConversionError(f"{where}: the CLIP text encoder lacks {e.args[0]}") from None
  layers = 1 + max(int(k.split(".")[3]) for k in state
                   if k.startswith("text_model.encoder.layers."))
  if width % heads_width:
    raise ConversionError(f"{where}: the text encoder's width {width} is not a multiple of "
                          f"its {heads_width}-channel heads")
  return dict(vocab_size=int(vocab), max_length=int(positions), width=int(width),
              layers=layers, heads=int(width) // heads_width, intermediate=int(intermediate),
              activation=activation, layer=layer, eps=1e-5)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def save_transformers(path: str, fields: dict, variables, *, bos: int, eos: int, pad: int,
                      dtype: str = "float32") -> str:
  """Writes a CLIP text encoder as a transformers CLIPTextModel folder (what a diffusers
  pipeline's text_encoder/ holds)."""
  module = module_of(fields)
  params = jax.tree_util.tree_map(np.asarray, jax.device_get(variables["params"]))
  state = params_to_state(params, entries(module.layers_run),
                          np.float16 if dtype == "float16" else np.float32)
  os.makedirs(path, exist_ok=True)
  write_safetensors(os.path.join(path, "model.safetensors"), state)
  config = transformers_config(fields, bos=bos, eos=eos, pad=pad)
  config["torch_dtype"] = dtype
  fileio.atomic_write_text(os.path.join(path, "config.json"),
                           json.dumps(config, indent=2, sort_keys=True))
  return path

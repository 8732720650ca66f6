"""Stable Diffusion checkpoints (1.x and 2.x) to ldm_jax: a diffusers pipeline folder, or a
CompVis/SD single file (.safetensors / .ckpt) with or without its YAML.

Both give a CompVisModel (interop/compvis.py) whose conditioning is the frozen CLIP text
encoder, so interop/exports.py writes it as an export and ldm_jax.inference samples it. A
single file without a YAML is described from its keys and shapes: the text tower's prefix tells
SD 1.x (CLIP ViT-L, cond_stage_model.transformer.*) from SD 2.x (OpenCLIP ViT-H,
cond_stage_model.model.*); the UNet's and autoencoder's sizes are read off their tensors; what
no tensor says (head counts, eps or v prediction, the latent scale) comes from FAMILIES below
and the caller's flags.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re

from ldm_jax.data.text import ClipTokenizer, clip_tokenizer_dir
from ldm_jax.interop import build, compvis, diffusers
from ldm_jax.interop import clip as clip_lib
from ldm_jax.interop.weights import ConversionError, UnsupportedError, read_state_dict

PREDICTIONS = {"eps": "eps", "v": "v", "epsilon": "eps", "v_prediction": "v", "sample": "x0"}
# diffusers' beta_schedule -> ldm_jax's (CompVis') name for the same betas.
_BETA_SCHEDULES = {"scaled_linear": "linear", "linear": "sqrt_linear"}
SD_SCALE_FACTOR = 0.18215
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


@dataclasses.dataclass(frozen=True)
class Family:
  """The facts of a released SD generation that its weights' shapes do not hold."""
  name: str
  tower: str                 # clip.CLIP_TOWERS key (the YAML's cond_stage_config target)
  unet_heads: int            # num_heads (-1: use unet_head_channels)
  unet_head_channels: int
  prediction: str | None     # None: both exist (SD 2.x 512-base is eps, 768-v is v)
  image_size: int


FAMILIES = {
    "sd1": Family("SD 1.x", "FrozenCLIPEmbedder", 8, -1, "eps", 512),
    "sd2": Family("SD 2.x", "FrozenOpenCLIPEmbedder", -1, 64, None, 768),
}


def is_stable_diffusion(path: str) -> bool:
  """A diffusers pipeline folder with a text encoder, or a single checkpoint file."""
  if os.path.isdir(path):
    return os.path.isfile(os.path.join(path, "model_index.json")) or os.path.isdir(
        os.path.join(path, "text_encoder"))
  return os.path.isfile(path) and path.endswith(SINGLE_FILE_SUFFIXES)


def load_stable_diffusion(path: str, *, prediction: str | None = None,
                          scale_factor: float | None = None, tokenizer: str | None = None,
                          yaml: str | None = None, families=None, towers=None):
  """A CompVisModel of a diffusers SD folder or an SD single file (see the module doc)."""
  if prediction is not None and prediction not in PREDICTIONS:
    raise ConversionError(f"--prediction: expected eps or v, got {prediction!r}")
  if os.path.isdir(path):
    return load_folder(path, prediction=prediction, scale_factor=scale_factor,
                       tokenizer=tokenizer)
  if not os.path.isfile(path):
    raise ConversionError(f"no such checkpoint: '{path}'")
  return load_single_file(path, yaml=yaml, prediction=prediction, scale_factor=scale_factor,
                          tokenizer=tokenizer, families=families, towers=towers)


# ---------------------------------------------------------------------------------------------
# diffusers pipeline folders
# ---------------------------------------------------------------------------------------------
def _read_json(path: str) -> dict:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _check_pipeline(path: str):
  index = os.path.join(path, "model_index.json")
  if os.path.isfile(index):
    config = _read_json(index)
    name = config.get("_class_name", "")
    if "text_encoder_2" in config or "XL" in name:
      raise UnsupportedError(f"'{path}': {name} (two text encoders, SDXL) is not supported; "
                             f"ldm_jax runs SD 1.x and 2.x")
  for part in ("unet", "vae", "text_encoder"):
    if not os.path.isdir(os.path.join(path, part)):
      raise ConversionError(f"'{path}' has no {part}/: a diffusers Stable Diffusion folder holds "
                            f"unet/, vae/, text_encoder/, tokenizer/ and scheduler/")


def scheduler_diffusion(path: str, prediction: str | None, notes: list[str]) -> dict:
  """config.diffusion fields from a pipeline's scheduler/scheduler_config.json (SD's own
  values when absent); `prediction` overrides its prediction_type."""
  file = os.path.join(path, "scheduler", "scheduler_config.json")
  s = _read_json(file) if os.path.isfile(file) else {}
  if not s:
    notes.append("no scheduler/scheduler_config.json: SD's schedule assumed")
  schedule = s.get("beta_schedule", "scaled_linear")
  if schedule not in _BETA_SCHEDULES:
    raise UnsupportedError(f"'{file}': beta_schedule={schedule!r} is not supported "
                           f"({', '.join(_BETA_SCHEDULES)} are)")
  if s.get("rescale_betas_zero_snr", False):
    raise UnsupportedError(f"'{file}': rescale_betas_zero_snr=true is not supported")
  found = PREDICTIONS.get(s.get("prediction_type", "epsilon"))
  if found is None:
    raise UnsupportedError(f"'{file}': prediction_type={s.get('prediction_type')!r} is not "
                           f"supported (epsilon, v_prediction, sample are)")
  if prediction is not None and PREDICTIONS[prediction] != found:
    notes.append(f"prediction {PREDICTIONS[prediction]} (--prediction) instead of the "
                 f"scheduler's {found}")
    found = PREDICTIONS[prediction]
  return dict(timesteps=int(s.get("num_train_timesteps", 1000)),
              beta_schedule=_BETA_SCHEDULES[schedule],
              linear_start=float(s.get("beta_start", 0.00085)),
              linear_end=float(s.get("beta_end", 0.012)), parameterization=found)


def _cond_fields(text_encoder: dict, tokenizer_dir: str, weights: str) -> dict:
  return {"type": "text", "text_encoder": "clip", "text_tokenizer": "clip",
          "text_vocab": tokenizer_dir, "clip_weights": os.path.abspath(weights),
          "clip_layer": text_encoder["layer"], "embed_dim": text_encoder["width"],
          "text_max_length": text_encoder["max_length"], "p_uncond": 0.1}


def load_folder(path: str, *, prediction=None, scale_factor=None, tokenizer=None):
  """A CompVisModel of a diffusers SD 1.x / 2.x pipeline folder."""
  _check_pipeline(path)
  notes: list[str] = []
  tokenizer_dir = clip_tokenizer_dir(tokenizer or path)
  ClipTokenizer(tokenizer_dir)   # reads now: a broken tokenizer stops here, with its name
  ae_module, ae_vars, ae_config, scaling = diffusers.load_diffusers_vae_with_config(path)
  unet_module, unet_vars = diffusers.load_diffusers_unet(path)
  fields, context = diffusers.load_diffusers_unet_fields(path)
  te_module, te_vars, text_encoder = clip_lib.load_transformers(path)
  where = f"Stable Diffusion folder '{path}'"
  if context != text_encoder["width"]:
    raise ConversionError(f"{where}: the UNet's cross_attention_dim {context} differs from the "
                          f"text encoder's width {text_encoder['width']}")
  diffusion = scheduler_diffusion(path, prediction, notes)
  diffusion["scale_factor"] = float(scale_factor if scale_factor is not None else scaling)
  sample = _read_json(os.path.join(path, "unet", "config.json")).get("sample_size", 64)
  sample = sample[0] if isinstance(sample, (list, tuple)) else sample
  config = build.ldm_config(unet_fields=fields, ae_config=ae_config, latent_size=int(sample),
                            diffusion=diffusion,
                            cond=_cond_fields(text_encoder, tokenizer_dir, path),
                            source=where, first_stage=os.path.abspath(path))
  return compvis.CompVisModel((ae_module, ae_vars), (unet_module, unet_vars),
                              (te_module, te_vars), config, ae_config,
                              diffusion["scale_factor"], 0, {}, notes, where, text_encoder)


# ---------------------------------------------------------------------------------------------
# Single files
# ---------------------------------------------------------------------------------------------
def identify(state: dict, where: str, towers=None) -> str:
  """'sd1' or 'sd2' from the text tower's keys; one line when they tell neither."""
  towers = towers or clip_lib.CLIP_TOWERS
  if not any(k.startswith(compvis.UNET) for k in state):
    raise ConversionError(f"{where}: no UNet weights ({compvis.UNET}*): not a Stable Diffusion "
                          f"checkpoint")
  found = [name for name, f in FAMILIES.items()
           if any(k.startswith(towers[f.tower]["prefix"]) for k in state)]
  if len(found) == 1:
    return found[0]
  cond = sorted({".".join(k.split(".")[:2]) for k in state if k.startswith(compvis.COND)})
  if not found and cond:
    raise UnsupportedError(f"{where}: unknown text-encoder architecture ({', '.join(cond[:3])}"
                           f".*); ldm_jax reads CLIP ViT-L (cond_stage_model.transformer.*, "
                           f"SD 1.x) and OpenCLIP (cond_stage_model.model.*, SD 2.x)")
  what = "no text encoder weights" if not found else "both SD 1.x and 2.x text towers"
  raise ConversionError(f"{where}: cannot tell SD 1.x from 2.x ({what}); give its YAML "
                        f"(--yaml)")


def _indices(state: dict, pattern: str) -> list[int]:
  rx = re.compile(pattern)
  return sorted({int(m.group(1)) for k in state for m in [rx.match(k)] if m})


def unet_yaml(state: dict, family: Family, where: str) -> dict:
  """openaimodel.UNetModel params of an SD UNet, read off its tensors' shapes."""
  u = compvis.UNET
  try:
    conv_in = state[f"{u}input_blocks.0.0.weight"]
    out = state[f"{u}out.2.weight"]
  except KeyError as e:
    raise ConversionError(f"{where}: the UNet lacks {e.args[0]}") from None
  mc = int(conv_in.shape[0])
  blocks = _indices(state, re.escape(u) + r"input_blocks\.(\d+)\.")
  mults, attention, res_per_level, depth, level, count = [], [], None, 1, 0, 0
  linear = True
  for i in blocks[1:]:
    if f"{u}input_blocks.{i}.0.op.weight" in state:     # a downsampling: next level
      res_per_level = res_per_level or count
      level, count = level + 1, 0
      continue
    count += 1
    width = int(state[f"{u}input_blocks.{i}.0.out_layers.3.weight"].shape[0])
    if len(mults) == level:
      mults.append(width // mc)
    if f"{u}input_blocks.{i}.1.proj_in.weight" in state and 2 ** level not in attention:
      attention.append(2 ** level)
      depth = len(_indices(state, re.escape(f"{u}input_blocks.{i}.1.transformer_blocks.")
                           + r"(\d+)\."))
      linear = state[f"{u}input_blocks.{i}.1.proj_in.weight"].ndim == 2
  context = next((int(v.shape[1]) for k, v in state.items()
                  if k.startswith(u) and k.endswith("attn2.to_k.weight")), None)
  if context is None:
    raise ConversionError(f"{where}: the UNet has no cross-attention (attn2): not a text-to-"
                          f"image model")
  return {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
          "params": {"in_channels": int(conv_in.shape[1]),
                     "out_channels": int(out.shape[0]), "model_channels": mc,
                     "attention_resolutions": attention,
                     "num_res_blocks": res_per_level or count, "channel_mult": mults,
                     "num_heads": family.unet_heads,
                     "num_head_channels": family.unet_head_channels,
                     "use_spatial_transformer": True, "transformer_depth": depth,
                     "context_dim": context, "use_linear_in_transformer": linear,
                     "legacy": False}}


def first_stage_yaml(state: dict, where: str) -> dict:
  """CompVis AutoencoderKL params of an SD first stage, read off its tensors' shapes."""
  f = compvis.FIRST
  try:
    ch = int(state[f"{f}encoder.conv_in.weight"].shape[0])
    z = int(state[f"{f}encoder.conv_out.weight"].shape[0]) // 2
    embed = int(state[f"{f}quant_conv.weight"].shape[0]) // 2
    channels = int(state[f"{f}encoder.conv_in.weight"].shape[1])
  except KeyError as e:
    raise ConversionError(f"{where}: the first stage lacks {e.args[0]}") from None
  levels = _indices(state, re.escape(f) + r"encoder\.down\.(\d+)\.")
  mults = [int(state[f"{f}encoder.down.{i}.block.0.conv2.weight"].shape[0]) // ch
           for i in levels]
  res = len(_indices(state, re.escape(f) + r"encoder\.down\.0\.block\.(\d+)\."))
  side = 256
  attn = [side // 2 ** i for i in levels if f"{f}encoder.down.{i}.attn.0.q.weight" in state]
  mid = f"{f}encoder.mid.attn_1.q.weight" in state
  return {"target": "ldm.models.autoencoder.AutoencoderKL",
          "params": {"embed_dim": embed, "ddconfig": {
              "double_z": True, "z_channels": z, "resolution": side, "in_channels": channels,
              "out_ch": channels, "ch": ch, "ch_mult": mults, "num_res_blocks": res,
              "attn_resolutions": attn, "dropout": 0.0,
              "attn_type": "vanilla" if mid else "none"}}}


def single_file_yaml(state: dict, family: Family, prediction: str, scale: float,
                     where: str) -> dict:
  """The CompVis YAML `model` section an SD single file was released with, rebuilt from its
  keys, shapes and `family`."""
  first = first_stage_yaml(state, where)
  latent = family.image_size // 2 ** (len(first["params"]["ddconfig"]["ch_mult"]) - 1)
  unet = unet_yaml(state, family, where)
  unet["params"]["image_size"] = latent
  return {"target": "ldm.models.diffusion.ddpm.LatentDiffusion",
          "params": {"linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000,
                     "image_size": latent, "channels": first["params"]["embed_dim"],
                     "conditioning_key": "crossattn", "scale_factor": scale,
                     "parameterization": prediction, "unet_config": unet,
                     "first_stage_config": first,
                     "cond_stage_config": {"target": f"ldm.modules.encoders.modules."
                                                     f"{family.tower}"}}}


def load_single_file(path: str, *, yaml=None, prediction=None, scale_factor=None,
                     tokenizer=None, families=None, towers=None):
  """A CompVisModel of an SD single file; without `yaml` it is described from its keys."""
  where = compvis._where(path)   # pylint: disable=protected-access
  if not tokenizer:
    raise ConversionError(f"{where}: a single-file checkpoint holds no tokenizer; give "
                          f"--tokenizer=DIR (a folder with the CLIP tokenizer's vocab.json and "
                          f"merges.txt, e.g. an SD pipeline folder's tokenizer/)")
  tokenizer_dir = clip_tokenizer_dir(tokenizer)
  ClipTokenizer(tokenizer_dir)
  state = read_state_dict(path)
  families = families or FAMILIES
  notes = []
  if yaml is None:
    name = identify(state, where, towers)
    family = families[name]
    chosen = PREDICTIONS[prediction] if prediction else family.prediction
    if chosen is None:
      raise ConversionError(f"{where}: an {family.name} checkpoint may predict eps (512-base) "
                            f"or v (768-v) and its weights do not say which; give "
                            f"--prediction=eps or --prediction=v")
    model = single_file_yaml(state, family, chosen, scale_factor or SD_SCALE_FACTOR, where)
    notes.append(f"{family.name} read from the checkpoint's keys ({chosen} prediction)")
    result = compvis.load_compvis(path, None, state=state, model=model, clip_towers=towers)
  else:
    result = compvis.load_compvis(path, yaml, state=state, clip_towers=towers)
  if result.config is None:
    raise UnsupportedError(f"{where}: " + "; ".join(result.unsupported.values()))
  if result.config.cond.get("text_encoder") != "clip":
    raise UnsupportedError(f"{where}: not a Stable Diffusion text-to-image model (its YAML's "
                           f"cond_stage_config is not a CLIP text encoder)")
  result.config.cond.text_vocab = tokenizer_dir
  if yaml is not None and prediction:
    result.config.diffusion.parameterization = PREDICTIONS[prediction]
  if yaml is not None and scale_factor:
    result.config.diffusion.scale_factor = float(scale_factor)
    result.scale_factor = float(scale_factor)
  result.notes.extend(notes)
  return result


# ---------------------------------------------------------------------------------------------
# Writing the rest of a diffusers pipeline folder
# ---------------------------------------------------------------------------------------------
_PREDICTION_NAMES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
_SCHEDULE_NAMES = {v: k for k, v in _BETA_SCHEDULES.items()}


def scheduler_config(diffusion) -> dict:
  """A diffusers DDIMScheduler config with the schedule of `config.diffusion` (SD's DDIM
  settings: leading spacing with steps_offset 1, the final step to alphas_cumprod[0])."""
  if diffusion.beta_schedule in _SCHEDULE_NAMES:
    schedule = _SCHEDULE_NAMES[diffusion.beta_schedule]
  elif diffusion.beta_schedule == "cosine" and abs(diffusion.cosine_s - 0.008) < 1e-12:
    schedule = "squaredcos_cap_v2"
  else:
    raise UnsupportedError(f"diffusion.beta_schedule '{diffusion.beta_schedule}' has no "
                           f"diffusers scheduler equivalent")
  return {"_class_name": "DDIMScheduler", "_diffusers_version": diffusers.DIFFUSERS_VERSION,
          "num_train_timesteps": int(diffusion.timesteps), "beta_schedule": schedule,
          "beta_start": float(diffusion.linear_start), "beta_end": float(diffusion.linear_end),
          "prediction_type": _PREDICTION_NAMES[diffusion.parameterization],
          "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
          "timestep_spacing": "leading", "trained_betas": None}


def save_pipeline_parts(out: str, pipeline, dtype: str = "float32") -> str:
  """Writes what a StableDiffusionPipeline folder holds beside vae/ and unet/ for a pipeline
  (ldm_jax.inference.Pipeline) with a CLIP text encoder: text_encoder/ (transformers layout),
  tokenizer/, scheduler/ and model_index.json."""
  import shutil  # pylint: disable=g-import-not-at-top
  tok = pipeline.ldm.tokenizer
  clip_lib.save_transformers(os.path.join(out, "text_encoder"), pipeline.ldm.clip_fields,
                             {"params": pipeline.params["cond"]["clip"]}, bos=tok.bos_id,
                             eos=tok.eos_id, pad=tok.pad_id, dtype=dtype)
  os.makedirs(os.path.join(out, "tokenizer"), exist_ok=True)
  for name in sorted(os.listdir(tok.path)):
    if os.path.isfile(os.path.join(tok.path, name)):
      shutil.copyfile(os.path.join(tok.path, name), os.path.join(out, "tokenizer", name))
  os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
  with open(os.path.join(out, "scheduler", "scheduler_config.json"), "w",
            encoding="utf-8") as f:
    json.dump(scheduler_config(pipeline.config.diffusion), f, indent=2)
  index = {"_class_name": "StableDiffusionPipeline",
           "_diffusers_version": diffusers.DIFFUSERS_VERSION,
           "feature_extractor": [None, None], "safety_checker": [None, None],
           "requires_safety_checker": False, "image_encoder": [None, None],
           "scheduler": ["diffusers", "DDIMScheduler"],
           "text_encoder": ["transformers", "CLIPTextModel"],
           "tokenizer": ["transformers", "CLIPTokenizer"],
           "unet": ["diffusers", "UNet2DConditionModel"],
           "vae": ["diffusers", "AutoencoderKL"]}
  with open(os.path.join(out, "model_index.json"), "w", encoding="utf-8") as f:
    json.dump(index, f, indent=2)
  return out


def load_text_encoder(path: str, layer: str = "last", towers=None):
  """(fields, variables) of the frozen CLIP text encoder at cond.clip_weights: a diffusers SD
  folder or its text_encoder/, an ldm_jax export of an SD model, or an SD single file."""
  from ldm_jax.checkpoint import is_inference_export, load_inference  # pylint: disable=g-import-not-at-top
  if is_inference_export(path):
    variables, meta, _ = load_inference(path)
    fields = meta.get("text_encoder")
    clip_params = variables.get("cond", {}).get("params", {}).get("clip")
    if not fields or clip_params is None:
      raise ConversionError(f"cond.clip_weights: the export '{path}' holds no CLIP text encoder")
    return dict(fields, layer=layer), {"params": clip_params}
  if os.path.isdir(path):
    _, variables, fields = clip_lib.load_transformers(path, layer)
    return fields, variables
  if not os.path.isfile(path):
    raise ConversionError(f"cond.clip_weights: no such file or folder '{path}'")
  where = compvis._where(path)   # pylint: disable=protected-access
  state = read_state_dict(path)
  family = FAMILIES[identify(state, where, towers)]
  tower = (towers or clip_lib.CLIP_TOWERS)[family.tower]
  _, variables, fields = clip_lib.from_checkpoint(state, tower, where, layer)
  return fields, variables

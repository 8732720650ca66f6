"""CompVis latent-diffusion / stable-diffusion checkpoints and their YAML configs to ldm_jax.

A checkpoint is a Lightning .ckpt (its 'state_dict') or a .safetensors file; the YAML is the
model config it was trained with (model.target, model.params.first_stage_config, unet_config,
cond_stage_config, scale_factor, ...). LatentDiffusion checkpoints give the autoencoder, the
UNet (its EMA weights, model_ema.*, when the checkpoint has them), the class embedder and an
ldm_jax 'ldm' config; autoencoder checkpoints (AutoencoderKL / VQModel) give the autoencoder.
Components ldm_jax does not implement (CLIP or BERT text encoders, concat conditioning) are
reported in `unsupported` and the rest still converts.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import yaml

from ldm_jax.diffusion.schedules import make_beta_schedule
from ldm_jax.interop import build, names
from ldm_jax.interop.weights import (ConversionError, UnsupportedError, read_state_dict)
from ldm_jax.models.unet import heads_for_level

UNET, FIRST, COND, EMA = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.",
                          "model_ema.")
# Buffers of CompVis' DDPM / LatentDiffusion / LitEma that hold no weights of a module.
BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
           "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
           "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
           "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
           "logvar", "scale_factor", "lvlb_weights", "model_ema.decay", "model_ema.num_updates")
# Autoencoder checkpoint entries that are training-only or index bookkeeping.
AE_IGNORED = ("loss.", "colorize", "quantize.used", "model_ema.decay", "model_ema.num_updates")


@dataclasses.dataclass
class CompVisModel:
  """What a CompVis checkpoint converts to. `autoencoder`, `unet` and `cond` are (module,
  variables) pairs or None; `config` is the ldm_jax 'ldm' config (None for an autoencoder
  checkpoint, or when a component it needs is unsupported); `unsupported` maps components
  that did not convert to the reason."""
  autoencoder: tuple | None
  unet: tuple | None
  cond: tuple | None
  config: Any
  autoencoder_config: Any
  scale_factor: float
  num_classes: int
  unsupported: dict[str, str]
  notes: list[str]
  source: str


# ---------------------------------------------------------------------------------------------
# YAML -> architecture
# ---------------------------------------------------------------------------------------------
def _short(target) -> str:
  return str(target).rsplit(".", 1)[-1]


def read_yaml(path: str) -> dict:
  """The `model` section of a CompVis config file."""
  try:
    with open(path, encoding="utf-8") as f:
      config = yaml.safe_load(f)
  except OSError as e:
    raise ConversionError(f"cannot read the CompVis config '{path}': {e}") from e
  if not isinstance(config, dict) or not isinstance(config.get("model"), dict) or \
      "target" not in config["model"]:
    raise ConversionError(f"'{path}' is not a CompVis model config (no model.target)")
  model = dict(config["model"])
  model.setdefault("params", {})
  return model


def model_kind(model: dict, where: str) -> str:
  """'ldm' for LatentDiffusion, 'autoencoder' for AutoencoderKL / VQModel configs."""
  short = _short(model["target"])
  if short == "LatentDiffusion":
    return "ldm"
  if short in ("AutoencoderKL", "VQModel", "VQModelInterface"):
    return "autoencoder"
  raise UnsupportedError(f"{where}: model.target {model['target']} is not supported "
                         f"(LatentDiffusion, AutoencoderKL and VQModel are)")


def autoencoder_config_from_yaml(first: dict, where: str):
  """The ldm_jax stage-1 config of a CompVis first_stage_config (target + params)."""
  short = _short(first.get("target", ""))
  kind = {"AutoencoderKL": "kl", "VQModel": "vq", "VQModelInterface": "vq"}.get(short)
  if kind is None:
    raise UnsupportedError(f"{where}: first stage {first.get('target')} is not supported "
                           f"(AutoencoderKL and VQModel are)")
  p = first.get("params", {})
  dd = p.get("ddconfig", {})
  attn_type = dd.get("attn_type", "linear" if dd.get("use_linear_attn") else "vanilla")
  if attn_type not in ("vanilla", "vanilla-xformers"):   # the same softmax attention
    raise UnsupportedError(f"{where}: first stage ddconfig.attn_type '{attn_type}' is not "
                           f"supported (ldm_jax's autoencoder has softmax attention in its mid "
                           f"blocks)")
  for key, ok in (("resamp_with_conv", True), ("tanh_out", False), ("give_pre_end", False),
                  ("double_z", kind == "kl")):
    if dd.get(key, ok) != ok:
      raise UnsupportedError(f"{where}: first stage ddconfig.{key}={dd.get(key)!r} is not "
                             f"supported for a {short}")
  if dd.get("in_channels", 3) != dd.get("out_ch", 3):
    raise UnsupportedError(f"{where}: first stage in_channels {dd.get('in_channels')} != out_ch "
                           f"{dd.get('out_ch')} (ldm_jax maps images to images of the same "
                           f"channels)")
  resolution = int(dd.get("resolution", 256))
  ch_mult = tuple(dd.get("ch_mult", (1, 2, 4, 4)))
  attn = set(dd.get("attn_resolutions", ()))
  levels = [i for i in range(len(ch_mult)) if resolution // 2 ** i in attn]
  return build.autoencoder_config(
      kind=kind, ch=dd.get("ch", 128), ch_mult=ch_mult, num_res_blocks=dd.get("num_res_blocks", 2),
      attn_levels=levels, z_channels=dd["z_channels"], embed_dim=p["embed_dim"],
      image_size=resolution, channels=dd.get("out_ch", 3), n_embed=p.get("n_embed", 0),
      source=where)


def _uniform(value, key: str, where: str):
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise UnsupportedError(f"{where}: unet {key}={list(value)} varies per level; ldm_jax uses "
                             f"one value for all levels")
    return value[0]
  return value


def unet_fields_from_yaml(unet: dict, where: str):
  """(ldm_jax UNet fields, context_dim, new-order heads fn or None) of a unet_config."""
  if _short(unet.get("target", "")) != "UNetModel":
    raise UnsupportedError(f"{where}: unet {unet.get('target')} is not supported "
                           f"(openaimodel.UNetModel is)")
  u = unet.get("params", {})
  for key, ok, why in (
      ("dims", 2, "ldm_jax's UNet is 2-D"),
      ("n_embed", None, "predicting codebook ids is not implemented"),
      ("disable_self_attentions", None, "ldm_jax's transformer blocks always self-attend"),
      ("num_attention_blocks", None, "ldm_jax puts attention after every ResBlock of a level"),
      ("disable_middle_self_attn", False, "ldm_jax's mid block self-attends"),
      ("adm_in_channels", None, "vector (ADM) conditioning is not implemented")):
    if u.get(key, ok) != ok:
      raise UnsupportedError(f"{where}: unet {key}={u.get(key)!r} is not supported ({why})")
  num_classes = u.get("num_classes")
  if num_classes is not None and not isinstance(num_classes, int):
    raise UnsupportedError(f"{where}: unet num_classes={num_classes!r} is not supported (only "
                           f"an integer class count)")
  heads, head_channels = int(u.get("num_heads", -1)), int(u.get("num_head_channels", -1))
  if u.get("num_heads_upsample", -1) not in (-1, heads):
    raise UnsupportedError(f"{where}: unet num_heads_upsample differs from num_heads")
  if heads <= 0 and head_channels <= 0:
    raise ConversionError(f"{where}: unet sets neither num_heads nor num_head_channels")
  spatial = bool(u.get("use_spatial_transformer", False))
  context = u.get("context_dim")
  context = _uniform(context, "context_dim", where) if context is not None else None
  fields = dict(in_channels=int(u["in_channels"]), out_channels=int(u["out_channels"]),
                model_channels=int(u["model_channels"]),
                channel_mult=tuple(int(m) for m in u.get("channel_mult", (1, 2, 4, 8))),
                num_res_blocks=int(_uniform(u["num_res_blocks"], "num_res_blocks", where)),
                attention_resolutions=tuple(int(r) for r in u["attention_resolutions"]),
                conv_resample=bool(u.get("conv_resample", True)),
                num_classes=int(num_classes or 0),
                use_scale_shift_norm=bool(u.get("use_scale_shift_norm", False)),
                resblock_updown=bool(u.get("resblock_updown", False)),
                num_heads=heads, num_head_channels=head_channels,
                use_spatial_transformer=spatial,
                transformer_depth=int(_uniform(u.get("transformer_depth", 1),
                                               "transformer_depth", where)),
                use_linear_proj=bool(u.get("use_linear_in_transformer", False)),
                norm_groups=32, norm_eps=1e-5)     # openaimodel's GroupNorm32, fixed
  try:
    build.unet_heads(fields)
  except ValueError as e:
    raise ConversionError(f"{where}: {e}") from e
  new_order = None
  if u.get("use_new_attention_order", False) and not spatial:
    mc = fields["model_channels"]
    new_order = lambda level: heads_for_level(  # noqa: E731
        fields["channel_mult"][level] * mc, level, heads, head_channels)[0]
  return fields, (int(context) if context else None), new_order


def diffusion_from_yaml(params: dict, state: dict, where: str) -> dict:
  """config.diffusion fields of a LatentDiffusion config, checked against the checkpoint's
  own betas when it holds them."""
  if params.get("given_betas") is not None:
    raise UnsupportedError(f"{where}: given_betas is not supported (use a named schedule)")
  out = dict(timesteps=int(params.get("timesteps", 1000)),
             beta_schedule=str(params.get("beta_schedule", "linear")),
             linear_start=float(params.get("linear_start", 1e-4)),
             linear_end=float(params.get("linear_end", 2e-2)),
             cosine_s=float(params.get("cosine_s", 8e-3)),
             parameterization=str(params.get("parameterization", "eps")),
             loss_type=str(params.get("loss_type", "l2")))
  if "betas" in state:
    try:
      betas = make_beta_schedule(out["beta_schedule"], out["timesteps"], out["linear_start"],
                                 out["linear_end"], out["cosine_s"])
    except ValueError as e:
      raise UnsupportedError(f"{where}: {e}") from e
    saved = np.asarray(state["betas"], np.float64)
    if saved.shape != betas.shape or not np.allclose(saved, betas, rtol=1e-5, atol=1e-9):
      raise ConversionError(f"{where}: the checkpoint's betas differ from the config's "
                            f"'{out['beta_schedule']}' schedule ({out['linear_start']} -> "
                            f"{out['linear_end']}, T={out['timesteps']}): is this the YAML the "
                            f"checkpoint was trained with?")
  return out


_TEXT = (("CLIP", "CLIP"), ("BERT", "BERT"), ("TransformerEmbedder", "x-transformers"))


def cond_from_yaml(params: dict, where: str, class_null: str):
  """(config.cond fields, (num_classes, embed_dim) of a class embedder or None) of a
  LatentDiffusion config; raises UnsupportedError for conditioning ldm_jax lacks."""
  cs = params.get("cond_stage_config")
  key = params.get("conditioning_key")
  if key is None:    # CompVis' default, kept for old configs
    key = "concat" if params.get("concat_mode", True) else "crossattn"
  if cs == "__is_unconditional__" or cs is None:
    return {"type": "none"}, None
  short = _short(cs.get("target", cs)) if isinstance(cs, dict) else str(cs)
  if short == "ClassEmbedder" and key == "crossattn":
    p = cs.get("params", {})
    rows, dim = int(p.get("n_classes", 1000)), int(p["embed_dim"])
    if class_null not in ("learned", "zeros"):
      raise ValueError(f"class_null: expected 'learned' or 'zeros', got {class_null!r}")
    classes = rows - 1 if class_null == "learned" else rows
    return ({"type": "class", "num_classes": classes, "embed_dim": dim, "null": class_null},
            (classes, dim))
  text = next((name for tag, name in _TEXT if tag.lower() in short.lower()), None)
  if text:
    why = (f"ldm_jax has no {text} text encoder (its text conditioning is its own jointly "
           f"trained transformer)")
  elif short == "__is_first_stage__":
    why = "conditioning on the first stage's own latents (concat) is not implemented"
  elif short == "ClassEmbedder":
    why = f"a class embedder with conditioning_key '{key}' is not implemented"
  else:
    why = f"conditioning_key '{key}' with {short} is not implemented"
  raise UnsupportedError(f"{where}: cond_stage_model ({short}) is not supported: {why}; the "
                         f"autoencoder and the UNet still convert (load_compvis(...).autoencoder "
                         f"/ .unet, or --part autoencoder for a first-stage export)")


# ---------------------------------------------------------------------------------------------
# State dict -> variables
# ---------------------------------------------------------------------------------------------
def ema_key(name: str) -> str:
  """LitEma's buffer name of a parameter: 'model_ema.' + its name without dots."""
  return EMA + name.replace(".", "")


def _ema_keys(state) -> set:
  return {k for k in state if k.startswith(EMA) and k not in BUFFERS}


def _with_ema(state: dict, entries, strip: str, where: str, what: str):
  """`state` with the EMA copy of every weight of `entries` in place of the weight itself.
  `strip` is the prefix LitEma's module does not see ('model.' for the diffusion model)."""
  swapped = dict(state)
  absent = []
  for entry in entries:
    for _, key in entry.leaves():
      ema = ema_key(key[len(strip):])
      if ema in state:
        swapped[key] = state[ema]
        swapped.pop(ema)
      else:
        absent.append(ema)
  if absent:
    raise ConversionError(f"{where}: the checkpoint has EMA weights (model_ema.*) but not for "
                          f"{len(absent)} {what} weight(s), e.g. {absent[0]}; pass "
                          f"use_ema=False (--no_ema) to convert the non-EMA weights")
  return swapped


def _unet(state, fields, context, new_order, use_ema, where, prefix=UNET, strip="model."):
  module = build.unet_module(fields)
  shapes = build.unet_shapes(module, context)
  entries = names.prefixed(build.unet_map(module, shapes, names.COMPVIS, new_order), prefix)
  used_ema = use_ema and bool(_ema_keys(state))
  if used_ema:
    state = _with_ema(state, entries, strip, where, "UNet")
  part = {k: v for k, v in state.items() if k.startswith(prefix)}
  module, variables = build.unet_variables(fields, context, part, names.COMPVIS,
                                           f"{where} UNet ({prefix}*)", prefix,
                                           new_attention_heads=new_order, shapes=shapes)
  return module, variables, used_ema


def _class_embedder(state, classes, dim, null, where):
  part = {k: v for k, v in state.items() if k.startswith(COND)}
  return build.class_embedder_variables(classes, dim, null, part,
                                        f"{where} class embedder ({COND}*)", COND)


def _where(ckpt_path: str) -> str:
  return f"CompVis checkpoint '{os.path.basename(ckpt_path)}'"


# ---------------------------------------------------------------------------------------------
# Public loaders
# ---------------------------------------------------------------------------------------------
def load_compvis(ckpt_path: str, yaml_path: str, *, use_ema: bool = True,
                 class_null: str = "learned",
                 state: dict | None = None) -> CompVisModel:
  """Converts a CompVis checkpoint (.ckpt or .safetensors) with its YAML config.

  use_ema: take the UNet's EMA weights (model_ema.*) when the checkpoint has them.
  class_null: a ClassEmbedder's last row is the unconditional class ('learned', cin256-v2's
    convention: n_classes 1001 = 1000 classes + 1), or every row is a class and the null
    condition is zeros ('zeros').
  state: the checkpoint's tensors, when already read (ckpt_path then only names it).
  """
  where = _where(ckpt_path)
  model = read_yaml(yaml_path)
  kind = model_kind(model, where)
  state = read_state_dict(ckpt_path) if state is None else state
  if kind == "autoencoder":
    module, variables, ae_config, notes = _autoencoder_only(state, model, use_ema, where)
    return CompVisModel((module, variables), None, None, None, ae_config, 1.0, 0, {}, notes,
                        where)
  params = model["params"]
  for key in ("first_stage_config", "unet_config"):
    if not isinstance(params.get(key), dict):
      raise ConversionError(f"{where}: the LatentDiffusion config has no model.params.{key}")
  unknown = [k for k in state if not k.startswith((UNET, FIRST, COND, EMA)) and
             k not in BUFFERS]
  if unknown:
    raise ConversionError(f"{where}: unexpected {len(unknown)} entries outside the model's "
                          f"parts: {', '.join(sorted(unknown)[:5])}")
  unsupported, notes = {}, []
  parts: dict[str, Any] = {"autoencoder": None, "unet": None, "cond": None}
  ae_config = fields = context = cond_fields = embedder = None
  try:
    ae_config = autoencoder_config_from_yaml(params["first_stage_config"], where)
    part = {k[len(FIRST):]: v for k, v in state.items() if k.startswith(FIRST)}
    parts["autoencoder"] = build.autoencoder_variables(
        ae_config, part, names.COMPVIS, f"{where} first stage ({FIRST}*)", ignore=AE_IGNORED)
  except UnsupportedError as e:
    unsupported["autoencoder"] = str(e)
  try:
    fields, context, new_order = unet_fields_from_yaml(params["unet_config"], where)
    module, variables, used_ema = _unet(state, fields, context, new_order, use_ema, where)
    parts["unet"] = (module, variables)
    notes.append("UNet: EMA weights (model_ema.*)" if used_ema else "UNet: non-EMA weights")
  except UnsupportedError as e:
    unsupported["unet"] = str(e)
  try:
    cond_fields, embedder = cond_from_yaml(params, where, class_null)
    if embedder:
      parts["cond"] = _class_embedder(state, *embedder, class_null, where)
  except UnsupportedError as e:
    unsupported["cond"] = str(e)
  if not any(parts.values()):
    raise UnsupportedError(" | ".join(unsupported.values()))
  scale = float(np.asarray(state["scale_factor"])) if "scale_factor" in state else \
      float(params.get("scale_factor", 1.0))
  config = None
  if not unsupported:
    try:
      config = _ldm_config(params, state, fields, context, ae_config, cond_fields, embedder,
                           scale, where, ckpt_path)
    except UnsupportedError as e:
      unsupported["ldm config"] = str(e)
  return CompVisModel(parts["autoencoder"], parts["unet"], parts["cond"], config, ae_config,
                      scale, embedder[0] if embedder else 0, unsupported, notes, where)


def _ldm_config(params, state, fields, context, ae_config, cond_fields, embedder, scale, where,
                ckpt_path):
  latent = ae_config.model.embed_dim
  if fields["in_channels"] != latent or fields["out_channels"] != latent:
    raise UnsupportedError(f"{where}: the UNet maps {fields['in_channels']} to "
                           f"{fields['out_channels']} channels but the first stage's latents "
                           f"have {latent} (concat conditioning is not supported)")
  if embedder and context != embedder[1]:
    raise ConversionError(f"{where}: the class embedder's width {embedder[1]} differs from the "
                          f"UNet's context_dim {context}")
  if fields["num_classes"]:
    raise UnsupportedError(f"{where}: a UNet with its own label embedding (num_classes) needs "
                           f"conditioning_key 'adm', which this converter does not map")
  diffusion = diffusion_from_yaml(params, state, where)
  diffusion["scale_factor"] = scale
  size = params.get("image_size") or params["unet_config"]["params"].get("image_size", 32)
  return build.ldm_config(unet_fields=fields, ae_config=ae_config, latent_size=int(size),
                          diffusion=diffusion, cond=cond_fields, source=where,
                          first_stage=os.path.abspath(ckpt_path))


def _autoencoder_only(state, model, use_ema, where):
  """An autoencoder training checkpoint (its loss.* weights are dropped)."""
  ae_config = autoencoder_config_from_yaml(model, where)
  notes = []
  if use_ema and _ema_keys(state):
    entries = build.autoencoder_map(ae_config, names.COMPVIS)
    state = _with_ema(state, entries, "", where, "autoencoder")
    state = {k: v for k, v in state.items() if not k.startswith(EMA)}
    notes.append("autoencoder: EMA weights (model_ema.*)")
  module, variables = build.autoencoder_variables(ae_config, state, names.COMPVIS, where,
                                                  ignore=AE_IGNORED)
  return module, variables, ae_config, notes


def load_compvis_autoencoder(ckpt_path: str, yaml_path: str, *, use_ema: bool = True,
                             state: dict | None = None):
  """(module, variables) of the autoencoder of a CompVis LDM or autoencoder checkpoint."""
  where = _where(ckpt_path)
  model = read_yaml(yaml_path)
  kind = model_kind(model, where)
  state = read_state_dict(ckpt_path) if state is None else state
  if kind == "autoencoder":
    module, variables, _, _ = _autoencoder_only(state, model, use_ema, where)
    return module, variables
  ae_config = autoencoder_config_from_yaml(model["params"]["first_stage_config"], where)
  part = {k[len(FIRST):]: v for k, v in state.items() if k.startswith(FIRST)}
  return build.autoencoder_variables(ae_config, part, names.COMPVIS,
                                     f"{where} first stage ({FIRST}*)", ignore=AE_IGNORED)


def load_compvis_unet(ckpt_path: str, yaml_path: str, *, use_ema: bool = True,
                      state: dict | None = None):
  """(module, variables) of the UNet of a CompVis LDM checkpoint (EMA weights preferred)."""
  where = _where(ckpt_path)
  model = read_yaml(yaml_path)
  if model_kind(model, where) != "ldm":
    raise ConversionError(f"{where}: '{yaml_path}' configures an autoencoder, not an LDM")
  state = read_state_dict(ckpt_path) if state is None else state
  fields, context, new_order = unet_fields_from_yaml(model["params"]["unet_config"], where)
  module, variables, _ = _unet(state, fields, context, new_order, use_ema, where)
  return module, variables


def load_compvis_cond(ckpt_path: str, yaml_path: str, *, class_null: str = "learned",
                      state: dict | None = None):
  """(module, variables) of the conditioning model (a ClassEmbedder) of a CompVis LDM."""
  where = _where(ckpt_path)
  model = read_yaml(yaml_path)
  if model_kind(model, where) != "ldm":
    raise ConversionError(f"{where}: '{yaml_path}' configures an autoencoder, not an LDM")
  _, embedder = cond_from_yaml(model["params"], where, class_null)
  if embedder is None:
    raise ConversionError(f"{where}: the model is unconditional (no conditioning model)")
  state = read_state_dict(ckpt_path) if state is None else state
  return _class_embedder(state, *embedder, class_null, where)

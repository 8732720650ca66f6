"""CompVis latent-diffusion / stable-diffusion checkpoints and their YAML configs to ldm_jax.

A checkpoint is a Lightning .ckpt (its 'state_dict') or a .safetensors file; the YAML is the
model config it was trained with (model.target, model.params.first_stage_config, unet_config,
cond_stage_config, scale_factor, ...). LatentDiffusion checkpoints give the autoencoder, the
UNet (its EMA weights, model_ema.*, when the checkpoint has them), the conditioning model and
an ldm_jax 'ldm' config; autoencoder checkpoints (AutoencoderKL / VQModel) give the autoencoder.
First stages with ddconfig.attn_type 'none' (inpainting_big's: no attention anywhere, mid blocks
included) convert to autoencoders with model.mid_attention=False.

Conditioning: a ClassEmbedder (cross-attention) converts, and so do the concatenated
conditions of the paper's task models, onto ldm_jax's concat routes: torch.nn.Identity on
LR_image -> 'lowres' (bsr_sr), __is_first_stage__ -> 'inpaint' with
inpaint_convention='compvis' (inpainting_big), SpatialRescaler -> 'segmentation' with its
channel mapper (semantic_synthesis*). Components ldm_jax does not implement (CLIP or BERT text
encoders, ...) are reported in `unsupported` and the rest still converts.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import yaml

from ldm_jax.diffusion.schedules import make_beta_schedule
from ldm_jax.interop import build, names
from ldm_jax.interop import clip as clip_lib
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
# The YAML setting of each mid-block attention case, for check_mid_attention's messages.
MID_ATTENTION = {True: "ddconfig.attn_type 'vanilla'", False: "ddconfig.attn_type 'none'"}


@dataclasses.dataclass
class CompVisModel:
  """What a CompVis checkpoint converts to. `autoencoder`, `unet` and `cond` are (module,
  variables) pairs or None (`cond`: a ClassEmbedder, or a SpatialRescaler with a channel
  mapper; None when the condition has no weights); `config` is the ldm_jax 'ldm' config (None
  for an autoencoder checkpoint, or when a component it needs is unsupported); `unsupported`
  maps components that did not convert to the reason."""
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
  text_encoder: dict | None = None   # a CLIP text encoder's fields (cond = its module, vars)


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
  # 'vanilla-xformers' is the same softmax attention; 'none' makes every attention (mid blocks
  # and attn_resolutions levels alike) an Identity.
  if attn_type not in ("vanilla", "vanilla-xformers", "none"):
    raise UnsupportedError(f"{where}: first stage ddconfig.attn_type '{attn_type}' is not "
                           f"supported (ldm_jax's autoencoder has 'vanilla' softmax attention "
                           f"or 'none')")
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
  attn = set(dd.get("attn_resolutions", ())) if attn_type != "none" else set()
  levels = [i for i in range(len(ch_mult)) if resolution // 2 ** i in attn]
  return build.autoencoder_config(
      kind=kind, ch=dd.get("ch", 128), ch_mult=ch_mult, num_res_blocks=dd.get("num_res_blocks", 2),
      attn_levels=levels, z_channels=dd["z_channels"], embed_dim=p["embed_dim"],
      image_size=resolution, channels=dd.get("out_ch", 3), n_embed=p.get("n_embed", 0),
      mid_attention=attn_type != "none", source=where)


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
  mult = tuple(int(m) for m in u.get("channel_mult", (1, 2, 4, 8)))
  # openaimodel attends at the levels whose downsample factor is listed; entries no level has
  # (bsr_sr's 16, semantic_synthesis' 32 and 16) never match, so they are dropped.
  attention = tuple(int(r) for r in u["attention_resolutions"] if int(r) in
                    {2 ** level for level in range(len(mult))})
  fields = dict(in_channels=int(u["in_channels"]), out_channels=int(u["out_channels"]),
                model_channels=int(u["model_channels"]), channel_mult=mult,
                num_res_blocks=int(_uniform(u["num_res_blocks"], "num_res_blocks", where)),
                attention_resolutions=attention,
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
# cond_stage_config targets of concatenated conditions -> ldm_jax's concat route.
_CONCAT = {"Identity": "lowres", "__is_first_stage__": "inpaint",
           "SpatialRescaler": "segmentation"}


def _concat_fields(cs, short: str, params: dict, where: str) -> dict:
  """config.cond fields of a concatenated condition (conditioning_key 'concat'). CompVis never
  drops it in training, so p_uncond is 0."""
  route = _CONCAT[short]
  fields = {"type": "concat", "concat": route, "p_uncond": 0.0}
  if route == "lowres":
    source = params.get("cond_stage_key", "LR_image")
    if source != "LR_image":
      raise UnsupportedError(f"{where}: an Identity condition read from '{source}' is not "
                             f"supported (ldm_jax concatenates LR_image, super-resolution)")
    return fields
  if route == "inpaint":
    return {**fields, "inpaint_convention": "compvis"}
  p = cs.get("params", {})
  out = p.get("out_channels")
  method, multiplier = p.get("method", "bilinear"), p.get("multiplier", 0.5)
  if method != "bilinear" or multiplier != 0.5:
    raise UnsupportedError(f"{where}: SpatialRescaler method={method!r} multiplier={multiplier} "
                           f"is not supported (ldm_jax's rescaler halves bilinearly)")
  if out is not None and p.get("bias", False):
    raise UnsupportedError(f"{where}: SpatialRescaler bias=True is not supported (ldm_jax's "
                           f"channel mapper has no bias)")
  return {**fields, "seg_classes": int(p.get("in_channels", 3)),
          "rescaler_stages": int(p.get("n_stages", 1)), "rescaler_channels": int(out or 0),
          "rescaler_antialias": False}


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
  if short in _CONCAT and key == "concat":
    return _concat_fields(cs, short, params, where), None
  if short in clip_lib.CLIP_TOWERS and key == "crossattn":
    layer = (cs.get("params") or {}).get("layer", clip_lib.CLIP_TOWERS[short]["layer"])
    if layer not in ("last", "penultimate"):
      raise UnsupportedError(f"{where}: {short} layer={layer!r} is not supported ('last' or "
                             f"'penultimate')")
    max_length = int((cs.get("params") or {}).get("max_length", 77))
    return ({"type": "text", "text_encoder": "clip", "text_tokenizer": "clip",
             "clip_layer": layer, "text_max_length": max_length, "p_uncond": 0.1}, None)
  text = next((name for tag, name in _TEXT if tag.lower() in short.lower()), None)
  if text:
    why = (f"ldm_jax has no {text} text encoder of this kind (it runs CLIP's: "
           f"{', '.join(clip_lib.CLIP_TOWERS)}, and its own jointly trained transformer)")
  elif short in _CONCAT:
    why = f"conditioning_key '{key}' is not implemented for it (concat is)"
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


def _concat_cond(state, fields: dict, where: str):
  """(module, variables) of a concat route's conditioning model: a SpatialRescaler with its
  channel mapper; None for an Identity, a rescaler without mapper, or the first stage (whose
  cond_stage_model.* copy, when saved, must equal first_stage_model.*)."""
  part = {k: v for k, v in state.items() if k.startswith(COND)}
  if fields["concat"] == "inpaint":
    differ = [k for k, v in part.items() if FIRST + k[len(COND):] not in state or
              not np.array_equal(np.asarray(v), np.asarray(state[FIRST + k[len(COND):]]))]
    if differ:
      raise ConversionError(f"{where}: {len(differ)} {COND}* weight(s) differ from the first "
                            f"stage's (e.g. {differ[0]}), but __is_first_stage__ conditions on "
                            f"the first stage itself")
    return None
  if fields.get("rescaler_channels"):
    return build.rescaler_variables(fields["rescaler_stages"], fields["seg_classes"],
                                    fields["rescaler_channels"], part,
                                    f"{where} SpatialRescaler ({COND}*)", COND)
  if part:
    raise ConversionError(f"{where}: unexpected {len(part)} {COND}* weight(s) (e.g. "
                          f"{sorted(part)[0]}) for a '{fields['concat']}' condition that has "
                          f"none in its config")
  return None


def _concat_channels(fields: dict, ae_config) -> int:
  """Input channels a concat route adds to the UNet's (as ldm_jax's Conditioner builds it)."""
  route = fields.get("concat") if fields.get("type") == "concat" else None
  if route == "lowres":
    return int(ae_config.data.channels)
  if route == "inpaint":
    return int(ae_config.model.embed_dim) + 1
  if route == "segmentation":
    return fields["rescaler_channels"] or fields["seg_classes"]
  return 0


def _where(ckpt_path: str) -> str:
  return f"CompVis checkpoint '{os.path.basename(ckpt_path)}'"


# ---------------------------------------------------------------------------------------------
# Public loaders
# ---------------------------------------------------------------------------------------------
def load_compvis(ckpt_path: str, yaml_path: str | None, *, use_ema: bool = True,
                 class_null: str = "learned", state: dict | None = None,
                 model: dict | None = None,
                 clip_towers: dict | None = None) -> CompVisModel:
  """Converts a CompVis checkpoint (.ckpt or .safetensors) with its YAML config.

  use_ema: take the UNet's EMA weights (model_ema.*) when the checkpoint has them.
  class_null: a ClassEmbedder's last row is the unconditional class ('learned', cin256-v2's
    convention: n_classes 1001 = 1000 classes + 1), or every row is a class and the null
    condition is zeros ('zeros').
  state: the checkpoint's tensors, when already read (ckpt_path then only names it).
  model: the YAML's `model` section, when there is no file (yaml_path None): Stable
    Diffusion single files are described from their keys (interop/stable_diffusion.py).
  clip_towers: the facts of CLIP text towers that shapes cannot tell (clip.CLIP_TOWERS).
  """
  where = _where(ckpt_path)
  model = read_yaml(yaml_path) if model is None else model
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
  ae_config = fields = context = cond_fields = embedder = text_encoder = None
  try:
    ae_config = autoencoder_config_from_yaml(params["first_stage_config"], where)
    part = {k[len(FIRST):]: v for k, v in state.items() if k.startswith(FIRST)}
    parts["autoencoder"] = build.autoencoder_variables(
        ae_config, part, names.COMPVIS, f"{where} first stage ({FIRST}*)", ignore=AE_IGNORED,
        mid_attention_settings=MID_ATTENTION)
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
    elif cond_fields.get("text_encoder") == "clip":
      tower = (clip_towers or clip_lib.CLIP_TOWERS)[_short(params["cond_stage_config"]
                                                           ["target"])]
      module, variables, text_encoder = clip_lib.from_checkpoint(
          state, tower, where, cond_fields["clip_layer"])
      parts["cond"] = (module, variables)
      cond_fields.update(embed_dim=text_encoder["width"],
                         text_max_length=text_encoder["max_length"],
                         clip_weights=os.path.abspath(ckpt_path))
    elif cond_fields["type"] == "concat":
      parts["cond"] = _concat_cond(state, cond_fields, where)
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
                      scale, embedder[0] if embedder else 0, unsupported, notes, where,
                      text_encoder)


def _ldm_config(params, state, fields, context, ae_config, cond_fields, embedder, scale, where,
                ckpt_path):
  latent = ae_config.model.embed_dim
  concat = _concat_channels(cond_fields, ae_config)
  if fields["out_channels"] != latent or (fields["in_channels"] != latent and not concat):
    raise UnsupportedError(f"{where}: the UNet maps {fields['in_channels']} to "
                           f"{fields['out_channels']} channels but the first stage's latents "
                           f"have {latent} and the conditioning concatenates nothing")
  if fields["in_channels"] != latent + concat:
    raise ConversionError(f"{where}: the UNet takes {fields['in_channels']} input channels, but "
                          f"the first stage's {latent} latent channels + {concat} of the "
                          f"'{cond_fields['concat']}' condition make {latent + concat}; is this "
                          f"the YAML the checkpoint was trained with?")
  f = 2 ** (len(ae_config.model.ch_mult) - 1)
  stages = cond_fields.get("rescaler_stages", 0)
  if concat and cond_fields["concat"] == "segmentation" and 2 ** stages != f:
    raise ConversionError(f"{where}: the SpatialRescaler's n_stages={stages} halvings do not "
                          f"take the map to the first stage's latent grid (f={f})")
  if cond_fields.get("text_encoder") == "clip" and context != cond_fields["embed_dim"]:
    raise ConversionError(f"{where}: the CLIP text encoder's width {cond_fields['embed_dim']} "
                          f"differs from the UNet's context_dim {context}")
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
  build.check_mid_attention(ae_config, state, names.COMPVIS, where, MID_ATTENTION)
  notes = []
  if use_ema and _ema_keys(state):
    entries = build.autoencoder_map(ae_config, names.COMPVIS)
    state = _with_ema(state, entries, "", where, "autoencoder")
    state = {k: v for k, v in state.items() if not k.startswith(EMA)}
    notes.append("autoencoder: EMA weights (model_ema.*)")
  module, variables = build.autoencoder_variables(ae_config, state, names.COMPVIS, where,
                                                  ignore=AE_IGNORED,
                                                  mid_attention_settings=MID_ATTENTION)
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
                                     f"{where} first stage ({FIRST}*)", ignore=AE_IGNORED,
                                     mid_attention_settings=MID_ATTENTION)


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
  """(module, variables) of the conditioning model of a CompVis LDM: a ClassEmbedder, or a
  SpatialRescaler with a channel mapper."""
  where = _where(ckpt_path)
  model = read_yaml(yaml_path)
  if model_kind(model, where) != "ldm":
    raise ConversionError(f"{where}: '{yaml_path}' configures an autoencoder, not an LDM")
  fields, embedder = cond_from_yaml(model["params"], where, class_null)
  state = read_state_dict(ckpt_path) if state is None else state
  if embedder:
    return _class_embedder(state, *embedder, class_null, where)
  cond = _concat_cond(state, fields, where) if fields["type"] == "concat" else None
  if cond is None:
    route = fields.get("concat", fields["type"])
    raise ConversionError(f"{where}: the model's conditioning ('{route}') has no weights")
  return cond

"""diffusers folders (config.json + diffusion_pytorch_model.safetensors) to and from ldm_jax:
AutoencoderKL, VQModel and UNet2DConditionModel, without torch.

Reading checks every config field that changes the computation and refuses, naming the field,
what ldm_jax does not compute the same way; writing produces folders that diffusers'
`from_pretrained` loads as they are.
"""
from __future__ import annotations

import json
import os

import numpy as np

from ldm_jax.interop import build, names
from ldm_jax.interop.weights import (ConversionError, UnsupportedError, params_to_state,
                                     read_state_dict, write_safetensors)
from ldm_jax.models.autoencoder import AutoencoderKL, VQModel
from ldm_jax.models.unet import UNet, heads_for_level

WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_VERSION = "0.42.1"     # the version the layout was checked against
_WEIGHT_FILES = (WEIGHTS, "diffusion_pytorch_model.fp16.safetensors",
                 "diffusion_pytorch_model.bin")
# Old diffusers VAE checkpoints name the attention projections differently.
_VAE_ALIASES = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.",
                ".proj_attn.": ".to_out.0."}


# ---------------------------------------------------------------------------------------------
# Reading a folder
# ---------------------------------------------------------------------------------------------
def _model_dir(path: str, sub: str) -> str:
  """A model folder, or the `sub` folder of a pipeline folder (model_index.json)."""
  if os.path.isfile(os.path.join(path, "config.json")):
    return path
  if os.path.isfile(os.path.join(path, sub, "config.json")):
    return os.path.join(path, sub)
  raise ConversionError(f"'{path}' is not a diffusers model folder (no config.json, nor "
                        f"{sub}/config.json)")


def _read_weights(folder: str) -> dict[str, np.ndarray]:
  index = os.path.join(folder, WEIGHTS + ".index.json")
  if os.path.isfile(index):                       # sharded weights
    with open(index, encoding="utf-8") as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    state = {}
    for shard in shards:
      state.update(read_state_dict(os.path.join(folder, shard)))
    return state
  for name in _WEIGHT_FILES:
    if os.path.isfile(os.path.join(folder, name)):
      return read_state_dict(os.path.join(folder, name))
  raise ConversionError(f"'{folder}' has no weights ({' or '.join(_WEIGHT_FILES)})")


def read_folder(path: str, sub: str):
  """(config dict, state dict, folder) of a diffusers model folder."""
  folder = _model_dir(path, sub)
  with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
    config = json.load(f)
  return config, _read_weights(folder), folder


def _require(config: dict, where: str, checks: dict):
  """Raises for the first config field whose value ldm_jax does not compute the same way.
  `checks`: field -> (default, accepted values, what ldm_jax does instead)."""
  for key, (default, accepted, why) in checks.items():
    value = config.get(key, default)
    if value not in accepted:
      raise UnsupportedError(f"{where}: {key}={value!r} is not supported ({why})")


def _uniform(value, key: str, where: str):
  """An int, or a per-level list whose entries are all equal."""
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise UnsupportedError(f"{where}: {key}={list(value)} varies per block; ldm_jax uses one "
                             f"value for all levels")
    return value[0]
  return value


def _mults(block_out_channels, where: str) -> tuple[int, tuple[int, ...]]:
  base = block_out_channels[0]
  if any(c % base for c in block_out_channels):
    raise UnsupportedError(f"{where}: block_out_channels {list(block_out_channels)} are not "
                           f"multiples of the first ({base})")
  return base, tuple(c // base for c in block_out_channels)


# ---------------------------------------------------------------------------------------------
# AutoencoderKL / VQModel
# ---------------------------------------------------------------------------------------------
_VAE_CHECKS = {
    "act_fn": ("silu", ("silu",), "ldm_jax's autoencoder uses SiLU"),
    "mid_block_add_attention": (True, (True, False), "expected true or false"),
    "use_quant_conv": (True, (True,), "ldm_jax's autoencoder always has quant_conv"),
    "use_post_quant_conv": (True, (True,), "ldm_jax's autoencoder always has post_quant_conv"),
    "norm_type": ("group", ("group",), "spatial norms (MoVQ) are not implemented"),
    "shift_factor": (None, (None, 0, 0.0), "ldm_jax scales latents without a shift"),
}
# The config setting of each mid-block attention case, for check_mid_attention's messages.
_MID_ATTENTION = {True: "mid_block_add_attention=true", False: "mid_block_add_attention=false"}
_DOWN_VAE = {"DownEncoderBlock2D": False, "AttnDownEncoderBlock2D": True}
_UP_VAE = {"UpDecoderBlock2D": False, "AttnUpDecoderBlock2D": True}


def _check_block_types(where: str, side: str, types, known) -> None:
  """Raises UnsupportedError naming the first block type (down or up side) not in `known`."""
  for t in types:
    if t not in known:
      raise UnsupportedError(f"{where}: {side} block type '{t}' is not supported (known: "
                             f"{', '.join(known)})")


def autoencoder_config_from_diffusers(config: dict, where: str, kind: str):
  """The stage-1 config of a diffusers AutoencoderKL ('kl') or VQModel ('vq') config."""
  _require(config, where, _VAE_CHECKS)
  down, up = list(config["down_block_types"]), list(config["up_block_types"])
  _check_block_types(where, "down", down, _DOWN_VAE)
  _check_block_types(where, "up", up, _UP_VAE)
  attn = [i for i, t in enumerate(down) if _DOWN_VAE[t]]
  if attn != [len(up) - 1 - i for i, t in reversed(list(enumerate(up))) if _UP_VAE[t]]:
    raise UnsupportedError(f"{where}: attention in down blocks {down} and up blocks {up} is not "
                           f"mirrored, as ldm_jax's autoencoder has it")
  ch, mults = _mults(config["block_out_channels"], where)
  if config.get("in_channels", 3) != config.get("out_channels", 3):
    raise UnsupportedError(f"{where}: in_channels {config.get('in_channels')} != out_channels "
                           f"{config.get('out_channels')} (ldm_jax's autoencoder maps images to "
                           f"images of the same channels)")
  size = config.get("sample_size", 32)
  size = size[0] if isinstance(size, (list, tuple)) else size
  z = config.get("latent_channels", 4 if kind == "kl" else 3)
  embed = z if kind == "kl" else (config.get("vq_embed_dim") or z)
  return build.autoencoder_config(
      kind=kind, ch=ch, ch_mult=mults, num_res_blocks=config.get("layers_per_block", 1),
      attn_levels=attn, z_channels=z, embed_dim=embed, image_size=size,
      channels=config.get("out_channels", 3), n_embed=config.get("num_vq_embeddings", 256),
      norm_groups=config.get("norm_num_groups", 32),
      mid_attention=config.get("mid_block_add_attention", True), source=where)


def _vae_kind(config: dict, state: dict | None, where: str) -> str:
  name = config.get("_class_name")
  if name == "AutoencoderKL":
    return "kl"
  if name == "VQModel":
    return "vq"
  if name is None:
    return "vq" if state is not None and "quantize.embedding.weight" in state else "kl"
  raise UnsupportedError(f"{where}: {name} is not supported (AutoencoderKL and VQModel are)")


def load_diffusers_vae_with_config(path: str):
  """(module, variables, ldm_jax stage-1 config, diffusers scaling_factor) of a diffusers
  AutoencoderKL / VQModel folder (or a pipeline folder's vae/)."""
  config, state, folder = read_folder(path, "vae")
  where = f"diffusers {config.get('_class_name', 'autoencoder')} '{folder}'"
  for old, new in _VAE_ALIASES.items():
    state = {k.replace(old, new) if ".attentions." in k else k: v for k, v in state.items()}
  ae_config = autoencoder_config_from_diffusers(config, where, _vae_kind(config, state, where))
  module, variables = build.autoencoder_variables(ae_config, state, names.DIFFUSERS, where,
                                                  mid_attention_settings=_MID_ATTENTION)
  return module, variables, ae_config, float(config.get("scaling_factor", 0.18215))


def load_diffusers_vae(path: str):
  """(module, variables) of a diffusers AutoencoderKL / VQModel folder (or a pipeline folder's
  vae/). NHWC: module.apply(variables, x, method='encode') gives the posterior (KL) or the
  pre-quantisation latent (VQ); method='decode' maps latents to images in [-1, 1]."""
  module, variables, _, _ = load_diffusers_vae_with_config(path)
  return module, variables


# ---------------------------------------------------------------------------------------------
# UNet2DConditionModel
# ---------------------------------------------------------------------------------------------
_UNET_CHECKS = {
    "mid_block_type": ("UNetMidBlock2DCrossAttn", ("UNetMidBlock2DCrossAttn",),
                       "ldm_jax's UNet always has a cross-attention transformer in the middle"),
    "time_embedding_type": ("positional", ("positional",), "ldm_jax embeds timesteps with "
                            "sinusoids ('positional')"),
    "flip_sin_to_cos": (True, (True,), "ldm_jax's timestep embedding is [cos | sin]"),
    "freq_shift": (0, (0,), "ldm_jax's timestep frequencies have no shift"),
    "center_input_sample": (False, (False,), "ldm_jax does not recentre the input"),
    "act_fn": ("silu", ("silu",), "ldm_jax's UNet uses SiLU"),
    "conv_in_kernel": (3, (3,), "ldm_jax's UNet conv_in is 3x3"),
    "conv_out_kernel": (3, (3,), "ldm_jax's UNet conv_out is 3x3"),
    "downsample_padding": (1, (1,), "ldm_jax's UNet downsampling pads by 1"),
    "mid_block_scale_factor": (1, (1, 1.0), "ldm_jax's UNet does not rescale the mid block"),
    "resnet_out_scale_factor": (1.0, (1, 1.0), "ldm_jax's ResBlocks do not rescale"),
    "resnet_skip_time_act": (False, (False,), "ldm_jax applies SiLU to the time embedding in "
                             "every ResBlock"),
    "resnet_time_scale_shift": ("default", ("default", "scale_shift"),
                                "only 'default' and 'scale_shift' ResBlocks exist in ldm_jax"),
    "only_cross_attention": (False, (False, [False], (False,)), "ldm_jax's transformer "
                             "blocks always self-attend first"),
    "dual_cross_attention": (False, (False,), "not implemented in ldm_jax"),
    "class_embed_type": (None, (None,), "only plain class embeddings (num_class_embeds) exist "
                         "in ldm_jax"),
    "class_embeddings_concat": (False, (False,), "ldm_jax adds class embeddings"),
    "addition_embed_type": (None, (None,), "ldm_jax has no added text/time embeddings (SDXL)"),
    "encoder_hid_dim": (None, (None,), "ldm_jax has no encoder_hid_proj"),
    "time_cond_proj_dim": (None, (None,), "ldm_jax has no timestep-condition projection"),
    "timestep_post_act": (None, (None,), "ldm_jax has no activation after the time embedding"),
    "time_embedding_act_fn": (None, (None,), "ldm_jax has no extra time-embedding activation"),
    "cross_attention_norm": (None, (None,), "ldm_jax does not normalise the context"),
    "attention_type": ("default", ("default",), "gated attention is not implemented"),
    "mid_block_only_cross_attention": (None, (None, False), "ldm_jax's mid block self-attends"),
    "reverse_transformer_layers_per_block": (None, (None,), "per-block depths are not "
                                             "supported"),
}
_DOWN_UNET = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}
_UP_UNET = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}


def unet_fields_from_diffusers(config: dict, where: str) -> tuple[dict, int]:
  """(ldm_jax UNet fields, cross_attention_dim) of a UNet2DConditionModel config."""
  name = config.get("_class_name", "UNet2DConditionModel")
  if name != "UNet2DConditionModel":
    raise UnsupportedError(f"{where}: {name} is not supported (UNet2DConditionModel is)")
  _require(config, where, _UNET_CHECKS)
  down, up = list(config["down_block_types"]), list(config["up_block_types"])
  levels = len(down)
  _check_block_types(where, "down", down, _DOWN_UNET)
  _check_block_types(where, "up", up, _UP_UNET)
  attn = [i for i, t in enumerate(down) if _DOWN_UNET[t]]
  if attn != sorted(levels - 1 - i for i, t in enumerate(up) if _UP_UNET[t]):
    raise UnsupportedError(f"{where}: attention in down blocks {down} and up blocks {up} is not "
                           f"mirrored, as ldm_jax's UNet has it")
  mc, mults = _mults(config["block_out_channels"], where)
  depth = _uniform(config.get("transformer_layers_per_block", 1),
                   "transformer_layers_per_block", where)
  layers = _uniform(config.get("layers_per_block", 2), "layers_per_block", where)
  context = _uniform(config.get("cross_attention_dim", 1280), "cross_attention_dim", where)
  # attention_head_dim is the NUMBER of heads here (diffusers' historical naming), unless
  # num_attention_heads is given.
  heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
  if isinstance(heads, (list, tuple)):
    if len(heads) != levels:
      raise ConversionError(f"{where}: {len(heads)} head counts for {levels} levels")
    heads = tuple(int(h) for h in heads)
    if len(set(heads)) == 1:
      heads = heads[0]
  fields = dict(in_channels=config.get("in_channels", 4),
                out_channels=config.get("out_channels", 4), model_channels=mc,
                channel_mult=mults, num_res_blocks=layers,
                attention_resolutions=tuple(2 ** i for i in attn), conv_resample=True,
                num_classes=config.get("num_class_embeds") or 0,
                use_scale_shift_norm=config.get("resnet_time_scale_shift") == "scale_shift",
                resblock_updown=False, num_heads=heads, num_head_channels=-1,
                use_spatial_transformer=True, transformer_depth=depth,
                use_linear_proj=bool(config.get("use_linear_projection", False)),
                norm_groups=int(config.get("norm_num_groups", 32)),
                norm_eps=float(config.get("norm_eps", 1e-5)))
  groups = fields["norm_groups"]
  if groups <= 0 or any((mc * m) % groups for m in (1, *mults)):
    raise ConversionError(f"{where}: norm_num_groups={groups} does not divide block_out_channels "
                          f"{list(config['block_out_channels'])}")
  try:
    build.unet_heads(fields)
  except ValueError as e:
    raise ConversionError(f"{where}: {e}") from e
  return fields, context


def load_diffusers_unet(path: str):
  """(module, variables) of a diffusers UNet2DConditionModel folder (or a pipeline folder's
  unet/). NHWC: module.apply(variables, x, t, context) is the noise prediction, with
  y=class_labels for models with num_class_embeds."""
  config, state, folder = read_folder(path, "unet")
  where = f"diffusers UNet2DConditionModel '{folder}'"
  fields, context = unet_fields_from_diffusers(config, where)
  return build.unet_variables(fields, context, state, names.DIFFUSERS, where)


def load_diffusers_unet_fields(path: str) -> tuple[dict, int]:
  """(ldm_jax UNet fields, cross_attention_dim) of a diffusers UNet folder (config only)."""
  folder = _model_dir(path, "unet")
  with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
    return unet_fields_from_diffusers(json.load(f), f"diffusers UNet '{folder}'")


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
_DTYPES = {"float32": np.float32, "float16": np.float16}


def _write(path: str, config: dict, state: dict, dtype: str):
  if dtype not in _DTYPES:
    raise ValueError(f"dtype: expected one of {sorted(_DTYPES)}, got {dtype!r}")
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  write_safetensors(os.path.join(path, WEIGHTS),
                    {k: v.astype(_DTYPES[dtype]) for k, v in state.items()})
  return path


def _host(tree):
  if isinstance(tree, dict):
    return {k: _host(v) for k, v in tree.items()}
  return np.asarray(tree)


def diffusers_vae_config(module, scaling_factor: float = 0.18215) -> dict:
  """The diffusers config.json of an ldm_jax AutoencoderKL / VQModel."""
  vq = isinstance(module, VQModel)
  if not vq and not isinstance(module, AutoencoderKL):
    raise ConversionError(f"save_diffusers_vae: expected an AutoencoderKL or VQModel, got "
                          f"{type(module).__name__}")
  if not vq and module.embed_dim != module.z_channels:
    raise UnsupportedError(f"save_diffusers_vae: diffusers' AutoencoderKL needs embed_dim == "
                           f"z_channels (this model: {module.embed_dim} and {module.z_channels})")
  levels = len(module.ch_mult)
  attn = [module.resolution // 2 ** i in module.attn_resolutions for i in range(levels)]
  config = {
      "_class_name": "VQModel" if vq else "AutoencoderKL",
      "_diffusers_version": DIFFUSERS_VERSION,
      "in_channels": module.out_ch, "out_channels": module.out_ch,
      "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D"
                           for a in attn],
      "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D"
                         for a in reversed(attn)],
      "block_out_channels": [module.ch * m for m in module.ch_mult],
      "layers_per_block": module.num_res_blocks, "act_fn": "silu",
      "latent_channels": module.z_channels, "norm_num_groups": module.norm_groups,
      "sample_size": module.resolution, "scaling_factor": float(scaling_factor),
      "mid_block_add_attention": bool(module.mid_attention), "force_upcast": False,
  }
  if vq:
    config.update({"num_vq_embeddings": module.n_embed, "vq_embed_dim": module.embed_dim,
                   "norm_type": "group", "lookup_from_codebook": False})
  else:
    config.update({"use_quant_conv": True, "use_post_quant_conv": True})
  return config


def save_diffusers_vae(path: str, module, variables, *, scaling_factor: float = 0.18215,
                       dtype: str = "float32") -> str:
  """Writes an ldm_jax autoencoder as a diffusers AutoencoderKL / VQModel folder."""
  config = diffusers_vae_config(module, scaling_factor)
  params = _host(variables["params"])
  if isinstance(module, VQModel) and module.ema_decay > 0:   # EMA codebook lives in 'vq'
    params = {**params, "quantize": {"embedding": _host(variables["vq"])["quantize"]["codebook"]}}
  shapes = build.autoencoder_shapes(module)["params"]
  if "quantize" in params and "quantize" not in shapes:      # the EMA codebook, as a weight
    shapes = {**shapes, "quantize": {"embedding": params["quantize"]["embedding"]}}
  entries = names.autoencoder_entries(shapes, names.DIFFUSERS)
  return _write(path, config, params_to_state(params, entries), dtype)


def unet_context_dim(params) -> int | None:
  """The context width the UNet's cross-attention reads (from its attn2/to_k kernels)."""
  dims = set()

  def walk(tree, path):
    for k, v in tree.items():
      if isinstance(v, dict):
        walk(v, path + (k,))
      elif path[-2:] == ("attn2", "to_k") and k == "kernel":
        dims.add(int(np.shape(v)[0]))

  walk(params, ())
  if len(dims) > 1:
    raise UnsupportedError(f"the UNet's cross-attention reads contexts of widths {sorted(dims)}; "
                           f"diffusers' UNet2DConditionModel needs one cross_attention_dim")
  return dims.pop() if dims else None


def diffusers_unet_config(module: UNet, cross_attention_dim: int, sample_size: int = 32) -> dict:
  """The diffusers config.json of an ldm_jax UNet (SpatialTransformer models only)."""
  why = None
  if not module.use_spatial_transformer:
    why = "plain AttentionBlocks (use_spatial_transformer=False)"
  elif module.resblock_updown:
    why = "ResBlock resampling (resblock_updown=True)"
  elif not module.conv_resample:
    why = "resampling without convs (conv_resample=False)"
  elif module.attention_coords:
    why = "positional features in its SpatialTransformers (attention_coords=True)"
  if why:
    raise UnsupportedError(f"save_diffusers_unet: a UNet with {why} has no diffusers "
                           f"UNet2DConditionModel equivalent")
  levels = len(module.channel_mult)
  attn = [2 ** i in module.attention_resolutions for i in range(levels)]
  if module.num_head_channels <= 0 and isinstance(module.num_heads, int):
    heads = module.num_heads
  else:   # per level; levels without attention get any valid count
    heads = []
    for level, mult in enumerate(module.channel_mult):
      try:
        heads.append(heads_for_level(mult * module.model_channels, level, module.num_heads,
                                     module.num_head_channels)[0])
      except ValueError:
        heads.append(1)
  return {
      "_class_name": "UNet2DConditionModel",
      "_diffusers_version": DIFFUSERS_VERSION,
      "sample_size": int(sample_size), "in_channels": module.in_channels,
      "out_channels": module.out_channels, "center_input_sample": False,
      "flip_sin_to_cos": True, "freq_shift": 0,
      "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
      "mid_block_type": "UNetMidBlock2DCrossAttn",
      "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
      "only_cross_attention": False,
      "block_out_channels": [module.model_channels * m for m in module.channel_mult],
      "layers_per_block": module.num_res_blocks, "downsample_padding": 1,
      "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": module.norm_groups,
      "norm_eps": module.norm_eps,
      "cross_attention_dim": int(cross_attention_dim),
      "transformer_layers_per_block": module.transformer_depth,
      "attention_head_dim": heads, "use_linear_projection": bool(module.use_linear_proj),
      "class_embed_type": None, "num_class_embeds": module.num_classes or None,
      "upcast_attention": False,
      "resnet_time_scale_shift": "scale_shift" if module.use_scale_shift_norm else "default",
      "time_embedding_type": "positional", "dropout": 0.0,
  }


def save_diffusers_unet(path: str, module: UNet, variables, *, sample_size: int = 32,
                        cross_attention_dim: int | None = None, dtype: str = "float32") -> str:
  """Writes an ldm_jax UNet as a diffusers UNet2DConditionModel folder. The context width is
  read off the weights unless given."""
  params = _host(variables["params"])
  context = cross_attention_dim or unet_context_dim(params)
  if context is None:
    raise UnsupportedError("save_diffusers_unet: the UNet has no cross-attention")
  config = diffusers_unet_config(module, context, sample_size)
  entries = build.unet_map(module, build.unet_shapes(module, context), names.DIFFUSERS)
  return _write(path, config, params_to_state(params, entries), dtype)

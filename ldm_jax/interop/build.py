"""ldm_jax modules, variables and configs from the architecture facts an importer has read.

Both importers (CompVis, diffusers) describe a model by the ldm_jax fields it needs: a stage-1
config for the autoencoder, UNet constructor fields for the UNet. From those this module builds
the module, its expected parameter tree (jax.eval_shape of init, so nothing is allocated twice),
fills it from a torch-named state dict by the name map derived from that tree (names.py), and
writes the ldm_jax configs an export carries.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from ldm_jax import config as config_lib
from ldm_jax.interop import names
from ldm_jax.interop.weights import ConversionError, UnsupportedError, state_to_params
from ldm_jax.models.autoencoder import VectorQuantizer
from ldm_jax.models.conditioning import ClassEmbedder, SpatialRescaler
from ldm_jax.models.unet import UNet, heads_for_level
from ldm_jax.models.build import build_autoencoder

UNET_FIELDS = ("in_channels", "out_channels", "model_channels", "channel_mult", "num_res_blocks",
               "attention_resolutions", "conv_resample", "num_classes", "use_scale_shift_norm",
               "resblock_updown", "num_heads", "num_head_channels", "use_spatial_transformer",
               "transformer_depth", "use_linear_proj", "norm_groups", "norm_eps")


def _no_data(config, source: str):
  """Converted models come without training data; data.path names where they came from."""
  config.data.path = f"(none: weights converted from {source})"


# ---------------------------------------------------------------------------------------------
# Autoencoder
# ---------------------------------------------------------------------------------------------
def autoencoder_config(*, kind: str, ch: int, ch_mult, num_res_blocks: int, attn_levels,
                       z_channels: int, embed_dim: int, image_size: int, channels: int,
                       n_embed: int = 0, norm_groups: int = 32, mid_attention: bool = True,
                       source: str = "") -> ml_collections.ConfigDict:
  """A validated stage-1 config. `attn_levels` are the levels with attention after each ResNet
  block (ldm_jax names them by feature-map side, at the training image size); `mid_attention`
  whether the mid blocks have one."""
  c = config_lib.defaults("autoencoder")
  m = c.model
  m.type, m.ch, m.ch_mult = kind, int(ch), tuple(int(x) for x in ch_mult)
  m.num_res_blocks, m.z_channels, m.embed_dim = int(num_res_blocks), int(z_channels), int(embed_dim)
  m.attn_resolutions = tuple(int(image_size) // 2 ** i for i in sorted(attn_levels))
  m.dropout, m.norm_groups, m.mid_attention = 0.0, int(norm_groups), bool(mid_attention)
  if kind == "vq":
    m.n_embed = int(n_embed)
  c.data.image_size, c.data.channels = int(image_size), int(channels)
  _no_data(c, source)
  try:
    return config_lib.validate(c)
  except config_lib.ConfigError as e:
    raise UnsupportedError(f"{source}: the autoencoder has no ldm_jax equivalent: {e}") from e


def autoencoder_module(config):
  return build_autoencoder(config.model, image_size=config.data.image_size,
                           channels=config.data.channels)


def autoencoder_shapes(module):
  """The variables of an autoencoder module as ShapeDtypeStructs (jax.eval_shape of init)."""
  module = module.clone(attention_impl="auto")   # the same tree; traceable on any host
  x = jax.ShapeDtypeStruct((1, module.resolution, module.resolution, module.out_ch), jnp.float32)
  return jax.eval_shape(lambda v: module.init({"params": jax.random.PRNGKey(0),
                                               "sample": jax.random.PRNGKey(0)}, v), x)


def autoencoder_map(config, layout: str) -> list[names.Entry]:
  """The name map of the autoencoder of a stage-1 config, from its parameter tree."""
  return names.autoencoder_entries(autoencoder_shapes(autoencoder_module(config))["params"],
                                   layout)


def _vq_state(module) -> dict:
  """The quantiser's 'vq' collection as module.init makes it (usage statistics etc.)."""
  q = VectorQuantizer(module.n_embed, module.embed_dim, module.beta, module.ema_decay,
                      module.restart_dead, module.dead_threshold)
  init = q.init({"params": jax.random.PRNGKey(0)}, jnp.zeros((1, 1, 1, module.embed_dim)))
  return {"quantize": init["vq"]}


def check_mid_attention(config, state, layout: str, where: str, settings: dict,
                        prefix: str = ""):
  """One ConversionError line when `config` and the weights disagree on the mid-block
  attention. `settings` names the source config's setting for each case, e.g. {True:
  "mid_block_add_attention=true", False: "mid_block_add_attention=false"}."""
  wanted = bool(config.model.mid_attention)
  attn = tuple(f"{prefix}{name}." for name in names.autoencoder_mid_attention(layout))
  found = sorted(k for k in state if k.startswith(attn))
  if found and not wanted:
    raise ConversionError(f"{where}: {settings[False]} means no mid-block attention, but the "
                          f"checkpoint has its {len(found)} weights (e.g. {found[0]}); set "
                          f"{settings[True]}, or use the config the checkpoint was trained with")
  if wanted and not found and any(k.startswith(f"{prefix}encoder.") for k in state):
    raise ConversionError(f"{where}: {settings[True]} means a mid-block attention, but the "
                          f"checkpoint has none of its weights (no {attn[0]}*, {attn[1]}*); set "
                          f"{settings[False]}, or use the config the checkpoint was trained with")


def autoencoder_variables(config, state, layout: str, where: str, prefix: str = "",
                          ignore=(), mid_attention_settings: dict | None = None):
  """(module, variables) of the autoencoder of `config` filled from `state`. With
  `mid_attention_settings` (check_mid_attention's `settings`) a disagreement on the mid-block
  attention is said as such rather than as missing / unexpected weights."""
  if mid_attention_settings:
    check_mid_attention(config, state, layout, where, mid_attention_settings, prefix)
  module = autoencoder_module(config)
  abstract = autoencoder_shapes(module)
  entries = names.prefixed(names.autoencoder_entries(abstract["params"], layout), prefix)
  params = state_to_params(state, entries, abstract["params"], where, ignore)
  variables = {"params": _device(params)}
  if "vq" in abstract:
    variables["vq"] = _vq_state(module)
  return module, variables


# ---------------------------------------------------------------------------------------------
# UNet
# ---------------------------------------------------------------------------------------------
def unet_module(fields: dict) -> UNet:
  return UNet(**{k: fields[k] for k in UNET_FIELDS})


def unet_shapes(module: UNet, context_dim: int | None) -> dict:
  """The params of a UNet module as ShapeDtypeStructs (jax.eval_shape of init)."""
  module = module.clone(attention_impl="auto")   # the same tree; traceable on any host
  s = 2 ** (len(module.channel_mult) - 1)
  args = [jax.ShapeDtypeStruct((1, s, s, module.in_channels), jnp.float32),
          jax.ShapeDtypeStruct((1,), jnp.float32)]
  context = jax.ShapeDtypeStruct((1, 1, context_dim), jnp.float32) if context_dim else None
  labels = jax.ShapeDtypeStruct((1,), jnp.int32) if module.num_classes else None
  return jax.eval_shape(lambda x, t, c, y: module.init(jax.random.PRNGKey(0), x, t, c, y),
                        *args, context, labels)["params"]


def unet_map(module: UNet, shapes, layout: str, new_attention_heads=None) -> list[names.Entry]:
  """The name map of a UNet from its parameter tree (`shapes`: unet_shapes)."""
  return names.unet_entries(shapes, layout, levels=len(module.channel_mult),
                            num_res_blocks=module.num_res_blocks,
                            new_attention_heads=new_attention_heads)


def unet_variables(fields: dict, context_dim: int | None, state, layout: str, where: str,
                   prefix: str = "", ignore=(), new_attention_heads=None, shapes=None):
  """(module, variables) of the UNet of `fields` (UNet constructor fields) from `state`.
  `shapes` (unet_shapes of that UNet) saves tracing it again when the caller has them."""
  module = unet_module(fields)
  shapes = unet_shapes(module, context_dim) if shapes is None else shapes
  entries = names.prefixed(unet_map(module, shapes, layout, new_attention_heads), prefix)
  params = state_to_params(state, entries, shapes, where, ignore)
  return module, {"params": _device(params)}


def unet_heads(fields: dict) -> list[int]:
  """Heads of each level's attention (levels without attention: 0)."""
  out = []
  levels = len(fields["channel_mult"])
  for level, mult in enumerate(fields["channel_mult"]):
    used = 2 ** level in fields["attention_resolutions"] or level == levels - 1
    out.append(heads_for_level(mult * fields["model_channels"], level, fields["num_heads"],
                               fields["num_head_channels"])[0] if used else 0)
  return out


def unet_config_heads(fields: dict, where: str) -> tuple[int, int]:
  """(num_heads, num_head_channels) for an ldm_jax config, which has no per-level head counts:
  per-level heads become a fixed head width when they are one."""
  if fields["num_head_channels"] > 0:
    return -1, fields["num_head_channels"]
  heads = fields["num_heads"]
  if isinstance(heads, int):
    return heads, -1
  counts = unet_heads(fields)
  used = [(h, fields["model_channels"] * m // h) for h, m in zip(counts, fields["channel_mult"])
          if h]
  if len({h for h, _ in used}) == 1:
    return used[0][0], -1
  if len({d for _, d in used}) == 1:
    return -1, used[0][1]
  raise UnsupportedError(f"{where}: per-level heads {tuple(heads)} with head widths "
                         f"{tuple(d for _, d in used)} have no ldm_jax config equivalent (one "
                         f"head count or one head width for all levels); the UNet itself loads")


# ---------------------------------------------------------------------------------------------
# Class embedder
# ---------------------------------------------------------------------------------------------
def class_embedder_variables(num_classes: int, embed_dim: int, null: str, state, where: str,
                             prefix: str = ""):
  module = ClassEmbedder(num_classes, embed_dim, null)
  abstract = jax.eval_shape(lambda y: module.init(jax.random.PRNGKey(0), y),
                            jax.ShapeDtypeStruct((1,), jnp.int32))
  entries = names.prefixed(names.class_embedder_entries(abstract["params"]), prefix)
  params = state_to_params(state, entries, abstract["params"], where)
  return module, {"params": _device(params)}


def rescaler_variables(n_stages: int, in_channels: int, out_channels: int, state, where: str,
                       prefix: str = ""):
  """(module, variables) of a SpatialRescaler with a channel mapper (bilinear x0.5 stages, not
  antialiased: torch's F.interpolate) from `state`."""
  module = SpatialRescaler(n_stages, 0.5, out_channels=out_channels, antialias=False)
  side = 2 ** n_stages
  abstract = jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x),
                            jax.ShapeDtypeStruct((1, side, side, in_channels), jnp.float32))
  entries = names.prefixed(names.rescaler_entries(abstract["params"]), prefix)
  params = state_to_params(state, entries, abstract["params"], where)
  return module, {"params": _device(params)}


# ---------------------------------------------------------------------------------------------
# The LDM config an export carries
# ---------------------------------------------------------------------------------------------
def ldm_config(*, unet_fields: dict, ae_config, latent_size: int, diffusion: dict, cond: dict,
               source: str, first_stage: str) -> ml_collections.ConfigDict:
  """A validated 'ldm' config: the UNet and schedule of a converted model, its conditioning
  (`cond`: config.cond fields), and `first_stage` (where its autoencoder lives)."""
  c = config_lib.defaults("ldm")
  f = 2 ** (len(ae_config.model.ch_mult) - 1)
  c.data.image_size, c.data.channels = int(latent_size * f), int(ae_config.data.channels)
  _no_data(c, source)
  c.first_stage.checkpoint = first_stage
  u = c.unet
  u.model_channels = int(unet_fields["model_channels"])
  u.channel_mult = tuple(unet_fields["channel_mult"])
  u.num_res_blocks = int(unet_fields["num_res_blocks"])
  u.attention_resolutions = tuple(unet_fields["attention_resolutions"])
  u.num_heads, u.num_head_channels = unet_config_heads(unet_fields, source)
  u.use_spatial_transformer = bool(unet_fields["use_spatial_transformer"])
  u.transformer_depth = int(unet_fields["transformer_depth"])
  u.use_linear_proj = bool(unet_fields["use_linear_proj"])
  u.use_scale_shift_norm = bool(unet_fields["use_scale_shift_norm"])
  u.resblock_updown = bool(unet_fields["resblock_updown"])
  u.conv_resample = bool(unet_fields["conv_resample"])
  u.norm_groups, u.norm_eps = int(unet_fields["norm_groups"]), float(unet_fields["norm_eps"])
  u.dropout = 0.0
  for key, value in diffusion.items():
    c.diffusion[key] = value
  for key, value in cond.items():
    c.cond[key] = value
  try:
    return config_lib.validate(c)
  except config_lib.ConfigError as e:
    raise UnsupportedError(f"{source}: no ldm_jax LDM config fits: {e}") from e


def _device(tree):
  return jax.tree_util.tree_map(jnp.asarray, tree)

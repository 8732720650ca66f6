"""Weight-name maps between ldm_jax modules and the PyTorch layouts (CompVis, diffusers), as data.

A map is a list of `Entry`: a Flax module path, the matching torch module name and the kind of
layer, which fixes the parameter names on both sides and how each tensor is laid out. The same
list converts in both directions (ldm_jax/interop/weights.py does the tensor work), and it is
derived from the architecture alone, so a checkpoint never decides what the model looks like.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

COMPVIS, DIFFUSERS = "compvis", "diffusers"
LAYOUTS = (COMPVIS, DIFFUSERS)

# kind -> ((Flax leaf, torch suffix), ...). An empty leaf/suffix means the entry IS the array.
LEAVES = {
    "conv": (("kernel", "weight"), ("bias", "bias")),          # nn.Conv   <-> Conv2d
    "dense": (("kernel", "weight"), ("bias", "bias")),         # nn.Dense  <-> Linear
    "dense_nobias": (("kernel", "weight"),),                   # nn.Dense  <-> Linear(bias=False)
    "conv_linear": (("kernel", "weight"), ("bias", "bias")),   # 1x1 nn.Conv <-> Linear
    "dense_conv1d": (("kernel", "weight"), ("bias", "bias")),  # nn.Dense  <-> 1x1 Conv1d
    "norm": (("scale", "weight"), ("bias", "bias")),           # Group/LayerNorm
    "embed": (("embedding", "weight"),),                       # nn.Embed  <-> Embedding
    "param": (("", ""),),                                      # a bare array, same layout
}


@dataclasses.dataclass(frozen=True)
class Entry:
  """One layer: its Flax module path, its torch module name, its kind (a LEAVES key).

  `heads` > 0 marks a CompVis qkv projection stored in the 'new' attention order ([q|k|v] of
  all heads) that ldm_jax keeps in the legacy per-head order.
  """
  flax: tuple[str, ...]
  torch: str
  kind: str
  heads: int = 0

  def leaves(self):
    """(Flax leaf path, torch key) of every tensor of the layer."""
    for leaf, suffix in LEAVES[self.kind]:
      yield ((self.flax + (leaf,)) if leaf else self.flax,
             f"{self.torch}.{suffix}" if suffix else self.torch)


def _check_layout(layout: str):
  if layout not in LAYOUTS:
    raise ValueError(f"unknown weight layout '{layout}' (expected one of {LAYOUTS})")


# ---------------------------------------------------------------------------------------------
# Autoencoder (AutoencoderKL / VQModel)
# ---------------------------------------------------------------------------------------------
_AE_SHORTCUT = {COMPVIS: "nin_shortcut", DIFFUSERS: "conv_shortcut"}
_AE_ATTN = {COMPVIS: (("norm", "norm", "norm"), ("q", "q", "conv"), ("k", "k", "conv"),
                      ("v", "v", "conv"), ("proj_out", "proj_out", "conv")),
            DIFFUSERS: (("norm", "group_norm", "norm"), ("q", "to_q", "conv_linear"),
                        ("k", "to_k", "conv_linear"), ("v", "to_v", "conv_linear"),
                        ("proj_out", "to_out.0", "conv_linear"))}


def _ae_resnet(flax, torch, c_in: int, c_out: int, layout: str) -> list[Entry]:
  out = [Entry(flax + ("norm1",), f"{torch}.norm1", "norm"),
         Entry(flax + ("conv1",), f"{torch}.conv1", "conv"),
         Entry(flax + ("norm2",), f"{torch}.norm2", "norm"),
         Entry(flax + ("conv2",), f"{torch}.conv2", "conv")]
  if c_in != c_out:
    out.append(Entry(flax + ("nin_shortcut",), f"{torch}.{_AE_SHORTCUT[layout]}", "conv"))
  return out


def _ae_attn(flax, torch, layout: str) -> list[Entry]:
  return [Entry(flax + (f,), f"{torch}.{t}", kind) for f, t, kind in _AE_ATTN[layout]]


def autoencoder_entries(*, ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                        attn_resolutions: Sequence[int], resolution: int, vq: bool,
                        layout: str) -> list[Entry]:
  """The map of an ldm_jax AutoencoderKL / VQModel (fields as in build_autoencoder).

  diffusers numbers the decoder's blocks from the bottom (up_blocks.0 is CompVis up.{n-1}).
  """
  _check_layout(layout)
  cv = layout == COMPVIS
  levels = len(ch_mult)
  widths = [ch * m for m in ch_mult]
  e: list[Entry] = []

  def name(part, kind, i, j=None):
    """CompVis / diffusers module name of a level's ResNet block, attention or resampler."""
    if cv:
      group = "down" if part == "encoder" else "up"
      base = f"{part}.{group}.{i}"
      return {"block": f"{base}.block.{j}", "attn": f"{base}.attn.{j}",
              "sample": f"{base}.{group}sample.conv"}[kind]
    group = "down_blocks" if part == "encoder" else "up_blocks"
    block = i if part == "encoder" else levels - 1 - i
    base = f"{part}.{group}.{block}"
    sampler = "downsamplers" if part == "encoder" else "upsamplers"
    return {"block": f"{base}.resnets.{j}", "attn": f"{base}.attentions.{j}",
            "sample": f"{base}.{sampler}.0.conv"}[kind]

  def mid(part):
    if cv:
      return (f"{part}.mid.block_1", f"{part}.mid.attn_1", f"{part}.mid.block_2")
    return (f"{part}.mid_block.resnets.0", f"{part}.mid_block.attentions.0",
            f"{part}.mid_block.resnets.1")

  norm_out = "norm_out" if cv else "conv_norm_out"
  # Encoder.
  e.append(Entry(("encoder", "conv_in"), "encoder.conv_in", "conv"))
  c, res = ch, resolution
  for i in range(levels):
    for j in range(num_res_blocks):
      e += _ae_resnet(("encoder", f"down_{i}_block_{j}"), name("encoder", "block", i, j), c,
                      widths[i], layout)
      c = widths[i]
      if res in attn_resolutions:
        e += _ae_attn(("encoder", f"down_{i}_attn_{j}"), name("encoder", "attn", i, j), layout)
    if i != levels - 1:
      e.append(Entry(("encoder", f"down_{i}_downsample", "conv"), name("encoder", "sample", i),
                     "conv"))
      res //= 2
  for part in ("encoder", "decoder"):
    if part == "decoder":
      e.append(Entry(("decoder", "conv_in"), "decoder.conv_in", "conv"))
    b1, attn, b2 = mid(part)
    e += _ae_resnet((part, "mid_block_1"), b1, widths[-1], widths[-1], layout)
    e += _ae_attn((part, "mid_attn_1"), attn, layout)
    e += _ae_resnet((part, "mid_block_2"), b2, widths[-1], widths[-1], layout)
    if part == "encoder":
      e.append(Entry(("encoder", "norm_out"), f"encoder.{norm_out}", "norm"))
      e.append(Entry(("encoder", "conv_out"), "encoder.conv_out", "conv"))
  # Decoder levels, from the bottom up as the decoder runs.
  c, res = widths[-1], resolution // 2 ** (levels - 1)
  for i in reversed(range(levels)):
    for j in range(num_res_blocks + 1):
      e += _ae_resnet(("decoder", f"up_{i}_block_{j}"), name("decoder", "block", i, j), c,
                      widths[i], layout)
      c = widths[i]
      if res in attn_resolutions:
        e += _ae_attn(("decoder", f"up_{i}_attn_{j}"), name("decoder", "attn", i, j), layout)
    if i != 0:
      e.append(Entry(("decoder", f"up_{i}_upsample", "conv"), name("decoder", "sample", i),
                     "conv"))
      res *= 2
  e.append(Entry(("decoder", "norm_out"), f"decoder.{norm_out}", "norm"))
  e.append(Entry(("decoder", "conv_out"), "decoder.conv_out", "conv"))
  e.append(Entry(("quant_conv",), "quant_conv", "conv"))
  e.append(Entry(("post_quant_conv",), "post_quant_conv", "conv"))
  if vq:
    e.append(Entry(("quantize", "embedding"), "quantize.embedding.weight", "param"))
  return e


# ---------------------------------------------------------------------------------------------
# UNet
# ---------------------------------------------------------------------------------------------
_UNET_RESNET = {COMPVIS: ("in_layers.0", "in_layers.2", "emb_layers.1", "out_layers.0",
                          "out_layers.3", "skip_connection"),
                DIFFUSERS: ("norm1", "conv1", "time_emb_proj", "norm2", "conv2",
                            "conv_shortcut")}
_UNET_TOP = {COMPVIS: {"time_embed_0": "time_embed.0", "time_embed_2": "time_embed.2",
                       "label_emb": "label_emb", "input_blocks_0_0": "input_blocks.0.0",
                       "out_norm": "out.0", "out_conv": "out.2"},
             DIFFUSERS: {"time_embed_0": "time_embedding.linear_1",
                         "time_embed_2": "time_embedding.linear_2",
                         "label_emb": "class_embedding", "input_blocks_0_0": "conv_in",
                         "out_norm": "conv_norm_out", "out_conv": "conv_out"}}


def _unet_resnet(flax, torch, c_in: int, c_out: int, layout: str) -> list[Entry]:
  n1, c1, emb, n2, c2, skip = _UNET_RESNET[layout]
  out = [Entry(flax + ("in_norm",), f"{torch}.{n1}", "norm"),
         Entry(flax + ("in_conv",), f"{torch}.{c1}", "conv"),
         Entry(flax + ("emb_proj",), f"{torch}.{emb}", "dense"),
         Entry(flax + ("out_norm",), f"{torch}.{n2}", "norm"),
         Entry(flax + ("out_conv",), f"{torch}.{c2}", "conv")]
  if c_in != c_out:
    out.append(Entry(flax + ("skip",), f"{torch}.{skip}", "conv"))
  return out


def _transformer(flax, torch, depth: int, use_linear: bool) -> list[Entry]:
  """SpatialTransformer: the same names in CompVis and diffusers."""
  proj = "dense" if use_linear else "conv"
  e = [Entry(flax + ("norm",), f"{torch}.norm", "norm"),
       Entry(flax + ("proj_in",), f"{torch}.proj_in", proj)]
  for d in range(depth):
    fb, tb = flax + (f"transformer_blocks_{d}",), f"{torch}.transformer_blocks.{d}"
    for n in ("norm1", "norm2", "norm3"):
      e.append(Entry(fb + (n,), f"{tb}.{n}", "norm"))
    for a in ("attn1", "attn2"):
      for p in ("to_q", "to_k", "to_v"):
        e.append(Entry(fb + (a, p), f"{tb}.{a}.{p}", "dense_nobias"))
      e.append(Entry(fb + (a, "to_out"), f"{tb}.{a}.to_out.0", "dense"))
    e.append(Entry(fb + ("ff", "proj_in"), f"{tb}.ff.net.0.proj", "dense"))
    e.append(Entry(fb + ("ff", "proj_out"), f"{tb}.ff.net.2", "dense"))
  e.append(Entry(flax + ("proj_out",), f"{torch}.proj_out", proj))
  return e


def _attention_block(flax, torch, heads_if_new_order: int) -> list[Entry]:
  """openaimodel's AttentionBlock (CompVis only): conv1d qkv and proj_out."""
  return [Entry(flax + ("norm",), f"{torch}.norm", "norm"),
          Entry(flax + ("qkv",), f"{torch}.qkv", "dense_conv1d", heads_if_new_order),
          Entry(flax + ("proj_out",), f"{torch}.proj_out", "dense_conv1d")]


def unet_entries(*, model_channels: int, channel_mult: Sequence[int], num_res_blocks: int,
                 attention_resolutions: Sequence[int], num_classes: int = 0,
                 conv_resample: bool = True, resblock_updown: bool = False,
                 use_spatial_transformer: bool = True, transformer_depth: int = 1,
                 use_linear_proj: bool = False, new_attention_heads=None, layout: str,
                 **_) -> list[Entry]:
  """The map of an ldm_jax UNet (its constructor fields; others are ignored).

  `new_attention_heads(level) -> heads` is given for CompVis models with
  use_new_attention_order, whose AttentionBlock qkv rows are reordered on the way in.
  """
  _check_layout(layout)
  cv = layout == COMPVIS
  if not cv and (resblock_updown or not use_spatial_transformer or not conv_resample):
    raise ValueError("the diffusers layout has no resblock_updown / AttentionBlock / "
                     "conv_resample=False UNets")
  top = _UNET_TOP[layout]
  levels = len(channel_mult)
  mc = model_channels
  e = [Entry(("time_embed_0",), top["time_embed_0"], "dense"),
       Entry(("time_embed_2",), top["time_embed_2"], "dense")]
  if num_classes > 0:
    e.append(Entry(("label_emb",), top["label_emb"], "embed"))
  e.append(Entry(("input_blocks_0_0",), top["input_blocks_0_0"], "conv"))

  def attention(flax_name, torch_name, level):
    if use_spatial_transformer:
      return _transformer((flax_name,), torch_name, transformer_depth, use_linear_proj)
    heads = new_attention_heads(level) if new_attention_heads else 0
    return _attention_block((flax_name,), torch_name, heads)

  chans, ch, ds, n = [mc], mc, 1, 1
  for level, mult in enumerate(channel_mult):
    for j in range(num_res_blocks):
      out = mult * mc
      block = f"input_blocks.{n}" if cv else f"down_blocks.{level}"
      e += _unet_resnet((f"input_blocks_{n}_0",),
                        f"{block}.0" if cv else f"{block}.resnets.{j}", ch, out, layout)
      ch = out
      if ds in attention_resolutions:
        e += attention(f"input_blocks_{n}_1", f"{block}.1" if cv else f"{block}.attentions.{j}",
                       level)
      chans.append(ch)
      n += 1
    if level != levels - 1:
      if resblock_updown:
        e += _unet_resnet((f"input_blocks_{n}_0",), f"input_blocks.{n}.0", ch, ch, layout)
      elif conv_resample:
        e.append(Entry((f"input_blocks_{n}_0",),
                       f"input_blocks.{n}.0.op" if cv else
                       f"down_blocks.{level}.downsamplers.0.conv", "conv"))
      chans.append(ch)
      ds *= 2
      n += 1

  mid = ("middle_block.0", "middle_block.1", "middle_block.2") if cv else (
      "mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1")
  e += _unet_resnet(("middle_block_0",), mid[0], ch, ch, layout)
  e += attention("middle_block_1", mid[1], levels - 1)
  e += _unet_resnet(("middle_block_2",), mid[2], ch, ch, layout)

  n = 0
  for level, mult in reversed(list(enumerate(channel_mult))):
    up = levels - 1 - level
    for i in range(num_res_blocks + 1):
      out = mult * mc
      block = f"output_blocks.{n}" if cv else f"up_blocks.{up}"
      e += _unet_resnet((f"output_blocks_{n}_0",),
                        f"{block}.0" if cv else f"{block}.resnets.{i}", ch + chans.pop(), out,
                        layout)
      ch = out
      m = 1
      if ds in attention_resolutions:
        e += attention(f"output_blocks_{n}_1", f"{block}.1" if cv else f"{block}.attentions.{i}",
                       level)
        m = 2
      if level and i == num_res_blocks:
        if resblock_updown:
          e += _unet_resnet((f"output_blocks_{n}_{m}",), f"output_blocks.{n}.{m}", ch, ch,
                            layout)
        elif conv_resample:
          e.append(Entry((f"output_blocks_{n}_{m}",),
                         f"output_blocks.{n}.{m}.conv" if cv else
                         f"up_blocks.{up}.upsamplers.0.conv", "conv"))
        ds //= 2
      n += 1
  e.append(Entry(("out_norm",), top["out_norm"], "norm"))
  e.append(Entry(("out_conv",), top["out_conv"], "conv"))
  return e


# ---------------------------------------------------------------------------------------------
# Conditioning
# ---------------------------------------------------------------------------------------------
def class_embedder_entries() -> list[Entry]:
  """ClassEmbedder's table (CompVis cond_stage_model.embedding)."""
  return [Entry(("embedding",), "embedding", "embed")]


def prefixed(entries: list[Entry], prefix: str) -> list[Entry]:
  """The same map under a torch name prefix ('model.diffusion_model.', 'first_stage_model.')."""
  return [dataclasses.replace(e, torch=prefix + e.torch) for e in entries]

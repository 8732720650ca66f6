"""Weight-name maps between ldm_jax modules and the PyTorch layouts (CompVis, diffusers), as data.

A map is a list of `Entry`: a Flax module path, the matching torch module name and the kind of
layer, which fixes the parameter names on both sides and how each tensor is laid out. The same
list converts in both directions (ldm_jax/interop/weights.py does the tensor work).

Maps are derived from the model's own parameter tree (jax.eval_shape of its init), never from a
second description of the architecture: every module of the tree is renamed by declarative
`Rule`s (regular expressions over ldm_jax paths, a name template per layout), and the few
structural facts a rename needs (diffusers' reversed decoder numbering, the UNet's
input_blocks.N vs down_blocks.i.resnets.j) are computed from the block indices in the paths and
the number of levels / ResNet blocks per level.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Mapping, Sequence

COMPVIS, DIFFUSERS = "compvis", "diffusers"
LAYOUTS = (COMPVIS, DIFFUSERS)

# kind -> ((Flax leaf, torch suffix), ...). An empty leaf/suffix means the entry IS the array.
LEAVES = {
    "conv": (("kernel", "weight"), ("bias", "bias")),          # nn.Conv   <-> Conv2d
    "conv_nobias": (("kernel", "weight"),),                    # nn.Conv   <-> Conv2d(bias=False)
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


@dataclasses.dataclass(frozen=True)
class Rule:
  """A rename: `pattern` (a regex matched against a whole ldm_jax path) -> a name template per
  layout (str.format over the pattern's named groups and the block's derived facts; None: the
  layout has no such layer). `kinds` overrides the tensor kind per layout (default: the kind
  the leaves show). `when` restricts the rule to blocks whose facts satisfy it; `heads` marks
  CompVis qkv projections that may be stored in the new attention order."""
  pattern: str
  compvis: str | None
  diffusers: str | None
  kinds: Mapping[str, str] | None = None
  when: Callable[[dict], bool] | None = None
  heads: bool = False

  def name(self, layout: str) -> str | None:
    return self.compvis if layout == COMPVIS else self.diffusers


def same(pattern: str, template: str, **kw) -> Rule:
  """A rule whose name is the same in both layouts."""
  return Rule(pattern, template, template, **kw)


def _check_layout(layout: str):
  if layout not in LAYOUTS:
    raise ValueError(f"unknown weight layout '{layout}' (expected one of {LAYOUTS})")


# ---------------------------------------------------------------------------------------------
# The parameter tree
# ---------------------------------------------------------------------------------------------
def modules(params) -> dict[tuple[str, ...], dict[str, tuple]]:
  """Module path -> {leaf name: shape} of a (possibly abstract) Flax params tree."""
  out: dict = {}

  def walk(tree, path):
    for key, value in tree.items():
      if hasattr(value, "items"):
        walk(value, path + (key,))
      else:
        out.setdefault(path, {})[key] = tuple(value.shape)

  walk(params, ())
  return out


def layer_kind(leaves: Mapping[str, tuple]) -> str:
  """The kind a layer's leaves show: norm, embed, conv / conv_nobias (4-d kernel), dense,
  dense_nobias."""
  names = set(leaves)
  if names == {"scale", "bias"}:
    return "norm"
  if names == {"embedding"}:
    return "embed"
  if "kernel" in names and names <= {"kernel", "bias"}:
    if len(leaves["kernel"]) == 4:
      return "conv" if "bias" in names else "conv_nobias"
    return "dense" if "bias" in names else "dense_nobias"
  raise ValueError(f"no layer kind has the parameters {sorted(names)}")


# Child modules that tell what a block is (first match wins).
_BLOCK_MARKERS = (("resnet", "conv1"), ("resnet", "in_conv"), ("transformer", "proj_in"),
                  ("attnblock", "qkv"), ("attn", "q"), ("sampler", "conv"))


def block_type(mods: Mapping[tuple, dict], block: tuple[str, ...]) -> str:
  """A layer kind when `block` is one layer, else resnet / transformer / attnblock (the UNet's
  AttentionBlock) / attn (the autoencoder's AttnBlock) / sampler, by its child modules."""
  if block in mods:
    return layer_kind(mods[block])
  children = {p[len(block)] for p in mods if len(p) > len(block) and p[:len(block)] == block}
  return next((kind for kind, child in _BLOCK_MARKERS if child in children), "module")


def _rename(rules: Sequence[Rule], text: str, layout: str, facts: dict):
  """(name, rule) of the first rule matching `text`, or (None, None)."""
  for rule in rules:
    m = re.fullmatch(rule.pattern, text)
    if m and (rule.when is None or rule.when(facts)):
      template = rule.name(layout)
      if template is None:
        raise LookupError(f"has no {layout} equivalent")
      return template.format(**facts, **m.groupdict()), rule
  return None, None


def derive(params, layout: str, *, blocks: Sequence[Rule],
           inner: Mapping[str, Sequence[Rule]], block_depth: Callable[[tuple], int],
           facts: Callable[[str], dict] = lambda name: {},
           heads: Callable[[dict], int] | None = None) -> list[Entry]:
  """The map of a params tree. Each module path splits into a block (its first
  `block_depth(path)` names) and the rest; `blocks` name the block from 'type:block/path' (type
  as block_type gives it), the rules `inner[type]` name the rest. `facts(block path)` gives the
  derived fields the templates use; `heads(facts)` the heads of new-order qkv projections."""
  _check_layout(layout)
  mods = modules(params)
  entries = []
  for path, leaves in mods.items():
    block, rest = path[:block_depth(path)], path[block_depth(path):]
    kind = block_type(mods, block)
    where = "/".join(block)
    fields = facts(where)
    try:
      base, _ = _rename(blocks, f"{kind}:{where}", layout, fields)
      sub, rule = _rename(inner.get(kind, (same("", ""),)), "/".join(rest), layout, fields)
    except LookupError as e:
      raise ValueError(f"ldm_jax's {'/'.join(path)} (a {kind} block) {e}") from None
    if base is None or sub is None:
      raise ValueError(f"no {layout} name rule for ldm_jax's {'/'.join(path)} (a {kind} block)")
    layer = (rule.kinds or {}).get(layout) or layer_kind(leaves)
    if {leaf for leaf, _ in LEAVES[layer]} != set(leaves):
      raise ValueError(f"{'/'.join(path)}: parameters {sorted(leaves)} do not fit a '{layer}'")
    n = heads(fields) if heads and rule.heads else 0
    torch = f"{base}.{sub}" if base and sub else base or sub
    entries.append(Entry(path, torch.replace("/", "."), layer, n))
  return entries


# ---------------------------------------------------------------------------------------------
# Autoencoder (AutoencoderKL / VQModel): blocks are encoder/<name>, decoder/<name> or <name>
# ---------------------------------------------------------------------------------------------
_AE_MID_ATTENTION = Rule(r"attn:(?P<p>encoder|decoder)/mid_attn_1", "{p}.mid.attn_1",
                         "{p}.mid_block.attentions.0")
_AE_BLOCKS = (
    Rule(r"resnet:(?P<p>encoder|decoder)/mid_block_(?P<k>[12])", "{p}.mid.block_{k}",
         "{p}.mid_block.resnets.{k0}"),
    _AE_MID_ATTENTION,
    Rule(r"resnet:encoder/down_(?P<i>\d+)_block_(?P<j>\d+)", "encoder.down.{i}.block.{j}",
         "encoder.down_blocks.{i}.resnets.{j}"),
    Rule(r"attn:encoder/down_(?P<i>\d+)_attn_(?P<j>\d+)", "encoder.down.{i}.attn.{j}",
         "encoder.down_blocks.{i}.attentions.{j}"),
    Rule(r"sampler:encoder/down_(?P<i>\d+)_downsample", "encoder.down.{i}.downsample",
         "encoder.down_blocks.{i}.downsamplers.0"),
    # diffusers numbers the decoder's levels from the bottom: up_blocks.{r}, r = levels - 1 - i.
    Rule(r"resnet:decoder/up_(?P<i>\d+)_block_(?P<j>\d+)", "decoder.up.{i}.block.{j}",
         "decoder.up_blocks.{r}.resnets.{j}"),
    Rule(r"attn:decoder/up_(?P<i>\d+)_attn_(?P<j>\d+)", "decoder.up.{i}.attn.{j}",
         "decoder.up_blocks.{r}.attentions.{j}"),
    Rule(r"sampler:decoder/up_(?P<i>\d+)_upsample", "decoder.up.{i}.upsample",
         "decoder.up_blocks.{r}.upsamplers.0"),
    Rule(r"norm:(?P<p>encoder|decoder)/norm_out", "{p}.norm_out", "{p}.conv_norm_out"),
    same(r"conv:(?P<x>(encoder|decoder)/conv_(in|out)|quant_conv|post_quant_conv)", "{x}"),
    same(r"embed:quantize", "quantize.embedding"),
)
_AE_INNER = {
    "resnet": (Rule("nin_shortcut", "nin_shortcut", "conv_shortcut"),
               same(r"(?P<x>norm[12]|conv[12])", "{x}")),
    "attn": (Rule("norm", "norm", "group_norm"),     # 1x1 convs in CompVis, Linear in diffusers
             Rule(r"(?P<x>[qkv])", "{x}", "to_{x}", {DIFFUSERS: "conv_linear"}),
             Rule("proj_out", "proj_out", "to_out.0", {DIFFUSERS: "conv_linear"})),
    "sampler": (same("conv", "conv"),),
}


def autoencoder_entries(params, layout: str) -> list[Entry]:
  """The map of an ldm_jax AutoencoderKL / VQModel from its params tree."""
  levels = len({path[1].split("_")[1] for path in modules(params)
                if path[0] == "decoder" and re.fullmatch(r"up_\d+_block_\d+", path[1])})

  def facts(block: str) -> dict:
    """r: diffusers' index of a decoder level; k0: the 0-based index of a mid ResNet block."""
    out = {}
    if m := re.search(r"/(up|down)_(\d+)_", block):
      out["r"] = levels - 1 - int(m.group(2))
    if m := re.search(r"/mid_block_(\d)", block):
      out["k0"] = int(m.group(1)) - 1
    return out

  return derive(params, layout, blocks=_AE_BLOCKS, inner=_AE_INNER, facts=facts,
                block_depth=lambda path: 2 if path[0] in ("encoder", "decoder") else 1)


def autoencoder_mid_attention(layout: str) -> tuple[str, str]:
  """The torch module names of the encoder's and the decoder's mid-block attention (which
  autoencoders with mid_attention=False lack)."""
  _check_layout(layout)
  return tuple(_AE_MID_ATTENTION.name(layout).format(p=p) for p in ("encoder", "decoder"))


# ---------------------------------------------------------------------------------------------
# UNet: blocks are the top-level modules (input_blocks_{n}_{m}, middle_block_{m}, ...)
# ---------------------------------------------------------------------------------------------
_UNET_BLOCKS = (
    Rule(r"dense:time_embed_(?P<k>[02])", "time_embed.{k}", "time_embedding.linear_{k1}"),
    Rule("embed:label_emb", "label_emb", "class_embedding"),
    Rule("conv:input_blocks_0_0", "input_blocks.0.0", "conv_in"),
    Rule("norm:out_norm", "out.0", "conv_norm_out"),
    Rule("conv:out_conv", "out.2", "conv_out"),
    Rule(r"conv:input_blocks_(?P<n>\d+)_0", "input_blocks.{n}.0.op",
         "down_blocks.{level}.downsamplers.0.conv"),
    Rule(r"resnet:input_blocks_(?P<n>\d+)_0", "input_blocks.{n}.0", None,   # resblock_updown
         when=lambda f: f["sampler"]),
    Rule(r"resnet:input_blocks_(?P<n>\d+)_0", "input_blocks.{n}.0",
         "down_blocks.{level}.resnets.{j}"),
    Rule(r"(transformer|attnblock):input_blocks_(?P<n>\d+)_1", "input_blocks.{n}.1",
         "down_blocks.{level}.attentions.{j}"),
    Rule(r"resnet:middle_block_(?P<m>[02])", "middle_block.{m}", "mid_block.resnets.{m2}"),
    Rule(r"(transformer|attnblock):middle_block_1", "middle_block.1", "mid_block.attentions.0"),
    Rule(r"resnet:output_blocks_(?P<n>\d+)_0", "output_blocks.{n}.0",
         "up_blocks.{up}.resnets.{j}"),
    Rule(r"(transformer|attnblock):output_blocks_(?P<n>\d+)_1", "output_blocks.{n}.1",
         "up_blocks.{up}.attentions.{j}"),
    # After a level's last ResBlock (and attention): the upsampler, a conv or a ResBlock.
    Rule(r"conv:output_blocks_(?P<n>\d+)_(?P<m>[12])", "output_blocks.{n}.{m}.conv",
         "up_blocks.{up}.upsamplers.0.conv"),
    Rule(r"resnet:output_blocks_(?P<n>\d+)_(?P<m>[12])", "output_blocks.{n}.{m}", None),
)
_UNET_INNER = {
    "resnet": tuple(Rule(f, c, d) for f, c, d in (
        ("in_norm", "in_layers.0", "norm1"), ("in_conv", "in_layers.2", "conv1"),
        ("emb_proj", "emb_layers.1", "time_emb_proj"), ("out_norm", "out_layers.0", "norm2"),
        ("out_conv", "out_layers.3", "conv2"), ("skip", "skip_connection", "conv_shortcut"))),
    "transformer": (          # the same names in both layouts
        same(r"(?P<x>norm|proj_in|proj_out)", "{x}"),
        same(r"transformer_blocks_(?P<d>\d+)/(?P<x>norm[123]|attn[12]/to_[qkv])",
             "transformer_blocks.{d}.{x}"),
        same(r"transformer_blocks_(?P<d>\d+)/(?P<a>attn[12])/to_out",
             "transformer_blocks.{d}.{a}.to_out.0"),
        same(r"transformer_blocks_(?P<d>\d+)/ff/proj_in", "transformer_blocks.{d}.ff.net.0.proj"),
        same(r"transformer_blocks_(?P<d>\d+)/ff/proj_out", "transformer_blocks.{d}.ff.net.2")),
    "attnblock": (            # openaimodel's AttentionBlock: CompVis only, conv1d projections
        Rule("norm", "norm", None),
        Rule("qkv", "qkv", None, {COMPVIS: "dense_conv1d"}, heads=True),
        Rule("proj_out", "proj_out", None, {COMPVIS: "dense_conv1d"})),
}


def unet_entries(params, layout: str, *, levels: int, num_res_blocks: int,
                 new_attention_heads: Callable[[int], int] | None = None) -> list[Entry]:
  """The map of an ldm_jax UNet from its params tree and two facts of its config: the number of
  levels (len(channel_mult)) and of ResBlocks per level on the way down.

  `new_attention_heads(level) -> heads` is given for CompVis models with
  use_new_attention_order, whose AttentionBlock qkv rows are reordered on the way in.
  """
  per = num_res_blocks + 1          # input blocks per level (ResBlocks + a downsampler);
                                    # output blocks per level (ResBlocks)

  def facts(block: str) -> dict:
    """level (0 = the input resolution), j (index in the level) and diffusers' up_blocks
    index `up` of a block; `sampler` for the downsampler slot of the way down."""
    m = re.fullmatch(r"(input|output|middle)_blocks?_(\d+)(_\d+)?", block)
    if not m:
      k = re.fullmatch(r"time_embed_(\d)", block)
      return {"k1": int(k.group(1)) // 2 + 1} if k else {}
    side, n = m.group(1), int(m.group(2))
    if side == "middle":
      return {"level": levels - 1, "m2": n // 2}
    if side == "input":
      level, j = divmod(n - 1, per)
      return {"level": level, "j": j, "sampler": j == num_res_blocks}
    up, j = divmod(n, per)
    return {"level": levels - 1 - up, "up": up, "j": j}

  heads = (lambda f: new_attention_heads(f["level"])) if new_attention_heads else None
  return derive(params, layout, blocks=_UNET_BLOCKS, inner=_UNET_INNER, facts=facts,
                block_depth=lambda path: 1, heads=heads)


# ---------------------------------------------------------------------------------------------
# Conditioning
# ---------------------------------------------------------------------------------------------
def class_embedder_entries(params) -> list[Entry]:
  """ClassEmbedder's table (CompVis cond_stage_model.embedding)."""
  return derive(params, COMPVIS, blocks=(same("embed:embedding", "embedding"),), inner={},
                block_depth=lambda path: 1)


def rescaler_entries(params) -> list[Entry]:
  """SpatialRescaler's bias-free 1x1 conv (CompVis cond_stage_model.channel_mapper)."""
  return derive(params, COMPVIS, blocks=(same("conv_nobias:channel_mapper", "channel_mapper"),),
                inner={}, block_depth=lambda path: 1)


def prefixed(entries: list[Entry], prefix: str) -> list[Entry]:
  """The same map under a torch name prefix ('model.diffusion_model.', 'first_stage_model.')."""
  return [dataclasses.replace(e, torch=prefix + e.torch) for e in entries]

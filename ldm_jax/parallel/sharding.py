"""Parameter partitioning as data: (regex, axes) rules mapped over a pytree's paths.

A rule's axes name mesh axes for the LAST dimensions of a matching array, so one rule serves
conv kernels (kh, kw, in, out) and dense kernels (in, out) alike. The rules apply to the whole
train state, so Adam's moments and the EMA copy of a kernel shard exactly like the kernel
(their paths end the same way). A dimension that the mesh axis does not divide, and any array
smaller than `min_size` elements, stays replicated.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DEFAULT_RULES: tuple[tuple[str, tuple], ...] = (
    # Kernels of convs and dense layers: output channels over fsdp.
    (r"(^|/)kernel$", ("fsdp",)),
    # Embedding tables (class embedder, token embeddings, VQ codebook): rows over fsdp.
    (r"(^|/)(embedding|codebook)$", ("fsdp", None)),
)


def path_str(path) -> str:
  """'params/decoder/conv_out/kernel' for a jax key path."""
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      parts.append(key.name)
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    elif isinstance(key, jax.tree_util.FlattenedIndexKey):
      parts.append(str(key.key))
    else:
      parts.append(str(key))
  return "/".join(parts)


def spec_for(path: str, shape: Sequence[int], mesh: Mesh,
             rules: Sequence[tuple[str, Sequence[Any]]] = DEFAULT_RULES,
             min_size: int = 0) -> P:
  """The PartitionSpec of one array: the first matching rule, checked against the mesh."""
  if int(np.prod(shape, dtype=np.int64)) < max(min_size, 1) or not shape:
    return P()
  for pattern, axes in rules:
    if re.search(pattern, path):
      axes = tuple(axes)[-len(shape):]
      spec = [None] * (len(shape) - len(axes)) + list(axes)
      for i, axis in enumerate(spec):
        if axis is not None and (axis not in mesh.shape or shape[i] % mesh.shape[axis]):
          spec[i] = None
      return P(*spec)
  return P()


def tree_shardings(tree, mesh: Mesh, rules=None, min_size: int = 0):
  """NamedShardings for every array of `tree` (arrays or ShapeDtypeStructs)."""
  rules = tuple(rules) if rules else DEFAULT_RULES

  def one(path, leaf):
    shape = getattr(leaf, "shape", ())
    return NamedSharding(mesh, spec_for(path_str(path), shape, mesh, rules, min_size))

  return jax.tree_util.tree_map_with_path(one, tree)


def describe(tree, shardings) -> list[str]:
  """Human-readable 'path shape spec' lines of the sharded arrays (for the start-up log)."""
  lines = []
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  flat_s = jax.tree_util.tree_leaves(shardings)
  for (path, leaf), sharding in zip(flat, flat_s):
    if any(a is not None for a in sharding.spec):
      lines.append(f"{path_str(path)} {tuple(leaf.shape)} {sharding.spec}")
  return lines

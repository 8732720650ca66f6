"""Tensors between PyTorch state dicts and Flax parameter trees, by the maps of names.py, and the
files that hold them (.safetensors, and pickled .ckpt through safe_pickle's allow-list; neither
needs torch, and reading never runs code from the file).

Conversions are strict: every tensor the architecture needs must be present with its shape, and
every tensor of the file must be used (or explicitly ignored by the caller); otherwise one
ConversionError lists the missing and unexpected names and the shape mismatches.
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np

from ldm_jax.errors import ConversionError, UnsupportedError  # noqa: F401  (re-exported)
from ldm_jax.interop import safe_pickle
from ldm_jax.interop.names import Entry




# ---------------------------------------------------------------------------------------------
# Tensor layouts
# ---------------------------------------------------------------------------------------------
def _new_to_legacy_qkv(w, heads: int):
  """Rows [q(all heads) | k | v] -> per head [q_h | k_h | v_h] (CompVis QKVAttention order to
  QKVAttentionLegacy's, which ldm_jax uses)."""
  if w.shape[0] % (3 * heads):
    return w                  # a wrong shape, reported as a shape mismatch
  d = w.shape[0] // (3 * heads)
  return w.reshape((3, heads, d) + w.shape[1:]).swapaxes(0, 1).reshape(w.shape)


def to_flax(entry: Entry, leaf: str, w: np.ndarray) -> np.ndarray:
  """A torch tensor of `entry` -> the Flax layout of its `leaf`."""
  if leaf in ("bias", "scale", "embedding", ""):
    if entry.heads and leaf == "bias":
      return _new_to_legacy_qkv(w, entry.heads)
    return w
  kind = entry.kind
  if kind in ("conv", "conv_nobias"):
    return w.transpose(2, 3, 1, 0) if w.ndim == 4 else w
  if kind in ("dense", "dense_nobias"):
    return w.T if w.ndim == 2 else w
  if kind == "conv_linear":
    return w.T[None, None] if w.ndim == 2 else w
  if kind == "dense_conv1d":
    if w.ndim == 3 and w.shape[2] == 1:
      w = w[:, :, 0]
    elif w.ndim == 4 and w.shape[2:] == (1, 1):
      w = w[:, :, 0, 0]
    if entry.heads:
      w = _new_to_legacy_qkv(w, entry.heads)
    return w.T if w.ndim == 2 else w
  raise ValueError(f"unknown layer kind '{kind}'")


def to_torch(entry: Entry, leaf: str, a: np.ndarray) -> np.ndarray:
  """A Flax array of `entry`'s `leaf` -> the torch layout (the exporter writes diffusers)."""
  if leaf in ("bias", "scale", "embedding", ""):
    return a
  kind = entry.kind
  if kind in ("conv", "conv_nobias"):
    return a.transpose(3, 2, 0, 1)
  if kind in ("dense", "dense_nobias"):
    return a.T
  if kind == "conv_linear":
    return a[0, 0].T
  if kind == "dense_conv1d":
    return a.T[:, :, None]
  raise ValueError(f"unknown layer kind '{kind}'")


def torch_shape(entry: Entry, leaf: str, flax_shape: tuple) -> tuple:
  """The torch shape that converts to `flax_shape` (for shape-mismatch messages)."""
  return tuple(to_torch(entry, leaf, np.broadcast_to(np.float32(0), flax_shape)).shape)


# ---------------------------------------------------------------------------------------------
# Applying a map
# ---------------------------------------------------------------------------------------------
def _listing(names, limit: int = 5) -> str:
  names = sorted(names)
  more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def flatten(tree, prefix=()) -> dict[tuple, object]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def unflatten(flat: dict[tuple, object]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return out


def state_to_params(state: dict[str, np.ndarray], entries: list[Entry], expected: dict,
                    where: str, ignore=()) -> dict:
  """Flax params (nested dict of float32 numpy arrays) from a torch-named state dict.

  `expected` is the architecture's params tree (arrays or ShapeDtypeStructs). Keys of `state`
  starting with a prefix in `ignore` are allowed to go unused.
  """
  want = {path: tuple(v.shape) for path, v in flatten(expected).items()}
  params, used = {}, set()
  missing, shapes = [], []
  for entry in entries:
    for path, key in entry.leaves():
      if path not in want:
        raise ConversionError(f"{where}: internal name map error, ldm_jax has no parameter "
                              f"{'/'.join(path)} (for {key})")
      if key not in state:
        missing.append(key)
        continue
      used.add(key)
      w = np.asarray(state[key])
      leaf = path[-1] if path != entry.flax else ""
      a = to_flax(entry, leaf, w)
      if tuple(a.shape) != want[path]:
        shapes.append(f"{key} is {tuple(w.shape)}, the architecture needs "
                      f"{torch_shape(entry, leaf, want[path])}")
        continue
      params[path] = np.ascontiguousarray(a, dtype=np.float32)
  uncovered = set(want) - {p for e in entries for p, _ in e.leaves()}
  if uncovered:
    raise ConversionError(f"{where}: internal name map error, no torch name for "
                          f"{_listing('/'.join(p) for p in uncovered)}")
  unexpected = [k for k in state if k not in used and not k.startswith(tuple(ignore))]
  problems = []
  if missing:
    problems.append(f"missing {len(missing)} weight(s): {_listing(missing)}")
  if unexpected:
    problems.append(f"unexpected {len(unexpected)} weight(s) (not in this architecture): "
                    f"{_listing(unexpected)}")
  if shapes:
    problems.append(f"shape mismatch: {'; '.join(shapes[:3])}"
                    + (f" (+{len(shapes) - 3} more)" if len(shapes) > 3 else ""))
  if problems:
    raise ConversionError(f"{where} does not match its config: " + " | ".join(problems))
  return unflatten(params)


def params_to_state(params: dict, entries: list[Entry], dtype=np.float32) -> dict:
  """A torch-named state dict (numpy arrays of `dtype`) from Flax params."""
  flat = flatten(params)
  state = {}
  for entry in entries:
    for path, key in entry.leaves():
      leaf = path[-1] if path != entry.flax else ""
      a = np.asarray(flat[path])
      state[key] = np.ascontiguousarray(to_torch(entry, leaf, a)).astype(dtype)
  return state


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a .safetensors file as numpy arrays (no torch). bfloat16 tensors, which
  numpy cannot name, come back as float32. A damaged file raises one ConversionError line."""
  try:
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return load_file(path)
  except FileNotFoundError as e:
    raise ConversionError(f"no such file: '{path}'") from e
  except Exception as e:  # pylint: disable=broad-except  # safetensors has its own error types
    error = e
  # bfloat16 inside (numpy has no name for it), or a damaged file: the raw reader reads the
  # first and says precisely what is wrong with the second.
  state = _read_safetensors_raw(path)
  if isinstance(error, TypeError):
    return state
  raise ConversionError(f"'{path}' is not a readable .safetensors file "
                        f"({type(error).__name__}: {' '.join(str(error).split())[:200]})")


_RAW_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
               "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
               "BF16": np.uint16}


def _read_safetensors_raw(path: str) -> dict[str, np.ndarray]:
  """The safetensors format read directly: a u64 header length, a JSON header (name -> dtype,
  shape, data_offsets), the data. Every inconsistency is a ConversionError naming the file."""
  def bad(what):
    return ConversionError(f"'{path}' is not a readable .safetensors file ({what})")
  with open(path, "rb") as f:
    blob = f.read()
  if len(blob) < 8:
    raise bad(f"{len(blob)} bytes, shorter than the 8-byte header length")
  (n,) = struct.unpack("<Q", blob[:8])
  if n > len(blob) - 8:
    raise bad(f"the header says {n} bytes, the file holds {len(blob) - 8} after the length: "
              f"truncated, or not a .safetensors file")
  try:
    header = json.loads(blob[8:8 + n])
  except ValueError as e:
    raise bad(f"its JSON header does not parse: {e}") from None
  if not isinstance(header, dict):
    raise bad("its header is not a JSON object")
  data = memoryview(blob)[8 + n:]
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      start, stop = (int(x) for x in info["data_offsets"])
      dtype, shape = info["dtype"], tuple(int(d) for d in info["shape"])
    except (KeyError, TypeError, ValueError):
      raise bad(f"the header entry of {name} lacks dtype, shape or data_offsets") from None
    if dtype not in _RAW_DTYPES:
      raise bad(f"tensor {name} has unsupported dtype {dtype}")
    need = int(np.prod(shape, dtype=np.int64)) * np.dtype(_RAW_DTYPES[dtype]).itemsize
    if not 0 <= start <= stop <= len(data) or stop - start != need or min(shape, default=0) < 0:
      raise bad(f"tensor {name} of shape {list(shape)} {dtype} has bytes [{start}, {stop}) of "
                f"{len(data)}: truncated, or a damaged header")
    arr = np.frombuffer(data[start:stop], _RAW_DTYPES[dtype])
    if dtype == "BF16":
      arr = (arr.astype(np.uint32) << 16).view(np.float32)
    out[name] = arr.reshape(shape).copy()
  return out


def write_safetensors(path: str, tensors: dict[str, np.ndarray]):
  """Writes numpy arrays with safetensors.numpy (metadata format 'pt', as PyTorch tools
  expect)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path,
            metadata={"format": "pt"})


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Tensors of a .safetensors file or of a pickled .ckpt / .pt / .pth / .bin file (a torch
  zip checkpoint: a Lightning checkpoint's 'state_dict', or a pickled dict of tensors). Pickles
  are read by safe_pickle's allow-list, never by pickle.load or torch.load, so no code from the
  file runs; bfloat16 becomes float32.
  """
  if not os.path.isfile(path):
    raise ConversionError(f"no such file: '{path}'")
  if path.endswith(".safetensors"):
    return read_safetensors(path)
  return safe_pickle.load_state_dict(path)

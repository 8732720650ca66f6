"""The UNet and its attention blocks: shapes per conditioning mode, zero-initialised blocks are
identities, attention sits at downsample factors, cross-attention responds to its context and
masked context tokens do not leak, and the reference model's parameter count."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models.attention import AttentionBlock, CrossAttention, SpatialTransformer
from ldm_jax.models.unet import ResBlock, UNet
from ldm_jax.compilation import run_once_options

KEY = jax.random.PRNGKey(0)


def _random_params(init, *args, seed=1, **kwargs):
  """Variables shaped like init(KEY, *args)'s, drawn at random: kernels N(0, 1/fan_in), norm
  scales 1 + N(0, 0.05), the rest N(0, 0.05). Non-zero everywhere (zero-initialised layers would
  hide the conditioning), and no init program to compile."""
  shapes = jax.eval_shape(init, KEY, *args, **kwargs)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['kernel']"):
      std, mean = 1.0 / np.sqrt(np.prod(leaf.shape[:-1])), 0.0
    else:
      std, mean = 0.05, 1.0 if name.endswith("['scale']") else 0.0
    return jnp.asarray(mean + std * rng.standard_normal(leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _tiny(**kw):
  args = dict(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2),
              num_res_blocks=1, attention_resolutions=(2,), num_head_channels=16)
  args.update(kw)
  return UNet(**args)


@pytest.mark.parametrize("mode", ["uncond", "class_context", "adm", "concat", "hybrid"])
def test_output_shapes_per_conditioning_mode(mode):
  x = jnp.zeros((2, 8, 8, 3))
  t = jnp.array([3, 900])
  kw, call = {}, {}
  if mode in ("class_context", "hybrid"):
    kw["use_spatial_transformer"] = True
    call["context"] = jnp.zeros((2, 1, 32))
  if mode == "adm":
    kw["num_classes"] = 10
    call["y"] = jnp.array([1, 2])
  if mode in ("concat", "hybrid"):
    kw["in_channels"] = 3 + 4
    x = jnp.zeros((2, 8, 8, 7))
  model = _tiny(**kw)
  out = jax.eval_shape(lambda: model.apply(model.init(KEY, x, t, **call), x, t, **call))
  assert out.shape == (2, 8, 8, 3) and out.dtype == jnp.float32


def test_zero_initialised_blocks_are_identities():
  x = jax.random.normal(KEY, (2, 8, 8, 32))
  emb = jax.random.normal(KEY, (2, 128))
  for block, args in ((ResBlock(32), (x, emb)), (ResBlock(32, use_scale_shift_norm=True),
                                                  (x, emb)),
                      (AttentionBlock(2), (x,)),
                      (SpatialTransformer(2, 16), (x, jnp.ones((2, 5, 24))))):
    variables = jax.jit(block.init, compiler_options=run_once_options())(KEY, *args)
    np.testing.assert_array_equal(jax.jit(block.apply)(variables, *args), x)
  # The UNet's output convolution starts at zero, so the whole model starts at 0. Only that
  # layer's initialisation is computed (the rest of init is dead code to XLA).
  model = _tiny(use_spatial_transformer=True)
  args = (jax.random.normal(KEY, (2, 8, 8, 3)), jnp.array([1, 2]), jnp.ones((2, 1, 32)))
  out_conv = jax.jit(lambda: model.init(KEY, *args)["params"]["out_conv"],
                     compiler_options=run_once_options())()
  assert set(out_conv) == {"kernel", "bias"}
  for leaf in out_conv.values():
    np.testing.assert_array_equal(leaf, 0.0)


def test_attention_at_downsample_factors():
  model = UNet(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2, 2),
               num_res_blocks=1, attention_resolutions=(2,), num_head_channels=16)
  params = jax.eval_shape(model.init, KEY, jnp.zeros((1, 16, 16, 4)), jnp.zeros((1,)))["params"]
  # Level 0 (factor 1) has no attention, level 1 (factor 2) has, level 2 (factor 4) has not.
  assert "input_blocks_1_1" not in params and "input_blocks_3_1" in params
  assert "input_blocks_5_1" not in params and "middle_block_1" in params
  attn_out = sorted(k for k in params if k.startswith("output_blocks") and k.endswith("_1")
                    and "qkv" in params[k])
  assert attn_out == ["output_blocks_2_1", "output_blocks_3_1"]
  # Skip concatenation: the first decoder block sees 2 x 64 channels.
  assert params["output_blocks_0_0"]["in_conv"]["kernel"].shape == (3, 3, 128, 64)


def test_reference_imagenet_unet_has_395m_parameters():
  """cin-ldm-vq-f8's UNet; with its 512,000-parameter class embedder the reference's 395M."""
  model = UNet(in_channels=4, out_channels=4, model_channels=256, channel_mult=(1, 2, 4),
               num_res_blocks=2, attention_resolutions=(4, 2, 1), num_head_channels=32,
               use_spatial_transformer=True)
  params = jax.eval_shape(model.init, KEY, jnp.zeros((1, 32, 32, 4)), jnp.zeros((1,)),
                          jnp.zeros((1, 1, 512)))
  assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == 394_984_196


def test_cross_attention_responds_to_context_and_masked_tokens_do_not_leak():
  model = _tiny(use_spatial_transformer=True)
  z = jax.random.normal(KEY, (1, 8, 8, 3))
  t = jnp.array([500])
  ctx = jax.random.normal(jax.random.PRNGKey(2), (1, 4, 32))
  params = _random_params(model.init, z, t, ctx)
  apply = jax.jit(lambda c, m: model.apply(params, z, t, c, context_mask=m))
  everything = jnp.ones((1, 4), bool)
  base = apply(ctx, everything)
  other = apply(ctx.at[:, 0].add(1.0), everything)
  assert float(jnp.max(jnp.abs(base - other))) > 1e-3
  mask = jnp.array([[True, True, False, False]])
  masked = apply(ctx, mask)
  changed = ctx.at[:, 2:].set(jax.random.normal(jax.random.PRNGKey(3), (1, 2, 32)) * 10)
  np.testing.assert_allclose(apply(changed, mask), masked, rtol=1e-5, atol=1e-6)
  assert float(jnp.max(jnp.abs(masked - base))) > 1e-4  # masking does change the result


def test_cross_attention_against_numpy():
  attn = CrossAttention(heads=2, head_dim=4)
  x = np.random.default_rng(0).normal(size=(1, 3, 6)).astype(np.float32)
  ctx = np.random.default_rng(1).normal(size=(1, 5, 7)).astype(np.float32)
  variables = attn.init(KEY, x, ctx)
  p = jax.tree_util.tree_map(np.asarray, variables["params"])
  q = (x @ p["to_q"]["kernel"]).reshape(1, 3, 2, 4)
  k = (ctx @ p["to_k"]["kernel"]).reshape(1, 5, 2, 4)
  v = (ctx @ p["to_v"]["kernel"]).reshape(1, 5, 2, 4)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / 2.0
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  out = np.einsum("bhqk,bkhd->bqhd", w, v).reshape(1, 3, 8)
  want = out @ p["to_out"]["kernel"] + p["to_out"]["bias"]
  np.testing.assert_allclose(attn.apply(variables, x, ctx), want, rtol=1e-4, atol=1e-5)
  assert "bias" not in p["to_q"] and "bias" not in p["to_k"] and "bias" not in p["to_v"]


def test_attention_block_uses_the_legacy_qkv_order():
  """Per head, the qkv projection holds [q | k | v] (openaimodel's QKVAttentionLegacy)."""
  block = AttentionBlock(num_heads=2)
  x = np.random.default_rng(0).normal(size=(1, 2, 2, 32)).astype(np.float32)
  variables = _random_params(block.init, x)
  p = jax.tree_util.tree_map(np.asarray, variables["params"])
  y = x.reshape(1, 4, 32)
  mu = y.mean(1, keepdims=True)
  var = y.var(1, keepdims=True)
  normed = (y - mu) / np.sqrt(var + 1e-5) * p["norm"]["scale"] + p["norm"]["bias"]
  qkv = (normed @ p["qkv"]["kernel"] + p["qkv"]["bias"]).reshape(1, 4, 2, 3, 16)
  q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / 4.0
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  h = np.einsum("bhqk,bkhd->bqhd", w, v).reshape(1, 4, 32)
  want = y + h @ p["proj_out"]["kernel"] + p["proj_out"]["bias"]
  np.testing.assert_allclose(block.apply(variables, x).reshape(1, 4, 32), want, rtol=1e-4,
                             atol=1e-4)


@pytest.mark.slow  # compile-bound on CPU; run with -m slow
def test_adm_labels_change_the_output_and_are_required():
  model = _tiny(num_classes=4)
  z = jax.random.normal(KEY, (2, 8, 8, 3))
  t = jnp.array([10, 10])
  params = _random_params(model.init, z, t, y=jnp.array([0, 0]))
  apply = jax.jit(lambda y: model.apply(params, z, t, y=y))
  out = apply(jnp.array([0, 3]))
  same = apply(jnp.array([0, 0]))
  np.testing.assert_allclose(out[0], same[0], rtol=1e-6)
  assert float(jnp.max(jnp.abs(out[1] - same[1]))) > 1e-3
  with pytest.raises(ValueError, match="needs class labels"):
    model.apply(params, z, t)


def test_spatial_transformer_coords_tell_positions_apart():
  """coords=True: a constant map leaves the block position-dependent (its tokens carry where
  they are); without it every pixel of a constant map gets the same output."""
  x = jnp.ones((1, 6, 6, 32))
  context = jax.random.normal(KEY, (1, 4, 24))
  for coords in (False, True):
    block = SpatialTransformer(2, 16, coords=coords)
    variables = block.init(KEY, x, context)
    params = jax.tree_util.tree_map_with_path(   # proj_out starts at zero: make it act
        lambda p, v: jax.random.normal(KEY, v.shape) if "proj_out" in str(p) else v,
        variables["params"])
    out = block.apply({"params": params}, x, context)
    spread = float(jnp.max(jnp.std(out.reshape(36, 32), axis=0)))
    assert (spread > 1e-3) == coords, (coords, spread)

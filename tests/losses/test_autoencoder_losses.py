"""Stage-1 losses against closed forms, and the train step's gradient assembly (three partial
backward passes) against plain jax.grad of the reference's loss formula."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.losses import autoencoder as losses
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.training.stage1 import AutoencoderStage
from ldm_jax.compilation import run_once_options
from tests.conftest import load_config


def test_gan_losses_against_numpy():
  rng = np.random.default_rng(0)
  real, fake = rng.normal(size=(4, 3, 3, 1)), rng.normal(size=(4, 3, 3, 1))
  hinge = 0.5 * (np.maximum(0, 1 - real).mean() + np.maximum(0, 1 + fake).mean())
  np.testing.assert_allclose(losses.hinge_d_loss(real, fake), hinge, rtol=1e-6)
  softplus = lambda v: np.log1p(np.exp(v))  # noqa: E731
  vanilla = 0.5 * (softplus(-real).mean() + softplus(fake).mean())
  np.testing.assert_allclose(losses.vanilla_d_loss(real, fake), vanilla, rtol=1e-6)
  np.testing.assert_allclose(losses.generator_adversarial_loss(fake), -fake.mean(), rtol=1e-6)
  assert float(losses.gan_factor(9, 10, 0.7)) == 0.0
  assert float(losses.gan_factor(10, 10, 0.7)) == pytest.approx(0.7)


def test_reconstruction_nll_reductions():
  rng = np.random.default_rng(1)
  rec = np.abs(rng.normal(size=(2, 4, 4, 3))).astype(np.float32)
  perceptual = np.array([0.2, 0.5], np.float32)
  logvar = 0.3
  per_pixel = (rec + 0.8 * perceptual[:, None, None, None]) / np.exp(logvar) + logvar
  np.testing.assert_allclose(
      losses.reconstruction_nll(rec, perceptual, 0.8, logvar, "sum"), per_pixel.sum() / 2,
      rtol=1e-5)
  np.testing.assert_allclose(
      losses.reconstruction_nll(rec, perceptual, 0.8, logvar, "mean"), per_pixel.mean(),
      rtol=1e-5)


def test_adaptive_weight_formula():
  a, b = jnp.array([[3.0, 4.0]]), jnp.array([[0.6, 0.8]])
  np.testing.assert_allclose(losses.adaptive_weight(a, b, 0.5), 0.5 * 5 / (1 + 1e-4), rtol=1e-6)
  assert float(losses.adaptive_weight(a, jnp.zeros((1, 2)), 1.0)) == pytest.approx(1e4)


def test_train_step_gradients_equal_jax_grad_of_the_reference_loss():
  """The three-pass gradient assembly of the stage-1 step against plain jax.grad.

  LPIPS is left out: VGG16's backward pass compiled twice costs two minutes on a CPU, and LPIPS
  enters the loss through the same NLL term (reconstruction_nll is checked above and the LPIPS
  module against its peer in tests/models/test_lpips.py).
  """
  lpips_weight = 0.0
  c = load_config("tiny_ae")
  c.data.image_size, c.data.resize_mode = 16, "stretch"
  c.data.channels = 3
  # The assembly, not the architecture, is under test: one level (f = 1) and a one-layer
  # discriminator keep the three backward passes cheap to compile.
  c.model.ch_mult = (1,)
  c.disc.num_layers = 1
  c.loss.lpips_weight = lpips_weight
  c.loss.kl_weight = 1e-2
  c.loss.disc_start = 0
  c.loss.disc_weight = 0.5
  c.loss.disc_factor = 0.8
  c.mesh.fsdp = 1
  mesh = mesh_lib.create_mesh(c.mesh, jax.devices()[:1])
  stage = AutoencoderStage(c, mesh)
  x = jax.random.uniform(jax.random.PRNGKey(3), (4, 16, 16, 3), minval=-1, maxval=1)
  batch = {"image": x}
  state = jax.jit(stage.init, compiler_options=run_once_options())(jax.random.PRNGKey(0), batch)
  rng = jax.random.PRNGKey(5)
  step = jnp.int32(1)
  grads, _, metrics = jax.jit(lambda s, b: stage._grads(s.params, s.model_state, b, rng, step,
                                                        stage.frozen))(state, batch)

  # The reference's loss, written directly: one forward pass and jax.grad per term.
  r_sample, r_drop, _ = jax.random.split(rng, 3)
  ae, disc, p = stage.ae, stage.disc, state.params
  disc_vars = {"params": p["disc"], "batch_stats": state.model_state["disc"]}

  def forward(ae_params):
    v = {"params": ae_params}
    post = ae.apply(v, x, True, method="encode", rngs={"dropout": r_drop})
    x_rec = ae.apply(v, post.sample(r_sample), True, method="decode", rngs={"dropout": r_drop})
    return x_rec, post

  def nll(ae_params):
    x_rec, _ = forward(ae_params)
    rec = jnp.abs(x - x_rec)
    if lpips_weight:
      rec = rec + lpips_weight * stage.lpips.apply({"params": stage.frozen["lpips"]}, x,
                                                   x_rec)[:, None, None, None]
    return jnp.sum(rec / jnp.exp(p["logvar"]) + p["logvar"]) / x.shape[0]

  def kl(ae_params):
    return jnp.mean(forward(ae_params)[1].kl())

  def g(ae_params):
    logits = disc.apply(disc_vars, forward(ae_params)[0], True, mutable=["batch_stats"])[0]
    return -jnp.mean(logits)

  def d_loss(disc_params):
    x_rec = jax.lax.stop_gradient(forward(p["ae"])[0])
    dv = {"params": disc_params, "batch_stats": state.model_state["disc"]}
    real = disc.apply(dv, x, True, mutable=["batch_stats"])[0]
    fake = disc.apply(dv, x_rec, True, mutable=["batch_stats"])[0]
    return 0.8 * losses.hinge_d_loss(real, fake)

  @jax.jit
  def reference(ae_params, disc_params):
    last = lambda tree: tree["decoder"]["conv_out"]["kernel"]  # noqa: E731
    g_nll, g_g = last(jax.grad(nll)(ae_params)), last(jax.grad(g)(ae_params))
    weight = 0.5 * jnp.clip(jnp.linalg.norm(g_nll) / (jnp.linalg.norm(g_g) + 1e-4), 0, 1e4)
    total = lambda q: nll(q) + 1e-2 * kl(q) + jax.lax.stop_gradient(weight) * 0.8 * g(q)  # noqa
    return weight, jax.grad(total)(ae_params), jax.grad(d_loss)(disc_params), nll(ae_params)

  weight, want, want_d, want_nll = reference(p["ae"], p["disc"])
  np.testing.assert_allclose(metrics["d_weight"], weight, rtol=1e-4)
  np.testing.assert_allclose(metrics["nll_loss"], want_nll, rtol=1e-5)
  for got_tree, want_tree in ((grads["ae"], want), (grads["disc"], want_d)):
    leaves = jax.tree_util.tree_leaves(want_tree)
    rms = float(jnp.sqrt(jnp.mean(jnp.concatenate([jnp.ravel(v) ** 2 for v in leaves]))))
    for (path, b), a in zip(jax.tree_util.tree_leaves_with_path(want_tree),
                            jax.tree_util.tree_leaves(got_tree)):
      # Relative to each leaf, plus a floor from the overall gradient scale: some leaves (the
      # attention key bias) have an exactly-zero true gradient and hold only round-off.
      err = float(jnp.linalg.norm(a - b))
      assert err <= 1e-3 * float(jnp.linalg.norm(b)) + 1e-5 * rms * np.sqrt(b.size), (
          jax.tree_util.keystr(path), err, float(jnp.linalg.norm(b)))

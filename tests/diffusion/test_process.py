"""Beta schedules against closed forms; eps / x0 / v conversions round-trip; the loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import process
from ldm_jax.diffusion.schedules import make_beta_schedule, schedule_from_betas


def test_reference_linear_is_squared_sqrt_linspace():
  betas = make_beta_schedule("linear", 1000, 0.0015, 0.0195)
  k = np.arange(1000)
  want = (np.sqrt(0.0015) + k / 999 * (np.sqrt(0.0195) - np.sqrt(0.0015))) ** 2
  np.testing.assert_allclose(betas, want, rtol=1e-12)
  assert betas[0] == pytest.approx(0.0015) and betas[-1] == pytest.approx(0.0195)
  # Not linear in beta: the midpoint is below the arithmetic mean.
  assert betas[499] < (0.0015 + 0.0195) / 2


def test_other_schedules_closed_forms():
  np.testing.assert_allclose(make_beta_schedule("sqrt_linear", 5, 0.1, 0.5),
                             [0.1, 0.2, 0.3, 0.4, 0.5], rtol=1e-12)
  np.testing.assert_allclose(make_beta_schedule("sqrt", 5, 0.1, 0.5),
                             np.sqrt([0.1, 0.2, 0.3, 0.4, 0.5]), rtol=1e-12)
  t, s = 1000, 8e-3
  betas = make_beta_schedule("cosine", t, cosine_s=s)
  f = lambda u: np.cos((u / t + s) / (1 + s) * np.pi / 2) ** 2  # noqa: E731
  alpha_bar = f(np.arange(1, t + 1)) / f(0)
  np.testing.assert_allclose(np.cumprod(1 - betas)[:-1], alpha_bar[:-1], rtol=1e-6)
  assert betas.max() <= 0.999
  with pytest.raises(ValueError, match="unknown schedule 'quadratic'"):
    make_beta_schedule("quadratic", 10)


def test_schedule_cumprod_and_snr():
  betas = make_beta_schedule("linear", 100, 1e-4, 2e-2)
  sched = schedule_from_betas(betas)
  np.testing.assert_allclose(sched.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-6)
  t = jnp.array([0, 50, 99])
  ac = np.cumprod(1 - betas)[[0, 50, 99]]
  np.testing.assert_allclose(sched.snr(t), ac / (1 - ac), rtol=1e-5)


@pytest.mark.parametrize("param", ["eps", "x0", "v"])
def test_parameterisations_round_trip(param):
  sched = schedule_from_betas(make_beta_schedule("linear", 1000, 0.0015, 0.0195))
  rng = np.random.default_rng(0)
  x0 = rng.normal(size=(6, 4, 4, 3)).astype(np.float32)
  eps = rng.normal(size=x0.shape).astype(np.float32)
  t = jnp.array([0, 10, 200, 500, 900, 999])
  x_t = process.q_sample(sched, x0, t, eps)
  a = np.asarray(sched.alphas_cumprod)[np.asarray(t)][:, None, None, None]
  np.testing.assert_allclose(x_t, np.sqrt(a) * x0 + np.sqrt(1 - a) * eps, rtol=1e-5, atol=1e-6)
  target = process.training_target(sched, x0, t, eps, param)
  np.testing.assert_allclose(process.predict_x0(sched, target, x_t, t, param), x0, rtol=1e-3,
                             atol=2e-3)
  np.testing.assert_allclose(process.predict_eps(sched, target, x_t, t, param)[1:], eps[1:],
                             rtol=1e-3, atol=2e-3)
  if param == "v":
    np.testing.assert_allclose(target, np.sqrt(a) * eps - np.sqrt(1 - a) * x0, rtol=1e-5,
                               atol=1e-6)


def test_loss_of_a_perfect_model_is_zero_and_weighting():
  sched = schedule_from_betas(make_beta_schedule("linear", 1000, 0.0015, 0.0195))
  x0 = jax.random.normal(jax.random.PRNGKey(0), (8, 4, 4, 2))
  r_t, r_noise = jax.random.split(jax.random.PRNGKey(1))
  t = jax.random.randint(r_t, (8,), 0, 1000)
  noise = jax.random.normal(r_noise, x0.shape)

  def oracle(x_t, t_in):  # recovers the noise exactly from x_t and the known x0
    return process.predict_eps(sched, x0, x_t, t_in, "x0")

  loss, per_example, t_used = process.diffusion_loss(oracle, sched, x0, jax.random.PRNGKey(1))
  np.testing.assert_array_equal(t_used, t)
  assert float(loss) < 1e-6 and per_example.shape == (8,)
  zero = lambda x_t, t_in: jnp.zeros_like(x_t)  # noqa: E731
  loss, _, _ = process.diffusion_loss(zero, sched, x0, jax.random.PRNGKey(1))
  np.testing.assert_allclose(loss, np.mean(np.asarray(noise) ** 2), rtol=1e-5)
  snr = np.asarray(sched.snr(t))
  w = process.timestep_weights(sched, t, "min_snr", "eps", 5.0)
  np.testing.assert_allclose(w, np.minimum(snr, 5.0) / snr, rtol=1e-5)

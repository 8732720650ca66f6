"""Learning-rate schedules, linear lr scaling, EMA, and the preemption signal handler."""
import os
import signal

import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import config as config_lib
from ldm_jax.training import optim
from ldm_jax.training.loop import _PreemptionFlag
from ldm_jax.training.state import ema_decay_at, ema_update


def _train(**kw):
  t = config_lib.defaults("ldm" if "ldm" in config_lib.STAGES else "autoencoder").train
  t.unlock()
  for k, v in kw.items():
    t[k] = v
  return t


def test_warmup_then_cosine_matches_closed_form():
  t = _train(lr=1e-3, scale_lr=False, schedule="cosine", warmup_steps=10, num_steps=110,
             min_lr_ratio=0.1)
  sched = optim.schedule(t)
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(float(sched(5)), 5e-4, rtol=1e-6)
  for step in (10, 35, 60, 110):
    progress = (step - 10) / 100
    want = 1e-3 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * progress)))
    np.testing.assert_allclose(float(sched(step)), want, rtol=1e-5)


def test_linear_and_constant_and_scaled_lr():
  t = _train(lr=2e-4, scale_lr=False, schedule="linear", num_steps=100, min_lr_ratio=0.0)
  np.testing.assert_allclose(float(optim.schedule(t)(50)), 1e-4, rtol=1e-6)
  # The reference's linear scaling: base rate per example times the global batch.
  t = _train(lr=1e-6, scale_lr=True, batch_size=64, schedule="constant")
  np.testing.assert_allclose(float(optim.schedule(t)(123)), 6.4e-5, rtol=1e-6)


def test_gradient_clipping_happens_before_adam():
  """Adam's first moment after one step is (1 - b1) x the clipped gradient."""
  t = _train(lr=1e-3, scale_lr=False, grad_clip=1.0, b1=0.9)
  tx = optim.optimizer(t)
  params = {"w": jnp.zeros(3)}
  grads = {"w": jnp.array([300.0, 400.0, 0.0])}
  _, state = tx.update(grads, tx.init(params), params)
  mu = state[1][0].mu["w"]
  np.testing.assert_allclose(mu, 0.1 * np.array([0.6, 0.8, 0.0]), rtol=1e-5)


def test_ema_warmup_and_update():
  assert float(ema_decay_at(0, 0.9999, True)) == pytest.approx(0.1)
  assert float(ema_decay_at(90, 0.9999, True)) == pytest.approx(91 / 100)
  assert float(ema_decay_at(10 ** 7, 0.9999, True)) == pytest.approx(0.9999)
  assert float(ema_decay_at(5, 0.99, False)) == pytest.approx(0.99)
  ema = {"w": jnp.array([1.0, 2.0])}
  new = ema_update(ema, {"w": jnp.array([3.0, 0.0])}, 0.75)
  np.testing.assert_allclose(new["w"], [0.75 * 1 + 0.25 * 3, 0.75 * 2], rtol=1e-6)


def test_sigterm_sets_the_preemption_flag():
  flag = _PreemptionFlag()
  try:
    assert not flag.raised
    os.kill(os.getpid(), signal.SIGTERM)
    assert flag.raised
  finally:
    flag.restore()
  assert signal.getsignal(signal.SIGTERM) is not flag._handler  # pylint: disable=protected-access

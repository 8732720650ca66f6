"""The forward process and its parameterisations: noising, eps / x0 / v conversions, the loss.

Pure functions of arrays and a Schedule; `t` is an integer array of shape (B,).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from ldm_jax.diffusion.schedules import Schedule

PARAMETERIZATIONS = ("eps", "x0", "v")


def _bcast(values, x):
  """(B,) per-example values -> broadcastable against x (B, ...)."""
  return values.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)


def _coefs(schedule: Schedule, t, x):
  return (_bcast(jnp.sqrt(schedule.alphas_cumprod[t]), x),
          _bcast(jnp.sqrt(schedule.one_minus_alphas_cumprod[t]), x))


def q_sample(schedule: Schedule, x0, t, noise):
  """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise."""
  sa, s1a = _coefs(schedule, t, x0)
  return sa * x0 + s1a * noise


def v_target(schedule: Schedule, x0, t, noise):
  """v = sqrt(a_t) eps - sqrt(1 - a_t) x0 (Salimans & Ho 2022)."""
  sa, s1a = _coefs(schedule, t, x0)
  return sa * noise - s1a * x0


def predict_x0(schedule: Schedule, model_out, x_t, t, parameterization: str):
  """x0 implied by a model output under the given parameterisation."""
  sa, s1a = _coefs(schedule, t, x_t)
  if parameterization == "eps":
    return (x_t - s1a * model_out) / sa
  if parameterization == "x0":
    return model_out
  if parameterization == "v":
    return sa * x_t - s1a * model_out
  raise ValueError(f"diffusion.parameterization: unknown '{parameterization}'")


def predict_eps(schedule: Schedule, model_out, x_t, t, parameterization: str):
  """eps implied by a model output under the given parameterisation."""
  sa, s1a = _coefs(schedule, t, x_t)
  if parameterization == "eps":
    return model_out
  if parameterization == "x0":
    return (x_t - sa * model_out) / s1a
  if parameterization == "v":
    return sa * model_out + s1a * x_t
  raise ValueError(f"diffusion.parameterization: unknown '{parameterization}'")


def training_target(schedule: Schedule, x0, t, noise, parameterization: str):
  if parameterization == "eps":
    return noise
  if parameterization == "x0":
    return x0
  if parameterization == "v":
    return v_target(schedule, x0, t, noise)
  raise ValueError(f"diffusion.parameterization: unknown '{parameterization}'")


def timestep_weights(schedule: Schedule, t, weighting: str, parameterization: str,
                     gamma: float = 5.0):
  """Per-example loss weights. 'min_snr' (Hang et al. 2023) caps the SNR at gamma, expressed
  for the parameterisation's own loss so every choice weights the x0 error the same way."""
  if weighting == "none":
    return jnp.ones(t.shape, jnp.float32)
  if weighting == "min_snr":
    snr = schedule.snr(t)
    capped = jnp.minimum(snr, gamma)
    if parameterization == "eps":
      return capped / snr
    if parameterization == "v":
      return capped / (snr + 1.0)
    return capped
  raise ValueError(f"diffusion.loss_weighting: unknown '{weighting}'")


def diffusion_loss(model_fn: Callable, schedule: Schedule, x0, rng, *, parameterization="eps",
                   loss_type="l2", weighting="none", min_snr_gamma=5.0):
  """The denoising loss: E_t,eps || target - model(x_t, t) ||, mean over elements and batch.

  model_fn(x_t, t) returns the network output. Returns (loss, per-example losses, t).
  """
  r_t, r_noise = jax.random.split(rng)
  b = x0.shape[0]
  t = jax.random.randint(r_t, (b,), 0, schedule.num_timesteps)
  noise = jax.random.normal(r_noise, x0.shape, jnp.float32)
  x_t = q_sample(schedule, x0, t, noise)
  out = model_fn(x_t, t).astype(jnp.float32)
  target = training_target(schedule, x0, t, noise, parameterization)
  if loss_type == "l2":
    err = jnp.square(out - target)
  elif loss_type == "l1":
    err = jnp.abs(out - target)
  else:
    raise ValueError(f"diffusion.loss_type: unknown '{loss_type}'")
  per_example = jnp.mean(err, axis=tuple(range(1, err.ndim)))
  weights = timestep_weights(schedule, t, weighting, parameterization, min_snr_gamma)
  return jnp.mean(weights * per_example), per_example, t

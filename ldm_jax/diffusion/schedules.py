"""Noise schedules: beta schedules and the cumulative products every sampler and loss uses.

Computed in float64 numpy (as the reference does), stored as float32 device arrays.
"""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.errors import ConfigError

BETA_SCHEDULES = ("linear", "cosine", "sqrt_linear", "sqrt")


def make_beta_schedule(kind: str, timesteps: int, linear_start: float = 1e-4,
                       linear_end: float = 2e-2, cosine_s: float = 8e-3) -> np.ndarray:
  """Betas of the reference's named schedules (float64).

  'linear' is the reference's (and diffusers' "scaled_linear"): linspace of the square roots,
  squared. 'cosine' is Nichol & Dhariwal's, clipped at 0.999. 'sqrt_linear' is linear in beta;
  'sqrt' is the square root of that.
  """
  if kind == "linear":
    return np.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=np.float64) ** 2
  if kind == "cosine":
    steps = np.arange(timesteps + 1, dtype=np.float64) / timesteps + cosine_s
    alphas = np.cos(steps / (1 + cosine_s) * np.pi / 2) ** 2
    alphas = alphas / alphas[0]
    return np.clip(1 - alphas[1:] / alphas[:-1], 0, 0.999)
  if kind == "sqrt_linear":
    return np.linspace(linear_start, linear_end, timesteps, dtype=np.float64)
  if kind == "sqrt":
    return np.linspace(linear_start, linear_end, timesteps, dtype=np.float64) ** 0.5
  raise ValueError(f"diffusion.beta_schedule: unknown schedule '{kind}' (known: "
                   f"{', '.join(BETA_SCHEDULES)})")


@flax.struct.dataclass
class Schedule:
  """Per-timestep constants of a discrete diffusion, indexed by integer t in [0, T)."""
  betas: jax.Array
  alphas_cumprod: jax.Array
  # 1 - alphas_cumprod from float64: near t = 0 the float32 difference keeps ~3 digits.
  one_minus_alphas_cumprod: jax.Array

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]

  @property
  def sqrt_alphas_cumprod(self):
    return jnp.sqrt(self.alphas_cumprod)

  @property
  def sqrt_one_minus_alphas_cumprod(self):
    return jnp.sqrt(self.one_minus_alphas_cumprod)

  def snr(self, t):
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at integer timesteps t."""
    return self.alphas_cumprod[t] / self.one_minus_alphas_cumprod[t]


def schedule_from_betas(betas) -> Schedule:
  betas = np.asarray(betas, np.float64)
  alphas_cumprod = np.cumprod(1.0 - betas)
  return Schedule(jnp.asarray(betas, jnp.float32), jnp.asarray(alphas_cumprod, jnp.float32),
                  jnp.asarray(1.0 - alphas_cumprod, jnp.float32))


def make_schedule(diffusion_config) -> Schedule:
  """The Schedule of `config.diffusion`."""
  d = diffusion_config
  return schedule_from_betas(make_beta_schedule(d.beta_schedule, d.timesteps, d.linear_start,
                                                d.linear_end, d.cosine_s))


def check_sampling_config(config) -> None:
  """Raises ConfigError when `config.sample` asks for more steps than `config.diffusion` has."""
  d, s = config.diffusion, config.sample
  if d.timesteps <= 0:
    raise ConfigError(f"diffusion.timesteps: must be positive, got {d.timesteps}")
  if s.steps <= 0:
    raise ConfigError(f"sample.steps: must be positive, got {s.steps}")
  if s.steps > d.timesteps:
    raise ConfigError(f"sample.steps ({s.steps}) exceeds diffusion.timesteps ({d.timesteps}): "
                      f"a sampler visits at most every timestep once; lower sample.steps")

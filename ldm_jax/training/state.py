"""The train state shared by both stages, and the EMA of parameters."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint holds besides the data position.

  params:      trained parameters (for stage 1 a dict {'ae', 'disc', ...} of the sub-models).
  opt_state:   optax state of `params`.
  ema_params:  EMA copy of the parameters the stage exports (None when EMA is off).
  model_state: non-trained variables (BatchNorm statistics, VQ codebook statistics, the latent
               scale factor), updated by the train step itself.
  rng:         base PRNG key; step n draws from fold_in(rng, n), so resuming needs no RNG state
               beyond the step.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  model_state: Any
  rng: jax.Array

  def step_rng(self) -> jax.Array:
    return jax.random.fold_in(self.rng, self.step)


def ema_decay_at(step, decay: float, warmup: bool):
  """The reference's EMA decay: min(decay, (1 + n) / (10 + n)) with warm-up, else decay."""
  if not warmup:
    return jnp.asarray(decay, jnp.float32)
  n = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def ema_update(ema, params, decay):
  """ema <- decay * ema + (1 - decay) * params, leaf by leaf in float32."""
  return jax.tree_util.tree_map(lambda e, p: e + (1.0 - decay) * (p - e), ema, params)

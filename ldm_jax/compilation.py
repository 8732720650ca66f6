"""How programs that run once (parameter initialisation) are compiled: on CPU, without XLA's
backend (LLVM) optimisations.

Random initialisation is hundreds of small elementwise kernels (threefry, the normal and
truncated-normal transforms) that XLA's CPU backend spends most of its compile time optimising:
initialising the tests' tiny autoencoder compiles in 15.8 s with the default pipeline and in
5.2 s without it, for a program that runs once. The values equal the optimised program's to
float rounding (a few ulp in the initialisers' scaling); the training loop always initialises
this way, so a run's initial weights are the same from run to run. On GPU and TPU nothing
changes.
"""
from __future__ import annotations

import jax


def run_once_options() -> dict[str, int] | None:
  """compiler_options for jax.jit of a program that runs once (None: the defaults)."""
  if jax.default_backend() == "cpu":
    return {"xla_backend_optimization_level": 0}
  return None

"""XLA's CPU kernels: Eigen's convolutions instead of YNNPACK's, set before JAX starts.

jax 0.10's CPU backend hands convolutions and dots to YNNPACK by default. On the 2-core AVX-512
machines this project is built on, YNNPACK's 3x3 convolutions ran at half the speed of Eigen's
forward and 2-4x slower backward (a 16x32x32x64 -> 64 conv: forward 15.1 -> 7.4 ms, fwd+bwd
64.6 -> 27.0 ms; benchmarks/RESULTS.md), while dots ran at the same speed. So ldm_jax turns
YNNPACK's fusions off (`--xla_cpu_experimental_ynn_fusion_type=`, an empty list) when it is
imported before JAX's backends start, unless XLA_FLAGS already names that flag: set it yourself
to keep another choice (models/cpu_conv.py then keeps the rules it measured for YNNPACK).
Accelerators do not read the flag.
"""
from __future__ import annotations

import os

FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def _value(flags: str) -> str | None:
  """The last value XLA_FLAGS gives FLAG (None when it does not name it)."""
  value = None
  for token in flags.split():
    if token == FLAG or token.startswith(FLAG + "="):
      value = token.partition("=")[2]
  return value


def eigen_kernels(environ=None) -> bool:
  """Whether XLA_FLAGS turns YNNPACK's fusions off (what models/cpu_conv.py's rules assume)."""
  return _value((os.environ if environ is None else environ).get("XLA_FLAGS", "")) == ""


def prefer_eigen_kernels(environ=None, backends_started: bool | None = None) -> bool:
  """Adds FLAG= to XLA_FLAGS unless it names FLAG already or JAX's backends have started (the
  flag would then not apply); returns eigen_kernels()."""
  environ = os.environ if environ is None else environ
  flags = environ.get("XLA_FLAGS", "")
  if _value(flags) is None:
    if backends_started is None:
      backends_started = _backends_started()
    if not backends_started:
      environ["XLA_FLAGS"] = f"{flags} {FLAG}=".strip()
  return eigen_kernels(environ)


def _backends_started() -> bool:
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):   # another jax: assume not, as at a normal import
    return False

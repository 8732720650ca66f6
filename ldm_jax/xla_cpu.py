"""XLA's CPU kernels: Eigen's convolutions and YNNPACK's reductions, set before JAX starts.

jax 0.10's CPU backend hands convolutions and dots to YNNPACK by default. On the 2-core AVX-512
machines this project is built on, Eigen's 3x3 convolutions ran 1.2-2.2x faster forward and
2.1-2.5x faster fwd+bwd than YNNPACK's (16x32x32x64 -> 64: forward 15.1 -> 7.4 ms, fwd+bwd
64.6 -> 27.0 ms; benchmarks/RESULTS.md), while dots ran at the same speed. XLA's own reductions
are the opposite case: a per-channel sum over (B, H, W) of 8x32x32x512 took 14-17 ms as XLA's
reduce and 0.7 ms as YNNPACK's (its reduce fusions), and in the ImageNet UNet's fwd+bwd, full
of such sums (bias and norm gradients), YNNPACK's reductions took the step 0.88x the time;
YNNPACK's elementwise fusions made it 1.15x slower. So ldm_jax sets
`--xla_cpu_experimental_ynn_fusion_type=reduce` (YNNPACK for reductions only) when it is
imported before JAX's backends start, unless XLA_FLAGS already names that flag: set it yourself
to keep another choice (models/cpu_conv.py then keeps the rules it measured for YNNPACK's
convolutions if that choice gives them convolutions). Accelerators do not read the flag.
"""
from __future__ import annotations

import os

FLAG = "--xla_cpu_experimental_ynn_fusion_type"
# What ldm_jax sets FLAG to: YNNPACK runs reductions, Eigen (XLA's own) convolutions and dots.
CHOICE = "reduce"


def _value(flags: str) -> str | None:
  """The last value XLA_FLAGS gives FLAG (None when it does not name it)."""
  value = None
  for token in flags.split():
    if token.startswith(FLAG + "="):
      value = token.partition("=")[2]
  return value


def eigen_kernels(environ=None) -> bool:
  """Whether XLA_FLAGS keeps convolutions off YNNPACK (what models/cpu_conv.py's rules assume):
  a list without individual_convolution, or '+'/'-' changes to the default that remove it."""
  value = _value((os.environ if environ is None else environ).get("XLA_FLAGS", ""))
  if value is None:
    return False
  entries = [e for e in value.split(",") if e]
  if any(e.lstrip("+") == "individual_convolution" for e in entries):
    return False
  if entries and all(e[0] in "+-" for e in entries):   # edits of the default, which has convs
    return "-individual_convolution" in entries
  return True


def choose_cpu_kernels(environ=None, backends_started: bool | None = None) -> bool:
  """Adds FLAG=CHOICE to XLA_FLAGS unless it names FLAG already or JAX's backends have started (the
  flag would then not apply); returns eigen_kernels()."""
  environ = os.environ if environ is None else environ
  flags = environ.get("XLA_FLAGS", "")
  if _value(flags) is None:
    if backends_started is None:
      backends_started = _backends_started()
    if not backends_started:
      environ["XLA_FLAGS"] = f"{flags} {FLAG}={CHOICE}".strip()
  return eigen_kernels(environ)


def _backends_started() -> bool:
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):   # another jax: assume not, as at a normal import
    return False

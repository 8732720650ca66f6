"""The CPU recipes of the paper's tasks, and what their command lines share."""
from __future__ import annotations

from ldm_jax.errors import ConfigError


def check_steps(*flags: tuple[str, int]):
  """Refuses a (flag, steps) pair with fewer than one step, before any work starts."""
  for flag, n in flags:
    if n < 1:
      raise ConfigError(f"{flag}: expected a positive number of steps, got {n}")


def ldm_steps_help(defaults: dict[str, int]) -> str:
  """--ldm_steps' help: the per-task defaults it overrides."""
  return ("LDM training steps (default per task: " +
          ", ".join(f"{t} {n}" for t, n in defaults.items()) + ").")

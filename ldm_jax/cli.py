"""Shared command-line plumbing: known errors become one clear line and exit status 2."""
from __future__ import annotations

import contextlib
import sys

from ldm_jax.errors import USER_ERRORS

# Errors whose message already says what is wrong and what to do: no traceback for these.
KNOWN_ERRORS = USER_ERRORS


@contextlib.contextmanager
def friendly_errors():
  try:
    yield
  except KNOWN_ERRORS as e:
    sys.stderr.write(f"error: {e}\n")
    sys.exit(2)


def setup_logging(level: str = "INFO"):
  """ldm_jax's progress lines on stderr; library chatter (Orbax, clu, absl) only from WARNING."""
  import logging  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.WARNING)
  # Orbax warns on every read-only open of a checkpoint folder, which sampling does on purpose.
  logging.getLogger("absl").addFilter(lambda r: "is read only" not in r.getMessage())
  logger = logging.getLogger("ldm_jax")
  logger.setLevel(level)
  if not any(getattr(h, "_ldm_jax", False) for h in logger.handlers):
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    handler._ldm_jax = True  # pylint: disable=protected-access
    logger.addHandler(handler)
  logger.propagate = False
  return logger

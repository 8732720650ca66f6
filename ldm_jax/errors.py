"""Every error a user can cause, in one place: the CLIs turn these into one line and exit 2.

Each message names the field, file or folder at fault and what to do about it. Modules raise
these (or a subclass); nothing else reaches a user without --verbose.
"""
from __future__ import annotations


class LdmJaxError(Exception):
  """Base of the errors whose message already says what is wrong and how to fix it."""


class ConfigError(LdmJaxError, ValueError):
  """A config field is unknown, of the wrong type, or inconsistent with another field."""


class DataError(LdmJaxError, ValueError):
  """A dataset is missing, empty or unreadable; the message names the field and the path."""


class BadImageError(DataError):
  """One image file cannot be decoded (truncated, empty, not an image); `path` names it.

  The input pipeline skips such files when data.on_bad_image='skip' and stops otherwise."""

  def __init__(self, message: str, path: str):
    super().__init__(message)
    self.path = path

  def __reduce__(self):   # pickled whole when it comes back from a data worker process
    return type(self), (str(self), self.path)


class CheckpointError(LdmJaxError, RuntimeError):
  """A checkpoint is missing, unreadable, or does not fit the model being restored."""


class ConversionError(LdmJaxError, ValueError):
  """A PyTorch checkpoint does not fit its architecture, or cannot be read."""


class UnsupportedError(ConversionError):
  """A model uses a block or setting that ldm_jax does not implement."""


class JobError(LdmJaxError, ValueError):
  """A sampling job asks for something impossible, or its output folder holds another job."""


class LockError(LdmJaxError, RuntimeError):
  """A workdir or output folder is in use by another run; the message names its host and pid."""


class TrainingDiverged(LdmJaxError, FloatingPointError):
  """A loss or the weights became NaN or infinite; nothing after the last good checkpoint was
  saved."""


class Preempted(LdmJaxError):
  """SIGTERM (or a preemption notice) stopped training after saving the current step; rerunning
  the same command resumes. train.py exits with status 3 for it, not the 2 of a user error."""

  def __init__(self, message: str, step: int | None = None, history: list | None = None):
    super().__init__(message)
    self.step = step
    self.history = history or []   # the metrics logged before the stop


class WeightsNotFound(LdmJaxError, FileNotFoundError):
  """Pretrained weights (LPIPS, Inception, ...) are not installed where ldm_jax looks."""


# The classes the CLIs report as one line (every LdmJaxError, and a missing file).
USER_ERRORS = (LdmJaxError, FileNotFoundError)

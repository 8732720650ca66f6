"""Atomic file writes: each file goes to a temporary name in its own folder, then os.replace
renames it into place, so a killed process leaves the old file or the new one, never half a file.

os.replace is atomic within one folder on local filesystems and on NFS. Files are not fsync'ed:
the guarantee is against a killed process (preemption, OOM, Ctrl-C), not against a machine that
loses power. Object stores mounted as folders (gcsfuse and the like) have no atomic rename: there
a rename is a copy and a delete, and a reader may briefly see a partial file.

A temporary file is named '.<name>.<pid>.<random>.tmp<ext>': hidden, unique per writer, and with
the final extension, so writers that pick a format from the extension (PIL) or append one
(np.save) behave as they would for the final path. A writer that raises leaves no temporary.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from typing import Iterator


def temporary_name(path: str) -> str:
  """A fresh temporary path in `path`'s folder, keeping its extension."""
  directory, name = os.path.split(os.path.abspath(path))
  ext = os.path.splitext(name)[1]
  return os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp{ext}")


def _remove_quietly(path: str):
  try:
    os.remove(path)
  except OSError:
    pass


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary path for a writer that wants a file name (PIL, np.save, tokenizers) and
  renames it onto `path` when the block ends; if the block raises, the temporary is removed and
  `path` is untouched. Creates the folder if needed."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = temporary_name(path)
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    _remove_quietly(tmp)
    raise


def atomic_write_bytes(path: str, data: bytes):
  """Writes `data` to `path` atomically (see the module docstring)."""
  with atomic_path(path) as tmp:
    with open(tmp, "xb") as f:
      f.write(data)


def atomic_write_text(path: str, text: str):
  """Writes `text` (UTF-8) to `path` atomically (see the module docstring)."""
  atomic_write_bytes(path, text.encode("utf-8"))


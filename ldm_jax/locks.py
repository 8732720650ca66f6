"""Folder locks: one training run per workdir, one sampling job per output folder.

A lock is the file <folder>/.ldm_jax.lock, created with os.open(O_CREAT | O_EXCL), which is
atomic: of two processes, one creates it and the other gets FileExistsError. It holds JSON
{purpose, host, pid, started, command, token}; a second run reads it and stops with a
LockError naming the holder. The holder removes it on release (the end of its `with` block,
close(), or the interpreter's exit through atexit). A process killed with SIGKILL leaves its lock
behind: a run on the same host finds that pid gone and takes the lock over with a warning.

Multi-host jobs: only process 0 takes the lock (callers pass enabled=process_index() == 0); the
other hosts follow process 0 and take none.

Shared and remote filesystems:
- NFS (v3 and later): the O_EXCL create is atomic on the server, so the lock holds across hosts.
- A lock held by another host is never taken over automatically, even if that run died: its pid
  cannot be checked from here. The message says which file to delete once that run is gone.
- Object stores (gs://, s3://, or gcsfuse-style mounts) have no atomic create or rename: there
  the lock is advisory only, and two runs started at the same moment may both get it.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import secrets
import socket
import sys
import time

from ldm_jax.errors import LockError

logger = logging.getLogger("ldm_jax")

LOCK_NAME = ".ldm_jax.lock"
# An unreadable lock file (its creator died between creating and writing it) older than this is
# stale; a younger one is a holder still writing it.
UNREADABLE_GRACE_S = 10.0


def _pid_alive(pid: int) -> bool:
  """Whether process `pid` of this host is running (a zombie is not)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:   # someone else's process: alive
    return True
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except (OSError, IndexError):
    return True


def _read(path: str):
  """(raw bytes, holder dict or None when unreadable) of a lock file; None if it is gone."""
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except FileNotFoundError:
    return None
  try:
    holder = json.loads(raw)
  except ValueError:
    return raw, None
  valid = (isinstance(holder, dict) and isinstance(holder.get("host"), str)
           and isinstance(holder.get("pid"), int) and holder["pid"] > 0)
  return raw, holder if valid else None


class FolderLock:
  """The lock of one folder; `acquire()` takes it or raises LockError, `release()` drops it.

  Use as a context manager, or call release(); an atexit hook releases it otherwise."""

  def __init__(self, folder: str, purpose: str, enabled: bool = True):
    self.folder = os.path.abspath(folder)
    self.path = os.path.join(self.folder, LOCK_NAME)
    self.purpose = purpose      # 'training run', 'sampling job': what the message calls the holder
    self.enabled = enabled
    self._token = None
    self._pid = None

  @property
  def held(self) -> bool:
    return self._token is not None

  def acquire(self) -> FolderLock:
    if not self.enabled or self.held:
      return self
    os.makedirs(self.folder, exist_ok=True)
    for _ in range(5):
      if self._create():
        return self
      found = _read(self.path)
      if found is None:         # released between our create and our read: try again
        continue
      raw, holder = found
      if not self._stale(holder):
        raise LockError(self._message(holder))
      if holder is None:
        logger.warning("taking over '%s': unreadable and older than %.0f s (its creator died)",
                       self.path, UNREADABLE_GRACE_S)
      else:
        logger.warning("taking over '%s': its %s (host %s, pid %d, started %s) is no longer "
                       "running", self.path, holder.get("purpose", self.purpose), holder["host"],
                       holder["pid"], holder.get("started", "?"))
      self._remove_if_unchanged(raw)
    raise LockError(f"could not take '{self.path}': other processes keep taking it; retry, or "
                    f"delete it if no {self.purpose} uses '{self.folder}'")

  def release(self):
    """Removes the lock file if this process still holds it; safe to call twice."""
    if self._token is None or self._pid != os.getpid():   # not ours (or a forked child)
      return
    token, self._token = self._token, None
    atexit.unregister(self.release)
    found = _read(self.path)
    if found is not None and found[1] is not None and found[1].get("token") == token:
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass
    else:
      logger.warning("'%s' no longer holds this process's lock; left it alone", self.path)

  def __enter__(self) -> FolderLock:
    return self.acquire()

  def __exit__(self, *exc):
    self.release()

  def _create(self) -> bool:
    token = secrets.token_hex(8)
    content = json.dumps({"purpose": self.purpose, "host": socket.gethostname(), "pid": os.getpid(),
                          "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                          "command": " ".join(sys.argv)[:300], "token": token})
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    try:
      os.write(fd, content.encode("utf-8"))
    except BaseException:
      os.close(fd)
      os.remove(self.path)
      raise
    os.close(fd)
    self._token, self._pid = token, os.getpid()
    atexit.register(self.release)
    return True

  def _stale(self, holder) -> bool:
    if holder is None:
      try:
        return time.time() - os.path.getmtime(self.path) > UNREADABLE_GRACE_S
      except OSError:
        return True
    return holder["host"] == socket.gethostname() and not _pid_alive(holder["pid"])

  def _remove_if_unchanged(self, raw: bytes):
    """Removes the stale lock unless another process replaced it since we read it: it is renamed
    to a name of our own first (one rename wins), then checked."""
    aside = f"{self.path}.stale.{os.getpid()}.{secrets.token_hex(4)}"
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:     # another process took it over first
      return
    with open(aside, "rb") as f:
      unchanged = f.read() == raw
    if unchanged:
      os.remove(aside)
    elif not os.path.exists(self.path):  # a fresh lock, not the stale one: put it back
      os.rename(aside, self.path)
    else:
      os.remove(aside)

  def _message(self, holder) -> str:
    if holder is None:
      return (f"'{self.folder}' is being locked by another {self.purpose} right now ('{self.path}'"
              f" is not written yet); wait, or delete it if no {self.purpose} is starting there")
    who = (f"another {holder.get('purpose', self.purpose)} (host {holder['host']}, pid "
           f"{holder['pid']}, started {holder.get('started', '?')})")
    if holder["host"] == socket.gethostname():
      return (f"'{self.folder}' is in use by {who}; stop it or use another folder (delete "
              f"'{self.path}' if that pid is not an ldm_jax run)")
    return (f"'{self.folder}' is in use by {who}; a process on another host cannot be checked "
            f"from here: if that run is gone, delete '{self.path}'")


def lock_folder(folder: str, purpose: str, enabled: bool = True) -> FolderLock:
  """Takes the lock of `folder` (creating the folder) for a `purpose` ('training run', ...), or
  raises LockError naming its holder; `enabled=False` (hosts other than 0) takes nothing."""
  return FolderLock(folder, purpose, enabled).acquire()

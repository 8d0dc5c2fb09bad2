"""The workdir of a run: its path (local or `gs://`), atomic writes into it, its lock.

- Paths go through `etils.epath`, as orbax's do, so a workdir may be any filesystem the
  ecosystem speaks (`gs://bucket/run`, local folders); only local paths are made absolute.
- One run per workdir: process 0 holds an exclusive `flock` on WORKDIR/lock for the life
  of the run. The operating system releases it when the process dies, however it dies,
  so a crash never blocks the next start; a second start is refused, naming the holder.
  (Object stores such as GCS have no such lock: there the check is not made.)
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import socket

from absl import logging
from etils import epath

from experiments.runtime import errors


def is_local(path: str | os.PathLike) -> bool:
  return "://" not in os.fspath(path)


def resolve(workdir: str | os.PathLike) -> epath.Path:
  """The workdir as an `epath.Path`: absolute when local, untouched when a URL."""
  if not os.fspath(workdir):
    raise errors.UserError("--workdir is empty: name a directory for the run.")
  if is_local(workdir) and os.path.exists(workdir) and not os.path.isdir(workdir):
    raise errors.UserError(f"--workdir {workdir} is a file, not a directory: choose "
                           "another --workdir.")
  return epath.Path(os.path.abspath(workdir) if is_local(workdir) else os.fspath(workdir))


def write_bytes_atomic(path: epath.Path | str, data: bytes) -> None:
  """Writes `data` to `path` so that readers see the old or the new file, never half
  (and a failed write, e.g. on a full disk, leaves no half-written temporary behind)."""
  path = epath.Path(path)
  tmp = path.parent / (path.name + ".tmp")
  try:
    tmp.write_bytes(data)
    tmp.replace(path)
  except BaseException:
    with contextlib.suppress(OSError):
      tmp.unlink(missing_ok=True)
    raise


def write_text_atomic(path: epath.Path | str, text: str) -> None:
  """`write_bytes_atomic` of `text` (UTF-8)."""
  write_bytes_atomic(path, text.encode("utf-8"))


class Lock:
  """An exclusive lock on the workdir, held from `acquire` to `release` (or death).

  The lock is an flock on the workdir directory itself, so removing or damaging
  WORKDIR/lock (which only names the holder: pid, host, start time) never lets a second
  run in.
  """

  def __init__(self, workdir: epath.Path):
    self.path = workdir / "lock"
    self._fd: int | None = None

  def acquire(self) -> None:
    if not is_local(self.path):
      logging.warning("%s is not a local path: one run per workdir is not enforced there.",
                      self.path.parent)
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      try:
        holder = self.path.read_text().strip()
      except (OSError, UnicodeDecodeError):
        holder = ""
      raise errors.WorkdirBusy(
          f"workdir {self.path.parent} is in use by {holder or 'another process'}: wait for "
          "that run to end, stop it, or choose another --workdir.") from None
    self._fd = fd
    started = datetime.datetime.now().isoformat(timespec="seconds")
    try:
      # Also finds out now, before compiling, that files can be made in the workdir (an
      # immutable one may let existing files be written, not new ones).
      write_text_atomic(self.path,
                        f"pid {os.getpid()} on {socket.gethostname()} (started {started})\n")
    except OSError:
      self.release()
      raise

  def holder(self) -> str | None:
    """Who holds the lock now (pid, host, start time), or None if nobody does (or the
    workdir is not local, where there is no lock)."""
    if not is_local(self.path) or not self.path.parent.is_dir():
      return None
    fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      try:
        return self.path.read_text().strip() or "another process"
      except (OSError, UnicodeDecodeError):
        return "another process"
    finally:
      os.close(fd)  # (closing it frees a lock it took)
    return None

  def release(self) -> None:
    if self._fd is None:
      return
    with contextlib.suppress(OSError):
      write_text_atomic(self.path, "")
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None

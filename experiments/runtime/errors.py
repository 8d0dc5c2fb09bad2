"""Failures a user can fix, and the ends of a run that are not success.

The command line prints a `UserError` as one line and no traceback (and exits 2), a
fault of the filesystem likewise (`filesystem_message`, exit 5); any other exception is a
bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import re
import socket

FILESYSTEM_EXIT_CODE = 5

_FILESYSTEM_FIXES = {
    errno.ENOSPC: "free some space",
    errno.EDQUOT: "free some space (the disk quota is used up)",
    errno.EROFS: "the filesystem is read-only: make it writable",
    errno.EACCES: "make it writable for this user",
    errno.EPERM: "make it writable (and not immutable: chattr -i) for this user",
    errno.ENOENT: "it vanished while the run used it: restore it",
    errno.EISDIR: "a directory stands where the run writes a file: move it away",
    errno.ENOTDIR: "a file stands where the run needs a directory: move it away",
    errno.EEXIST: "something else stands where the run writes: move it away",
    errno.ELOOP: "a symbolic link loops: remove it",
}
# The errno of OSError subclasses raised without one (etils.epath raises some so).
_ERRNO_OF_TYPE = ((IsADirectoryError, errno.EISDIR), (NotADirectoryError, errno.ENOTDIR),
                  (FileExistsError, errno.EEXIST), (PermissionError, errno.EACCES),
                  (FileNotFoundError, errno.ENOENT))
# OSErrors that are no fault of the filesystem: the network's.
_NOT_THE_FILESYSTEM = (ConnectionError, TimeoutError, socket.gaierror, socket.herror)


def filesystem_error(error: BaseException) -> OSError | None:
  """The fault of the filesystem behind `error`, or None if there is none.

  Looks through the chain of exceptions (`raise ... from`, and errors raised while
  handling others): an `OSError` with an errno, or tensorstore's (orbax's) report of one,
  which arrives as a ValueError whose message carries `[os_error_code='28']` and the
  path it failed on.
  """
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, _NOT_THE_FILESYSTEM):
      return None
    if isinstance(error, OSError) and error.errno is not None:
      return error
    for kind, number in _ERRNO_OF_TYPE:
      if isinstance(error, kind):
        return OSError(number, str(error) or os.strerror(number), error.filename)
    code = re.search(r"os_error_code='(\d+)'", str(error))
    if code:
      paths = re.findall(r'(?:Failed writing|Failed reading|local file): "([^"]+)"',
                         str(error))
      number = int(code.group(1))
      return OSError(number, os.strerror(number), paths[-1] if paths else None)
    error = error.__cause__ or error.__context__
  return None


def filesystem_message(error: OSError, workdir: str | None = None) -> str:
  """One line for a fault of the filesystem: what failed, on which path (else in which
  `workdir`), and the fix."""
  where = error.filename or (workdir and f"in {workdir}")
  path = f" ({where})" if where else ""
  fix = _FILESYSTEM_FIXES.get(error.errno, "fix it")
  return (f"{error.strerror or error}{path}: {fix}, then run the same command again "
          "(it resumes from the newest good checkpoint).")


class UserError(ValueError):
  """A problem with the command, config, data or workdir that the user can fix."""


class MissingFileError(UserError, FileNotFoundError):
  """A file or folder the run needs is not there."""


class WorkdirBusy(UserError):
  """Another live process holds the workdir."""


class Diverged(RuntimeError):
  """The loss or a gradient became non-finite; nothing after the last good step was kept."""
  exit_code = 3

  def __init__(self, step: int, message: str):
    super().__init__(message)
    self.step = step


class Preempted(RuntimeError):
  """The run was asked to stop (SIGTERM/SIGINT, or preemption on any host) and saved a
  checkpoint at `step`; started again, it continues from there."""
  exit_code = 75  # EX_TEMPFAIL: try again

  def __init__(self, step: int):
    super().__init__(f"stopped by request at step {step}; a checkpoint of that step is "
                     "saved: run the same command to continue.")
    self.step = step


class IncompatibleCheckpoint(UserError):
  """A checkpoint the current settings cannot load (other shapes): kept as it is."""

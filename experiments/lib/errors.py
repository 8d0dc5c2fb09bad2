"""Failures a user can fix, and the ends of a run that are not success.

The command line prints a `UserError` as one line and no traceback (and exits 2), a
fault of the filesystem likewise (`filesystem_message`, exit 5); any other exception is a
bug and keeps its traceback.
"""

import errno

FILESYSTEM_EXIT_CODE = 5

_FILESYSTEM_FIXES = {
    errno.ENOSPC: "free some space (or give another --workdir)",
    errno.EDQUOT: "free some space (or give another --workdir)",
    errno.EROFS: "the filesystem is read-only: give another --workdir",
    errno.EACCES: "make it writable for this user, or give another --workdir",
    errno.EPERM: "make it writable for this user, or give another --workdir",
    errno.ENOENT: "it vanished while the run used it: restore it or give another --workdir",
}


def filesystem_message(error: OSError) -> str:
  """One line for a fault of the filesystem: what failed, on which path, and the fix."""
  path = f" ({error.filename})" if error.filename else ""
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

"""Failures a user can fix, and the ends of a run that are not success.

The command line prints a `UserError` as one line and no traceback (and exits 2); any
other exception is a bug and keeps its traceback.
"""


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

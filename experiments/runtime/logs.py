"""Log hygiene of the command lines: this project's lines, other libraries' warnings only.

`quiet_libraries()` keeps the console to what a user acts on: this project's log lines,
every library's warnings and errors without their tracebacks, no INFO chatter (orbax's
temporary directories and barriers), and one line, not dozens of tracebacks, for the
noise that a failed checkpoint write or read leaves behind (tensorstore's late
completions into orbax's closed event loop) or a background thread that a fault of the
filesystem stops (orbax's writers, TensorBoard's event writer).
"""

from __future__ import annotations

import logging as std_logging
import os
import sys
import threading

from absl import logging

from experiments.runtime import errors

_OUR_CODE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class OnlyOurInfo(std_logging.Filter):
  """Keeps this project's log lines and every library's warnings and errors, the latter
  without their tracebacks (orbax logs each failed write of a full disk with one); drops
  the libraries' INFO lines and asyncio's reports of the other writes of a failed
  checkpoint, which fail alike."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if os.path.abspath(record.pathname).startswith(_OUR_CODE):
      return True
    if record.name == "asyncio" and "exception was never retrieved" in record.getMessage():
      return False
    record.exc_info, record.exc_text, record.stack_info = None, None, None
    return record.levelno >= std_logging.WARNING


def is_closed_event_loop_noise(error: BaseException | None) -> bool:
  """Whether `error` is tensorstore completing a read or write into the event loop that
  orbax closed when another one failed (the failure itself is reported elsewhere)."""
  return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


def _without_closed_loop_noise(unraisable) -> None:
  """sys.unraisablehook that drops `is_closed_event_loop_noise` errors."""
  if is_closed_event_loop_noise(unraisable.exc_value):
    return
  sys.__unraisablehook__(unraisable)


def _filesystem_faults_in_one_line(failure) -> None:
  """threading.excepthook: a thread that a fault of the filesystem ends says so in one
  warning line (the run itself reports the fault, exit 5); others keep their traceback."""
  fault = errors.filesystem_error(failure.exc_value)
  if fault is None:
    threading.__excepthook__(failure)
    return
  name = failure.thread.name if failure.thread is not None else "a background thread"
  logging.warning("%s stopped: %s", name, errors.filesystem_message(fault))


def quiet_libraries(enabled: bool = True) -> None:
  """Installs the filters and hooks of the module docstring (or removes them)."""
  handler = logging.get_absl_handler()
  for f in [f for f in handler.filters if isinstance(f, OnlyOurInfo)]:
    handler.removeFilter(f)
  sys.unraisablehook = sys.__unraisablehook__
  threading.excepthook = threading.__excepthook__
  if enabled:
    handler.addFilter(OnlyOurInfo())
    sys.unraisablehook = _without_closed_loop_noise
    threading.excepthook = _filesystem_faults_in_one_line

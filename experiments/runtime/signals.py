"""The signals that ask a program to stop (SIGINT, SIGTERM, SIGHUP), caught while entered.

The first one is a request: the program finishes what it must (a run saves a checkpoint,
a sweep waits for its running config). A second one acts at once, even while the main
thread is busy in compiled code (XLA compiling, a device computation), where Python runs
no signal handler and two signals coalesce into one: a watcher thread learns of every
signal as it arrives, from the wakeup file descriptor that Python's own C handler writes
each signal number to (`signal.set_wakeup_fd`).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from absl import logging

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def exit_status(signum: int) -> int:
  """The status a shell reports for a process ended by `signum` (130 for SIGINT)."""
  return 128 + signum


class StopSignals:
  """Catches `signals` while entered in the main thread (elsewhere: nothing).

  Subclasses say what the first signal does (`first`) and what a second does (`again`);
  both run in the watcher thread as the signal arrives.
  """

  def __init__(self, signals=STOP_SIGNALS):
    self.signals = tuple(signals)
    self.requested: str | None = None
    self._previous: dict = {}
    self._previous_wakeup = -1
    self._pipe: tuple[int, int] | None = None
    self._watcher: threading.Thread | None = None

  def first(self, signum: int) -> None:
    raise NotImplementedError

  def again(self, signum: int) -> None:
    raise NotImplementedError

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread() or not self.signals:
      return self
    read, write = os.pipe()
    os.set_blocking(write, False)
    self._pipe = (read, write)
    self._previous_wakeup = signal.set_wakeup_fd(write)
    for sig in self.signals:  # Python-level handlers: the watcher does the work
      self._previous[sig] = signal.signal(sig, lambda signum, frame: None)
    self._watcher = threading.Thread(target=self._watch, name="stop-signals", daemon=True)
    self._watcher.start()
    return self

  def _watch(self) -> None:
    read = self._pipe[0]
    while data := os.read(read, 64):
      for signum in data:
        if signum not in self.signals:
          continue
        if self.requested is None:
          self.requested = signal.Signals(signum).name
          self.first(signum)
        else:
          self.again(signum)

  def __exit__(self, *exc) -> None:
    if self._pipe is None:
      return
    signal.set_wakeup_fd(self._previous_wakeup)
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    os.close(self._pipe[1])  # the watcher reads EOF and ends
    self._watcher.join(5)
    os.close(self._pipe[0])
    self._pipe = None


def exit_at_once(signum: int, message: str) -> None:
  """Prints `message` and ends the process now with `exit_status(signum)`: no cleanup
  (the workdir lock dies with the process; orbax keeps every finished checkpoint)."""
  print(message, file=sys.stderr, flush=True)
  logging.flush()
  os._exit(exit_status(signum))  # pylint: disable=protected-access

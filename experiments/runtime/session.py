"""The shell around one run: its workdir lock and its stop signals, as one context.

    with session.run_session(path) as stop_requested:
      loop.train_and_evaluate(config, path, stop=stop_requested)

Signals are caught from before the lock is taken until the run's last write is done (a
signal while loading or compiling stops the run after its first call; one after the last
checkpoint lets it finish writing its results), and whatever the run does inside
completes before the lock is freed.
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import os
import signal
import threading
import time

from absl import logging
from etils import epath
import jax
from orbax.checkpoint import multihost as ocp_multihost

from experiments.runtime import multihost
from experiments.runtime import signals
from experiments.runtime import workdir as workdir_lib

SECOND_SIGNAL = ("stopped at once by a second signal: run the same command again to "
                 "resume (from the newest checkpoint, if one was saved).")


class StopRequest(signals.StopSignals):
  """Whether the run should checkpoint and stop now (`stop_requested(step)`), agreed by
  every host.

  One process: SIGTERM, SIGINT and SIGHUP ask for a checkpoint at the next step boundary
  and exit 75. Several processes: JAX's preemption service catches SIGTERM on any host,
  and orbax's `reached_preemption(step)` names the same step on all of them; a SIGINT or
  SIGHUP is passed on to it as a SIGTERM. A second signal stops the process at once.
  """

  def __init__(self):
    several = jax.process_count() > 1
    super().__init__((signal.SIGINT, signal.SIGHUP) if several else signals.STOP_SIGNALS)

  def first(self, signum: int) -> None:
    name = signal.Signals(signum).name
    if jax.process_count() > 1:  # JAX's preemption notifier listens for SIGTERM only
      logging.warning("%s received: passed on as SIGTERM, so every process saves a "
                      "checkpoint of one step (send it again to stop at once).", name)
      os.kill(os.getpid(), signal.SIGTERM)
    else:
      logging.warning("%s received: saving a checkpoint at the next step boundary "
                      "(send it again to stop at once).", name)

  def again(self, signum: int) -> None:
    signals.exit_at_once(signum, SECOND_SIGNAL)

  def __call__(self, step: int) -> bool:
    if jax.process_count() > 1:
      return bool(ocp_multihost.reached_preemption(step))
    return self.requested is not None


@contextlib.contextmanager
def run_session(workdir: epath.Path) -> Iterator[StopRequest]:
  """The stop signals caught and (on process 0) the lock of `workdir` held, for a run;
  with several processes, each must see the workdir process 0 locked."""
  with StopRequest() as stop_requested:
    lock = workdir_lib.Lock(workdir)
    if jax.process_index() == 0:
      lock.acquire()
    try:
      multihost.check_shared_workdir(workdir)
      yield stop_requested
    finally:
      lock.release()


PARENT_ENV = "SDNET_STOP_WITH_PARENT"  # a sweep's pid, given to the runs it starts


def stop_with_parent(poll_s: float = 1.0) -> None:
  """If this process was started by a sweep (PARENT_ENV names the sweep's pid), a stop
  request (SIGTERM to itself: checkpoint, exit 75) as soon as the sweep is gone, however
  it ended (SIGKILL included): a sweep's runs never outlive it."""
  parent = os.environ.get(PARENT_ENV)
  if not parent:
    return

  def watch() -> None:
    while os.getppid() == int(parent):
      time.sleep(poll_s)
    logging.warning("the sweep that started this run (pid %s) is gone: stopping.", parent)
    os.kill(os.getpid(), signal.SIGTERM)

  threading.Thread(target=watch, name="stop-with-parent", daemon=True).start()

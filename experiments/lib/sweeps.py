"""The paper's named sweeps, and running one config after another (`experiments.sweep`)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading

from absl import logging

from experiments.lib import errors

PREEMPTED = errors.Preempted.exit_code


def runs(sweep: str, base_p_last: float) -> list[tuple[str, list[str]]]:
  """(name, extra --config.* flags) of every run of `sweep`, in the order they run."""
  if sweep == "pair":
    return [("stochastic", [f"--config.survival.p_last={base_p_last}"]),
            ("constant", ["--config.survival.p_last=1.0"])]
  grid = []
  for rule in ("linear_decay", "uniform"):
    for tenth in range(1, 11):
      if tenth == 10 and rule == "uniform":
        continue  # p_L = 1 is constant depth under either rule: run it once
      grid.append((f"{rule}_p{tenth / 10:.1f}",
                   [f"--config.survival.rule={rule}",
                    f"--config.survival.p_last={tenth / 10}"]))
  return grid


def config_overrides(argv: list[str]) -> list[str]:
  """The --config.* flags given to the sweep, passed on to every run."""
  return [a for a in argv if a.startswith("--config.")]


def run_command(config_file: str, workdir: str, overrides: list[str]) -> list[str]:
  return [sys.executable, "-m", "experiments.cifar", f"--config={config_file}",
          f"--workdir={workdir}", *overrides]


class StopForwarding:
  """SIGINT and SIGTERM to the sweep reach the running config once, as a SIGTERM.

  Each config runs in a session of its own, so Ctrl-C in a terminal (which signals the
  whole foreground process group) reaches it only through the sweep: once, so it saves a
  checkpoint and exits 75 (a second signal would stop it at once, losing that step). The
  sweep waits for it, then stops too.
  """

  def __init__(self):
    self.child: subprocess.Popen | None = None
    self.requested: str | None = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame):
    del frame
    if self.requested is not None:
      return
    self.requested = signal.Signals(signum).name
    if self.child is not None and self.child.poll() is None:
      logging.warning("%s received: passed on to the running config; waiting for it to "
                      "save a checkpoint and exit.", self.requested)
      self.child.send_signal(signal.SIGTERM)

  def run(self, command: list[str]) -> int:
    """`command`'s exit status; it is not started once a stop was requested."""
    if self.requested is not None:
      return PREEMPTED
    self.child = subprocess.Popen(command, start_new_session=True)
    try:
      while True:
        with contextlib.suppress(subprocess.TimeoutExpired):
          return self.child.wait(timeout=1.0)
    finally:
      if self.child.poll() is None:  # the sweep itself is failing: do not orphan it
        self.child.send_signal(signal.SIGTERM)
        self.child.wait()
      self.child = None


def run(sweep: str, config_file: str, root: str, base_p_last: float,
        overrides: list[str], report: bool = True) -> int:
  """Runs every config of `sweep` in its own process and workdir ROOT/NAME, then the
  report into ROOT/report: the finished runs, what the failed ones logged, and a list of
  the failed ones with their exit status. Returns the sweep's exit status: 75 when
  stopped by a signal (to the sweep or to a run), 1 when any run failed, else the
  report's."""
  reported, failed = [], []
  with StopForwarding() as stop:
    for name, extra in runs(sweep, base_p_last):
      workdir = os.path.join(root, name)
      command = run_command(config_file, workdir, overrides + extra)
      logging.info("[%s] %s", name, " ".join(command[1:]))
      code = stop.run(command)
      if code == PREEMPTED or stop.requested:
        logging.warning("[%s] stopped by request: run the same sweep again to go on.",
                        name)
        return PREEMPTED
      if code != 0:
        logging.error("[%s] failed with exit code %d; going on with the next run.", name,
                      code)
        failed.append((name, code))
        if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
          continue  # it never logged: nothing of it to plot
      reported.append(workdir)
  report_code = 0
  if report and reported:
    command = [sys.executable, "-m", "experiments.report", *reported,
               f"--out={os.path.join(root, 'report')}",
               *(f"--failed={name}={code}" for name, code in failed)]
    report_code = subprocess.run(command, check=False).returncode
  if failed:
    where = ("listed in the report as failed" if report and reported else
             "no report: none of them logged" if report else "no report asked for")
    logging.error("failed runs (%s): %s", where,
                  ", ".join(f"{name} (exit {code})" for name, code in failed))
    return 1
  return report_code

"""The paper's named sweeps, and running their configs one after another.

Every config of a sweep is `python -m experiments.cifar` in a process and workdir of its
own (ROOT/NAME); the sweep's --config.* overrides apply to all of them. The sweep's
report (`experiments.report`) goes to ROOT/report.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

from absl import logging

from experiments.runtime import errors
from experiments.runtime import session
from experiments.runtime import signals
from experiments.runtime import workdir as workdir_lib
from sdnet import options

PREEMPTED = errors.Preempted.exit_code
SWEEPS = ("pair", "p_last")


def sweep_configs(sweep: str, base_p_last: float) -> list[tuple[str, list[str]]]:
  """(name, extra --config.* flags) of every config of `sweep`, in the order they run.

  pair: Table 1, stochastic depth (the config's p_L) and constant depth (p_L = 1).
  p_last: Fig. 8 (left), every survival rule at p_L = 0.1, ..., 1.0 (p_L = 1 once: it is
  constant depth under every rule).
  """
  if sweep == "pair":
    return [("stochastic", [f"--config.survival.p_last={base_p_last}"]),
            ("constant", ["--config.survival.p_last=1.0"])]
  grid = []
  for i, rule in enumerate(options.choices(options.SurvivalRule)):
    for tenth in range(1, 11 if i == 0 else 10):
      grid.append((f"{rule}_p{tenth / 10:.1f}",
                   [f"--config.survival.rule={rule}",
                    f"--config.survival.p_last={tenth / 10}"]))
  return grid


def check_configs(sweep: str, base_config, root: str) -> None:
  """Refuses, before any run starts, a sweep whose root is a file or one of whose
  configs (the base config with the run's --config.* flags) cannot work: a UserError
  naming the run and the problem."""
  # pylint: disable=g-import-not-at-top  (the training core's checks pull in jax)
  from experiments.training import checks
  from experiments.training import recipe
  if os.path.exists(root) and not os.path.isdir(root):
    raise errors.UserError(f"--root {root} is a file, not a directory: choose another "
                           "--root.")
  for name, extra in sweep_configs(sweep, base_config.survival.p_last):
    config = base_config.copy_and_resolve_references()
    for flag in extra:
      dotted, value = flag[len("--config."):].split("=", 1)
      *parents, leaf = dotted.split(".")
      node = config
      for parent in parents:
        node = node[parent]
      node[leaf] = type(node[leaf])(value)
    try:
      checks.check_config(config)
      recipe.build_model(config, num_classes=10)
    except errors.UserError as e:
      raise errors.UserError(f"the sweep's run {name!r}: {e}") from None
    except ValueError as e:
      raise errors.UserError(f"the sweep's run {name!r}: model: {e}") from None


def config_overrides(argv: list[str]) -> list[str]:
  """The --config.* flags given to the sweep, passed on to every run."""
  return [a for a in argv if a.startswith("--config.")]


def train_command(config_file: str, workdir: str, overrides: list[str]) -> list[str]:
  return [sys.executable, "-m", "experiments.cifar", f"--config={config_file}",
          f"--workdir={workdir}", *overrides]


class ChildProcess(signals.StopSignals):
  """Runs one config at a time; SIGINT, SIGTERM and SIGHUP to the sweep reach it as a
  SIGTERM.

  Each config runs in a session of its own, so Ctrl-C in a terminal (which signals the
  whole foreground process group) reaches it only through the sweep: the first signal
  once, so it saves a checkpoint and exits 75; a second one again, so it stops at once.
  The sweep waits for it, then stops too.
  """

  def __init__(self):
    super().__init__()
    self.child: subprocess.Popen | None = None

  def first(self, signum: int) -> None:
    logging.warning("%s received: passed on to the running config; waiting for it to "
                    "save a checkpoint and exit.", signal.Signals(signum).name)
    self._forward()

  def again(self, signum: int) -> None:
    del signum
    self._forward()

  def _forward(self) -> None:
    child = self.child
    if child is not None and child.poll() is None:
      child.send_signal(signal.SIGTERM)

  def run(self, command: list[str]) -> int:
    """`command`'s exit status; it is not started once a stop was requested. The child
    stops (checkpoints, exits 75) as soon as this process is gone, however it ends."""
    if self.requested is not None:
      return PREEMPTED
    self.child = subprocess.Popen(command, start_new_session=True,
                                  env={**os.environ, session.PARENT_ENV: str(os.getpid())})
    try:
      while True:
        with contextlib.suppress(subprocess.TimeoutExpired):
          return self.child.wait(timeout=1.0)
    finally:
      if self.child.poll() is None:  # the sweep itself is failing: do not orphan it
        self.child.send_signal(signal.SIGTERM)
        self.child.wait()
      self.child = None


def run_sweep(sweep: str, config_file: str, root: str, base_p_last: float,
              overrides: list[str], report: bool = True) -> int:
  """Runs every config of `sweep` in its own process and workdir ROOT/NAME, then the
  report into ROOT/report: the finished runs, what the failed ones logged, and a list of
  the failed ones with their exit status. Returns the sweep's exit status: 75 when
  stopped by a signal (to the sweep or to a run), 1 when any run failed, else the
  report's."""
  reported, failed = [], []
  with ChildProcess() as children:
    for name, extra in sweep_configs(sweep, base_p_last):
      workdir = os.path.join(root, name)
      command = train_command(config_file, workdir, overrides + extra)
      wait_until_free(name, workdir, children)
      logging.info("[%s] %s", name, " ".join(command[1:]))
      code = children.run(command)
      if code == PREEMPTED or children.requested:
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
  return write_report(root, reported, failed, report)


def wait_until_free(name: str, workdir: str, children: ChildProcess,
                    poll_s: float = 1.0) -> None:
  """Returns once no live process holds `workdir` (a run an earlier sweep left, which
  stops when it sees that sweep gone), or a stop was requested."""
  lock = workdir_lib.Lock(workdir_lib.resolve(workdir))
  holder = lock.holder()
  if holder is not None:
    logging.warning("[%s] %s is in use by %s: waiting for that run to end.", name,
                    workdir, holder)
  while holder is not None and children.requested is None:
    time.sleep(poll_s)
    holder = lock.holder()


def write_report(root: str, reported: list[str], failed: list[tuple[str, int]],
                 report: bool) -> int:
  """The sweep's report (when asked and some run logged) and its exit status."""
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

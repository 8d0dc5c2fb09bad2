r"""Runs a named sweep of the paper one config after another, then writes its report.

  python -m experiments.sweep --sweep=pair --config=experiments/configs/cifar10_sd.py \
      --root=runs/c10_pair [--config.epochs=40 --config.dataset=folder ...]

Sweeps:
  pair   Table 1: stochastic depth (the config's p_L) and constant depth (p_L = 1),
         everything else the same.
  p_last Fig. 8 (left): the linear-decay and the uniform rule for p_L in 0.1, ..., 1.0.

Every run is `python -m experiments.cifar` in its own process and workdir (ROOT/NAME),
with the sweep's --config.* overrides applied to all runs. A finished run is skipped, an
interrupted one resumes from its checkpoint; a run stopped by SIGTERM/SIGINT stops the
sweep (exit 75: start the same command again to go on). The report (experiments.report)
goes to ROOT/report.
"""

from __future__ import annotations

import os
import subprocess
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "The base config file of every run.",
                                lock_config=True)
flags.DEFINE_enum("sweep", None, ["pair", "p_last"], "Which sweep to run.")
flags.DEFINE_string("root", None, "Directory holding one workdir per run, and the report.")
flags.DEFINE_bool("report", True, "Write ROOT/report when every run has finished.")
# Checked in main rather than marked required: a process that imports this module (the
# test suite) parses flags for other programs too.
REQUIRED = ("config", "sweep", "root")

PREEMPTED = 75


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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  missing = [f"--{name}" for name in REQUIRED if FLAGS[name].value is None]
  if missing:
    raise app.UsageError(f"missing {', '.join(missing)}.")
  config_file = flags.FLAGS["config"].config_filename
  overrides = config_overrides(sys.argv[1:])
  finished = []
  for name, extra in runs(FLAGS.sweep, FLAGS.config.survival.p_last):
    workdir = os.path.join(FLAGS.root, name)
    command = run_command(config_file, workdir, overrides + extra)
    logging.info("[%s] %s", name, " ".join(command[1:]))
    code = subprocess.run(command, check=False).returncode
    if code == PREEMPTED:
      logging.warning("[%s] stopped by request: run the same sweep again to go on.", name)
      sys.exit(PREEMPTED)
    if code != 0:
      logging.error("[%s] failed with exit code %d; going on with the next run.", name, code)
      continue
    finished.append(workdir)
  if FLAGS.report and finished:
    report = [sys.executable, "-m", "experiments.report", *finished,
              f"--out={os.path.join(FLAGS.root, 'report')}"]
    sys.exit(subprocess.run(report, check=False).returncode)
  if len(finished) < len(runs(FLAGS.sweep, FLAGS.config.survival.p_last)):
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)

r"""Runs a named sweep of the paper one config after another, then writes its report.

  python -m experiments.sweep --sweep=pair --config=experiments/configs/paper.py:cifar10 \
      --root=runs/c10_pair [--config.epochs=40 --config.dataset=folder ...]

Sweeps:
  pair   Table 1: stochastic depth (the config's p_L) and constant depth (p_L = 1),
         everything else the same.
  p_last Fig. 8 (left): the linear-decay and the uniform rule for p_L in 0.1, ..., 1.0.

Every config is checked before any runs (a config that cannot work: one line, exit 2).
Every run is `python -m experiments.cifar` in its own process and workdir (ROOT/NAME),
with the sweep's --config.* overrides applied to all runs. A finished run is skipped, an
interrupted one resumes from its checkpoint; a run stopped by SIGTERM/SIGINT stops the
sweep (exit 75: start the same command again to go on). The report (experiments.report)
goes to ROOT/report.
"""


from __future__ import annotations

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from experiments.runtime import command_line
from experiments.runtime import errors
from experiments.sweep import sweeps

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "The base config file of every run.",
                                lock_config=True)
flags.DEFINE_enum("sweep", None, list(sweeps.SWEEPS), "Which sweep to run.")
flags.DEFINE_string("root", None, "Directory holding one workdir per run, and the report.")
flags.DEFINE_bool("report", True, "Write ROOT/report when every run has finished.")
flags.mark_flags_as_required(["config", "sweep", "root"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    sweeps.check_configs(FLAGS.sweep, FLAGS.config, FLAGS.root)
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  sys.exit(sweeps.run_sweep(FLAGS.sweep, FLAGS["config"].config_filename, FLAGS.root,
                            FLAGS.config.survival.p_last,
                            sweeps.config_overrides(sys.argv[1:]), FLAGS.report))


if __name__ == "__main__":
  app.run(main, flags_parser=command_line.parse_flags)

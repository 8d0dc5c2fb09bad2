r"""Writes the paper's figures and tables for training runs, and a REPORT.md showing them.

  python -m experiments.report RUN_DIR [RUN_DIR ...] --out=DIR

Each RUN_DIR is the --workdir of `python -m experiments.cifar` (local or gs://). DIR gets
REPORT.md and its PNG figures: learning curves (Fig. 3), Table 1 (error beside the
paper's), Table 2 (training time of every stochastic / constant-depth pair), the
first-block gradient (Fig. 7), survival probabilities and expected depth, and the p_L
sweep (Fig. 8, left) when at least 3 runs differ only in p_L or rule. Unfinished runs
are reported from metrics.jsonl; a directory without metrics.jsonl is skipped.
`--failed=NAME=EXIT_STATUS` (repeated; experiments.sweep passes them) lists runs that
failed.
Exit status: 0 written, 2 a problem to fix, 5 DIR cannot be written (one line each).
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags

from experiments.report import document

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Directory (local or gs://) for REPORT.md and figures.")
flags.DEFINE_multi_string("failed", [], "A run that failed, as NAME=EXIT_STATUS: listed "
                          "in the report's 'Failed runs' (experiments.sweep passes them).")
flags.mark_flag_as_required("out")


def main(argv):
  if len(argv) < 2:
    raise app.UsageError("give at least one RUN_DIR (the --workdir of a training run).")
  sys.exit(document.report(argv[1:], FLAGS.out, FLAGS.failed))


if __name__ == "__main__":
  app.run(main)

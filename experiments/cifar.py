r"""Trains a ResNet with stochastic depth on CIFAR-10/100, SVHN, an image folder or
any registered data source (`experiments.data`).

  python -m experiments.cifar --config=experiments/configs/paper.py:cifar10 \
      --workdir=runs/cifar10_sd [--config.survival.p_last=0.8 ...]

Started again with the same --workdir, a run resumes from its newest good checkpoint.
Exit status: 0 done (or halted as asked, or nothing left to do), 2 a problem to fix
(printed in one line), 3 training diverged, 5 a fault of the filesystem (no space,
read-only, no permission: printed in one line; the checkpoints kept are good), 75
stopped by SIGTERM/SIGINT/SIGHUP or preemption after saving a checkpoint (run the same
command to continue), 128 + N stopped at once by a second signal N (130 for Ctrl-C),
4 (several processes) a computation shared with the other processes failed, e.g.
because one of them died: start every process again to resume from the newest
checkpoint.
"""

from absl import app

from experiments.runtime import training_command
from experiments.runtime import command_line

training_command.define_flags()

if __name__ == "__main__":
  app.run(training_command.main, flags_parser=command_line.parse_flags)

r"""Trains a ResNet with stochastic depth on CIFAR-10/100, SVHN or an image folder.

  python -m experiments.cifar --config=experiments/configs/paper.py:cifar10 \
      --workdir=runs/cifar10_sd [--config.survival.p_last=0.8 ...]

Started again with the same --workdir, a run resumes from its newest good checkpoint.
Exit status: 0 done (or halted as asked), 2 a problem to fix (printed in one line),
3 training diverged, 5 a fault of the filesystem (no space, read-only, no permission:
printed in one line; the checkpoints kept are good), 75 stopped by SIGTERM/SIGINT or
preemption after saving a checkpoint (run the same command to continue), 130 stopped at
once by a second SIGINT, 4 (several processes) a computation shared with the other
processes failed, e.g. because one of them died: start every process again to resume
from the newest checkpoint.
"""

import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from experiments.lib import command_line
from experiments.lib import errors
from experiments.lib import loop
from experiments.lib import multihost
from experiments.lib import writer

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory (local or gs://) for checkpoints, "
                    "metrics and results.")
flags.DEFINE_bool("allow_config_change", False, "Resume a workdir whose run had other "
                  "training settings; the change is recorded in results.json.")
flags.DEFINE_bool("library_logs", False, "Also show the INFO logs of orbax, JAX and "
                  "other libraries (hidden by default).")
flags.DEFINE_enum("distributed", "auto", ["auto", "yes", "no"],
                  "Start JAX's multi-process runtime (jax.distributed). auto: when a "
                  "coordinator address is given or a multi-host TPU slice is detected.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (or "
                    "JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "Number of processes (or JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "This process's index (or JAX_PROCESS_ID).")
flags.DEFINE_integer("heartbeat_timeout_seconds", 60, "Several processes: one silent this "
                     "long (dead, hung, cut off) makes every other process stop.")
flags.DEFINE_integer("initialization_timeout_seconds", 300, "Several processes: how long "
                     "each waits for all of them to connect at the start.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  writer.quiet_libraries(not FLAGS.library_logs)
  try:
    multihost.initialize(FLAGS.distributed, FLAGS.coordinator_address,
                         FLAGS.num_processes, FLAGS.process_id,
                         heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_seconds,
                         initialization_timeout_seconds=FLAGS.initialization_timeout_seconds)
    logging.info("JAX %s on %d process(es), %d device(s): %s", jax.__version__,
                 jax.process_count(), jax.device_count(), jax.devices()[0].device_kind)
    loop.train_and_evaluate(FLAGS.config, FLAGS.workdir,
                            allow_config_change=FLAGS.allow_config_change)
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    exit_alone(2)
  except KeyboardInterrupt:  # a second Ctrl-C: stop now, the step in flight is lost
    print("stopped at once by a second signal: run the same command again to resume "
          "from the newest checkpoint.", file=sys.stderr)
    exit_alone(130)
  except (errors.Diverged, errors.Preempted) as e:
    # Every process raises these at the same step: they leave together.
    logging.error("%s", e)
    print(f"{'diverged' if isinstance(e, errors.Diverged) else 'stopped'}: {e}",
          file=sys.stderr)
    sys.exit(e.exit_code)
  except Exception as e:  # pylint: disable=broad-except
    fault = errors.filesystem_error(e)
    if fault is not None:  # also when orbax or tensorstore report it in their own words
      print(f"error: {errors.filesystem_message(fault, FLAGS.workdir)}", file=sys.stderr)
      exit_alone(errors.FILESYSTEM_EXIT_CODE, at_once=True)
    if not jax.distributed.is_initialized():
      raise  # one process: a bug keeps its traceback and exit status
    logging.exception("process %d failed", jax.process_index())
    shared = isinstance(e, jax.errors.JaxRuntimeError)
    first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    first_line = re.sub(r"(Error dispatching computation: )+", "", first_line)[-300:]
    print(f"error: process {jax.process_index()} of {jax.process_count()} failed"
          f"{' in a computation shared with the other processes' if shared else ''} "
          f"({first_line}). If another process died first, its log says why. Start "
          "every process again to resume from the newest checkpoint.", file=sys.stderr)
    exit_alone(4 if shared else 1)


def exit_alone(status: int, at_once: bool = False) -> None:
  """Exits with `status`. With JAX's multi-process runtime up, at once: the normal exit
  waits in JAX's shutdown barrier for every other process (until the heartbeat timeout
  ends them all), while an immediate exit breaks their collectives so they stop now.
  `at_once` also for one process: after a fault of the filesystem the run's own cleanup
  is done, and the libraries' exit handlers (TensorBoard's event writer) would only fail
  again on the same filesystem, each with a traceback."""
  if not (at_once or jax.distributed.is_initialized()):
    sys.exit(status)
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)  # pylint: disable=protected-access


if __name__ == "__main__":
  app.run(main, flags_parser=command_line.parse_flags)

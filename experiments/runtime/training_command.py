"""The command line of a training run: its flags, and the shell around the training core.

`main` starts JAX's multi-process runtime when asked, enters the run's session (workdir
lock, stop signals), runs `experiments.training.loop.train_and_evaluate`, and turns how
it ended into one line and an exit status:
  0 done (or halted as asked), 2 a problem to fix (flags, config, data, workdir: one
  `error:` line), 3 diverged, 4 a computation shared with other processes failed (several
  processes), 5 a fault of the filesystem (one line naming the path and the fix), 75
  stopped on request after a checkpoint, 128 + N stopped at once by a second signal N
  (130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP).
"""

from __future__ import annotations

import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from experiments.runtime import errors
from experiments.runtime import logs
from experiments.runtime import multihost
from experiments.runtime import session
from experiments.runtime import signals
from experiments.runtime import workdir as workdir_lib
from sdnet import backend

FLAGS = flags.FLAGS

ALLOW_CONFIG_CHANGE_HELP = (
    "Resume a workdir whose run had other settings that its checkpoint can take (the "
    "schedule, learning rate, weight decay, survival probabilities, ...; not the model's "
    "shape or the data's classes); every change is recorded in results.json.")


def define_flags() -> None:
  """The flags of `python -m experiments.cifar` and `experiments.imagenet`."""
  config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory (local or gs://) for checkpoints, "
                      "metrics and results.")
  flags.DEFINE_bool("allow_config_change", False, ALLOW_CONFIG_CHANGE_HELP)
  flags.DEFINE_bool("library_logs", False, "Also show the INFO logs of orbax, JAX and "
                    "other libraries (hidden by default).")
  flags.DEFINE_enum("distributed", "auto", ["auto", "yes", "no"],
                    "Start JAX's multi-process runtime (jax.distributed). auto: when a "
                    "coordinator address is given or a multi-host TPU slice is detected.")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (or "
                      "JAX_COORDINATOR_ADDRESS).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (or JAX_NUM_PROCESSES).")
  flags.DEFINE_integer("process_id", None, "This process's index (or JAX_PROCESS_ID).")
  flags.DEFINE_integer("heartbeat_timeout_seconds", 60, "Several processes: one silent "
                       "this long (dead, hung, cut off) makes every other process stop.")
  flags.DEFINE_integer("initialization_timeout_seconds", 300, "Several processes: how "
                       "long each waits for all of them to connect at the start.")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
  """Trains FLAGS.config in FLAGS.workdir (see the module docstring for the statuses)."""
  # pylint: disable=g-import-not-at-top  (the training core pulls in jax's programs)
  from experiments.training import checks
  from experiments.training import loop
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logs.quiet_libraries(not FLAGS.library_logs)
  backend.keep_freed_host_memory()  # before JAX starts its threads
  try:
    multihost.initialize(FLAGS.distributed, FLAGS.coordinator_address,
                         FLAGS.num_processes, FLAGS.process_id,
                         heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_seconds,
                         initialization_timeout_seconds=FLAGS.initialization_timeout_seconds)
    logging.info("JAX %s on %d process(es), %d device(s): %s", jax.__version__,
                 jax.process_count(), jax.device_count(), jax.devices()[0].device_kind)
    checks.check_config(FLAGS.config)  # before the workdir is made
    path = workdir_lib.resolve(FLAGS.workdir)
    session.stop_with_parent()
    with session.run_session(path) as stop_requested:
      loop.train_and_evaluate(FLAGS.config, path, stop=stop_requested,
                              allow_config_change=FLAGS.allow_config_change)
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    exit_alone(2)
  except KeyboardInterrupt:  # Ctrl-C before the run's signals are caught
    print(session.SECOND_SIGNAL, file=sys.stderr)
    exit_alone(signals.exit_status(2))
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
    report_failure_across_processes(e)


def report_failure_across_processes(error: Exception) -> None:
  """One line for a failure of one process of several (exit 4 when it was a computation
  shared with the others, whose own logs say why if one of them died first)."""
  logging.exception("process %d failed", jax.process_index())
  shared = isinstance(error, jax.errors.JaxRuntimeError)
  first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
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

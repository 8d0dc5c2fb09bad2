"""The training loop of the paper's protocol: train, evaluate, checkpoint, report.

`train_and_evaluate(config, workdir)` trains one config in one workdir, resuming from its
newest good checkpoint, and reads top to bottom: build what the run trains
(`setup.Setup`), restore or initialise the state, compile the steps, then one loop over
the plan's calls that asks `Plan.events` what happens after each (log, evaluate,
checkpoint, stop) and syncs with the host only then. The operational shell (workdir
lock, stop signals, exit codes) lies around it, in `experiments.runtime`; the loop asks
`stop(step)` whether to stop.

What survives faults (each tested):
- A stop request (SIGTERM/SIGINT/SIGHUP, or a preemption notice on any host): a
  checkpoint at the next step boundary, then `errors.Preempted` (exit 75); the restart
  continues bit-identically, its train window and metrics.jsonl as if never stopped.
- A non-finite loss or gradient: `errors.Diverged` (exit 3) naming the first bad step;
  nothing non-finite is saved as a checkpoint or as `best/`.
- A damaged checkpoint: reported and set aside; the next older one is used.
- A restart with different training-relevant settings, or other data: refused, naming
  the fields; processes of one run with different settings or data: refused, naming
  the processes.
- A stop after the last checkpoint: the restart writes the results from it; a finished
  run started again has nothing to do, and needs no data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import dataclasses
import time
from typing import Any

from absl import logging
from etils import epath
from flax import jax_utils
import jax
import ml_collections
import numpy as np

from experiments import data
from experiments import results as results_lib
from experiments.runtime import errors
from experiments.runtime import workdir as workdir_lib
from experiments.training import checkpoints as checkpoints_lib
from experiments.training import checks
from experiments.training import evaluation
from experiments.training import resume
from experiments.training import setup as setup_lib
from experiments.training import steps
from experiments.training import stopwatch
from experiments.training import writer as writer_lib
from sdnet import models
from sdnet import survival as survival_lib


def never_stop(step: int) -> bool:
  del step
  return False


@dataclasses.dataclass
class Outcome:
  """What `train_and_evaluate` produced: the results written and the final host state
  (None when the run had finished before and nothing was done)."""
  results: results_lib.Results
  state: Any


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       source: data.Source | None = None, *,
                       stop: Callable[[int], bool] = never_stop,
                       allow_config_change: bool = False,
                       clock: Callable[[], float] = time.perf_counter) -> Outcome:
  """Trains `config` in `workdir` on `source` (default: the config's dataset).

  Raises `errors.UserError` for problems the user can fix (before training starts),
  `errors.Preempted` after saving a checkpoint when `stop` asked for it,
  `errors.Diverged` when the loss or gradients become non-finite.
  """
  checks.check_config(config)
  path = workdir_lib.resolve(workdir)
  if (done := finished_before(path, config)) is not None:
    return done
  setup = setup_lib.Setup.of(config, data.build(config) if source is None else source)
  plan = setup.plan
  with checkpoints_lib.Checkpoints(path) as checkpoints:
    step, state, record = setup_lib.restore_or_initialise(setup, checkpoints,
                                                          allow_config_change)
    with writer_lib.RunWriter(path, jax.process_index() == 0, start_step=step) as writer:
      writer.write_config(record.config)
      watch = stopwatch.Stopwatch(step, record.timing, record.train_window(), clock)
      evaluations = evaluation.Evaluations(setup, record, writer, watch)
      state, metrics = jax_utils.replicate(state), replicated_metrics(record.window)
      if step >= plan.stop_step:
        return already_there(setup, path, step, state, evaluations, record=record,
                             watch=watch, writer=writer)
      chunks = plan.chunks(step)
      with watch.measure("compile"):
        train = setup_lib.compile_train_steps(setup, state, metrics, set(chunks))
        evaluations.compile(state)
      logging.info("compiled in %.1f s%s", watch.last_s, "" if jax.process_count() == 1
                   else " (several processes: the train step compiles at its first call)")
      progress, saver = Progress(setup, writer, watch), resume.Saver(checkpoints, record, watch)
      for length, batch in zip(chunks, train_batches(setup, step, chunks, watch)):
        state, metrics = train[length](state, batch, metrics)
        step += length
        events, stopping = plan.events(step), stop(step)
        if not (events or stopping):
          continue
        totals = jax.device_get(jax_utils.unreplicate(metrics))  # the one host sync
        watch.end_train(step)
        progress.stop_if_diverged(step, totals, record, checkpoints)
        if events.log:
          progress.log(step, totals)
          metrics = replicated_metrics(None)
        if events.evaluate and evaluations(state, step):
          saver.save(state, step, best=True)
        if events.checkpoint or stopping:
          saver.save(state, step, None if events.log else totals)
          writer.flush()
        if stopping and not events.stop:
          raise errors.Preempted(step)
      final = evaluations.final(state, step) if plan.finished else {}
      # results.json says the run reached `step`: only once that step's checkpoint is on
      # disk, else a restart after a failed final save would find nothing to do.
      checkpoints.wait()
      return finish(setup, step, state, final, record=record, watch=watch, writer=writer)


def train_batches(setup: setup_lib.Setup, start: int, chunks: list[int],
                  watch: stopwatch.Stopwatch) -> Iterator[dict]:
  """The source's batches from `start` on, prefetched to the devices; the time the loop
  waits for each is counted as input wait. Starts the train clock."""
  config = setup.config
  batches = jax_utils.prefetch_to_device(setup.source.train_batches(
      config.seed, config.batch_size, start, chunks, data.Shard.of_this_process()), 2)
  watch.restart_train_clock()
  while True:
    with watch.waiting_for_input():
      batch = next(batches, None)
    if batch is None:
      return
    yield batch


def replicated_metrics(window: dict | None):
  """The train metrics to accumulate into, on every device: empty, or those of the
  window a stop interrupted (saved with its checkpoint)."""
  metrics = steps.empty_metrics()
  if window:
    metrics = {name: np.asarray(window["metrics"][name], value.dtype)
               for name, value in metrics.items()}
  return jax_utils.replicate(metrics)


class Progress:
  """The train windows: a progress line and a metrics record at each log event, and the
  end of the run if a step since the last event was not finite."""

  def __init__(self, setup: setup_lib.Setup, writer: writer_lib.RunWriter,
               watch: stopwatch.Stopwatch):
    self.setup, self.writer, self.watch = setup, writer, watch

  def log(self, step: int, totals) -> None:
    """Logs the window ending at `step` (its metrics summed in `totals`)."""
    plan, window = self.setup.plan, self.watch.take_window()
    summary = steps.summarize(totals)
    record = results_lib.train_record(
        epoch=plan.epoch(step), loss=summary["loss"], error=summary["error"],
        learning_rate=float(self.setup.schedule(step - 1)),
        first_block_gradient=summary["first_block_grad_abs"], steps=window.steps,
        seconds=window.seconds, input_wait_s=window.input_wait_s,
        batch_size=self.setup.config.batch_size, timing=self.watch.snapshot())
    remaining = (plan.total_steps - step) * window.seconds / max(window.steps, 1)
    logging.info("epoch %.2f/%d  step %d/%d  loss %.4f  train error %s  lr %.4g  %.0f "
                 "img/s  input wait %.0f%%  ETA %s", plan.epoch(step),
                 round(plan.total_steps / plan.steps_per_epoch), step, plan.total_steps,
                 summary["loss"], results_lib.percent(summary["error"]),
                 record[results_lib.LEARNING_RATE], record[results_lib.IMAGES_PER_S],
                 100 * record[results_lib.INPUT_WAIT_FRACTION],
                 results_lib.format_duration(remaining))
    self.writer.write_metrics(step, record)

  def stop_if_diverged(self, step: int, totals, record: resume.Record,
                       checkpoints: checkpoints_lib.Checkpoints) -> None:
    """Ends the run (`errors.Diverged`, results.json saying so) if any step up to `step`
    was not finite, before anything of it is saved."""
    bad = int(totals["first_nonfinite_step"])
    if bad == steps.NO_NONFINITE_STEP:
      return
    self.writer.write_results(results_lib.Results.of_run(
        best=record.best, final={}, config=record.config, steps=step, finished=False,
        timing=self.watch.snapshot(), diverged=True, diverged_at_step=bad))
    saved = checkpoints.steps()
    kept = (f"the checkpoint of step {saved[-1]} keeps the last finite state" if saved
            else "no checkpoint was saved before it")
    raise errors.Diverged(bad, f"training diverged: the loss or a gradient is not finite "
                          f"at step {bad}; {kept}. Lower the learning rate or check the "
                          "data, then start again in a new workdir.")


# -------------------------------------------------------------------------- results


def finish(setup: setup_lib.Setup, step: int, state, final: dict[str, dict], *,
           record: resume.Record, watch: stopwatch.Stopwatch,
           writer: writer_lib.RunWriter) -> Outcome:
  """Writes results.json at the stop `step` of the run `setup` trains.

  Args:
    state: the replicated train state at `step`.
    final: the evaluation summaries at the last step of training ({} if it stopped
      before).
    record: the run's record (config, best validation result, config changes).
    watch: its stopwatch (timing, images/s).
    writer: where results.json goes.
  """
  host_state = jax.device_get(jax_utils.unreplicate(state))
  plan, config, best = setup.plan, setup.config, record.best
  images_per_s, seconds_per_epoch = watch.rates(config.batch_size, plan.steps_per_epoch)
  probs = setup.model.survival_probs()
  results = results_lib.Results.of_run(
      best=best, final=final, config=record.config, steps=int(step),
      finished=plan.finished, timing=watch.snapshot(), seed=config.seed,
      dataset=setup.source.describe(), epochs=plan.epoch(step),
      steps_per_epoch=plan.steps_per_epoch, train_images_per_s=images_per_s,
      seconds_per_epoch=seconds_per_epoch, survival_probs=[float(p) for p in probs],
      expected_depth=survival_lib.expected_depth(probs), num_blocks=len(probs),
      parameters=models.count_params(host_state.params),
      config_changes=record.config_changes)
  writer.write_results(results)
  if best.step is None:
    logging.info("stopped at step %d before any evaluation", step)
  else:
    logging.info("best validation error %s at step %s; test error there %s",
                 results_lib.percent(best.validation_error), best.step,
                 results_lib.percent(best.test_error))
  return Outcome(results, host_state)


def read_results(path: epath.Path) -> results_lib.Results | None:
  """The workdir's results.json, or None if it is missing or damaged."""
  try:
    return results_lib.parse_results((path / "results.json").read_text())
  except (FileNotFoundError, ValueError, UnicodeDecodeError):
    return None


def already_there(setup: setup_lib.Setup, path: epath.Path, step: int, state,
                  evaluations: evaluation.Evaluations, *, record: resume.Record,
                  watch: stopwatch.Stopwatch, writer: writer_lib.RunWriter) -> Outcome:
  """A restart at the step the run stops at: nothing to train. The results are those
  written when it got there; if they are missing, damaged or of another step (it
  stopped between its last checkpoint and its results), they are written again from
  that step's checkpoint, as the run would have written them (`finish`'s arguments)."""
  results = read_results(path)
  if results is not None and results.steps == step:
    logging.info("%s already reached step %d: nothing to do.", path, step)
    return Outcome(results, jax.device_get(jax_utils.unreplicate(state)))
  logging.warning("%s reached step %d but its results.json is %s: writing it from that "
                  "step's checkpoint.", path, step,
                  "missing or damaged" if results is None else "of another step")
  with watch.measure("compile"):
    evaluations.compile(state)
  final = evaluations.final(state, step) if setup.plan.finished else {}
  return finish(setup, step, state, final, record=record, watch=watch, writer=writer)


def finished_before(path: epath.Path, config: ml_collections.ConfigDict) -> Outcome | None:
  """The outcome of a run that already finished training as `config` asks, from its
  results.json alone (no data needed); None otherwise."""
  results = read_results(path)
  if (results is None or not results.finished or results.diverged
      or resume.config_differences(results.config, resume.config_dict(config))):
    return None
  logging.info("%s already reached step %d: nothing to do.", path, results.steps)
  return Outcome(results, None)

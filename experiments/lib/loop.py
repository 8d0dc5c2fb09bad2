"""The training loop of the paper's protocol: train, evaluate, checkpoint, report.

`train_and_evaluate(config, workdir)` runs one config in one workdir, resuming from the
workdir's newest good checkpoint. The loop asks one `Plan` what happens after each call
(log, evaluate, checkpoint, stop); everything else is a function of its own.

What survives faults (each tested):
- SIGTERM/SIGINT (or a preemption notice on any host): a checkpoint at the next step
  boundary, then `errors.Preempted` (exit 75); the restart continues bit-identically.
- A non-finite loss or gradient: `errors.Diverged` (exit 3) naming the first bad step;
  nothing non-finite is saved as a checkpoint or as `best/`.
- A damaged checkpoint: reported and set aside; the next older one is used.
- A restart with different training-relevant settings: refused, naming the fields.
- A second process on the same workdir: refused, naming the holder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import contextlib
import dataclasses
import json
import os
import signal
import threading
import time
from typing import Any

from absl import logging
from flax import jax_utils
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments.lib import checkpoint as checkpoint_lib
from experiments.lib import data as data_lib
from experiments.lib import errors
from experiments.lib import multihost
from experiments.lib import reporting
from experiments.lib import steps as steps_lib
from experiments.lib import workdir as workdir_lib
from sdnet import models
from sdnet import survival as survival_lib


# ------------------------------------------------------------------------------ plan


@dataclasses.dataclass(frozen=True)
class Events:
  log: bool
  evaluate: bool
  checkpoint: bool
  stop: bool

  def __bool__(self) -> bool:
    return self.log or self.evaluate or self.checkpoint or self.stop


@dataclasses.dataclass(frozen=True)
class Plan:
  """The steps of a run and what happens after each: the loop's only schedule.

  `stop_step` is where this process stops (the end of training, or `halt_after_steps`);
  evaluations follow the schedule of the whole run, so a run halted and resumed
  evaluates at exactly the steps an uninterrupted one does.
  """
  steps_per_epoch: int
  total_steps: int
  stop_step: int
  eval_every: int
  log_every: int
  checkpoint_every: int
  steps_per_call: int

  def events(self, step: int) -> Events:
    stop = step == self.stop_step
    return Events(log=step % self.log_every == 0 or step % self.steps_per_epoch == 0 or stop,
                  evaluate=step % self.eval_every == 0 or step == self.total_steps,
                  checkpoint=step % self.checkpoint_every == 0 or stop, stop=stop)

  def chunks(self, start: int) -> list[int]:
    """Steps per call from `start` to `stop_step`: at most steps_per_call, and a call
    never runs across a step with an event."""
    out, step = [], start
    while step < self.stop_step:
      length = 1
      while (length < self.steps_per_call and step + length < self.stop_step
             and not self.events(step + length)):
        length += 1
      out.append(length)
      step += length
    return out

  @property
  def finished(self) -> bool:
    return self.stop_step == self.total_steps


def make_plan(config: ml_collections.ConfigDict, num_train: int) -> Plan:
  per_epoch = data_lib.steps_per_epoch(num_train, config.batch_size)
  total = steps_lib.total_steps(config, per_epoch)
  eval_every = config.eval_every_steps or per_epoch
  stop = min(total, config.halt_after_steps) if config.halt_after_steps else total
  return Plan(per_epoch, total, stop, eval_every, config.log_every_steps or per_epoch,
              config.checkpoint_every_steps or eval_every, max(1, config.steps_per_call))


# -------------------------------------------------------------------- checks up front


def check_config(config: ml_collections.ConfigDict) -> None:
  """Fails before anything long starts on settings that cannot work."""
  devices, processes = jax.device_count(), jax.process_count()
  for name in ("batch_size", "eval_batch_size"):
    value = config[name]
    if not isinstance(value, int) or value < 1:
      raise errors.UserError(f"{name} must be a positive integer, got {value!r}.")
    if value % devices:
      raise errors.UserError(
          f"{name} {value} does not split over {devices} devices: choose a multiple of "
          f"{devices} (e.g. --config.{name}={devices * max(1, value // devices)}).")
  if config.epochs <= 0:
    raise errors.UserError(f"epochs must be positive, got {config.epochs}.")
  if any(not 0 < f < 1 for f in config.lr_drop_fractions):
    raise errors.UserError(
        f"lr_drop_fractions must lie in (0, 1), got {config.lr_drop_fractions}.")
  if config.dtype not in ("float32", "bfloat16", "float16"):
    raise errors.UserError(
        f"dtype must be float32, bfloat16 or float16, got {config.dtype!r}.")
  for name in ("eval_every_steps", "log_every_steps", "checkpoint_every_steps",
               "halt_after_steps", "steps_per_call"):
    if config[name] < 0:
      raise errors.UserError(f"{name} must be >= 0, got {config[name]}.")
  del processes


def build_model(config, num_classes: int, axis_name: str | None = steps_lib.AXIS):
  try:
    return steps_lib.build_model(config, num_classes, axis_name)
  except ValueError as e:
    raise errors.UserError(f"model: {e}") from None


def load_dataset(config: ml_collections.ConfigDict) -> data_lib.Dataset:
  dataset = data_lib.load(config.dataset, config.data_dir or None, seed=config.seed,
                          validation_size=config.validation_size, augment=config.augment)
  data_lib.check(dataset)
  return dataset


# ------------------------------------------------------------------------ evaluation


def evaluate(p_eval, state, split: data_lib.Split, config) -> dict:
  """Loss and error of the replicated `state` on `split` (every example once)."""
  totals = None
  for batch in data_lib.eval_batches(split, config.eval_batch_size, jax.local_device_count(),
                                     jax.process_index(), jax.process_count()):
    sums = p_eval(state, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  return steps_lib.summarize(jax.device_get(jax_utils.unreplicate(totals)))


def evaluate_and_track_best(p_eval, state, dataset, config, best: dict, step: int
                            ) -> tuple[dict, bool]:
  """Validation (and test) metrics at `step`, and whether validation error improved.

  `best` holds the best validation error so far, its step and the test error there
  (the paper's reported number); it is updated in place.
  """
  val = evaluate(p_eval, state, dataset.validation, config)
  record = {"validation/error": val["error"], "validation/loss": val["loss"]}
  improved = best["validation_error"] is None or val["error"] < best["validation_error"]
  test = None
  if dataset.test is not None and (config.test_every_eval or improved):
    test = evaluate(p_eval, state, dataset.test, config)
    record.update({"test/error": test["error"], "test/loss": test["loss"]})
  if improved:
    best.update(validation_error=val["error"], step=int(step),
                test_error=None if test is None else test["error"])
  logging.info("step %d: validation error %s (best %s at step %d)%s", step,
               reporting.percent(val["error"]), reporting.percent(best["validation_error"]),
               best["step"], "" if test is None else
               f", test error {reporting.percent(test['error'])}")
  return record, improved


# ---------------------------------------------------------------------------- timing


class Stopwatch:
  """Splits a run's wall time into train steps, evaluation, checkpoints and compiling.

  Train time is the time between the end of one event's work and the host sync of the
  next event, so it holds train steps (and the input pipeline feeding them) only.
  Totals carry over from the checkpoint a run resumes from.
  """

  def __init__(self, totals: dict | None = None, clock: Callable[[], float] = time.perf_counter):
    self.clock = clock
    self.totals = {"train_s": 0.0, "train_steps": 0, "evaluate_s": 0.0, "checkpoint_s": 0.0,
                   "compile_s": 0.0, "wall_s": 0.0, **(totals or {})}
    self._segment_start = self._mark = clock()
    self._wall_at_start = self.totals["wall_s"]
    self.window_s, self.window_steps = 0.0, 0

  def restart_train_clock(self) -> None:
    self._mark = self.clock()

  def end_train(self, steps: int) -> None:
    """Books the time since the last mark as `steps` train steps (after a host sync)."""
    elapsed = self.clock() - self._mark
    self.totals["train_s"] += elapsed
    self.totals["train_steps"] += steps
    self.window_s += elapsed
    self.window_steps += steps
    self._mark = self.clock()

  def take_window(self) -> tuple[float, int]:
    window = self.window_s, self.window_steps
    self.window_s, self.window_steps = 0.0, 0
    return window

  @contextlib.contextmanager
  def measure(self, what: str) -> Iterator[None]:
    start = self.clock()
    try:
      yield
    finally:
      self.totals[f"{what}_s"] += self.clock() - start
      self._mark = self.clock()

  def snapshot(self) -> dict:
    return {**self.totals,
            "wall_s": self._wall_at_start + self.clock() - self._segment_start}

  def rates(self, batch_size: int, steps_per_epoch: int) -> dict:
    """Images/s and seconds/epoch of the train steps alone (None before any)."""
    t, n = self.totals["train_s"], self.totals["train_steps"]
    if not n or t <= 0:
      return {"train_images_per_s": None, "seconds_per_epoch": None}
    return {"train_images_per_s": n * batch_size / t, "seconds_per_epoch": t / n * steps_per_epoch}


# ------------------------------------------------------------------------- stopping


class StopRequest:
  """Whether the run should checkpoint and stop now, agreed by every host.

  One process: SIGTERM and SIGINT set a flag (a second signal acts as usual). Several
  processes: JAX's preemption service catches SIGTERM on any host and orbax's
  `reached_preemption(step)` answers the same on all of them, so they all save one step;
  a SIGINT is passed on to it as a SIGTERM (a second SIGINT acts as usual).
  """

  def __init__(self, checkpoints: checkpoint_lib.Checkpoints):
    self._checkpoints = checkpoints
    self._signal: str | None = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread():
      return self
    if jax.process_count() == 1:
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    else:
      self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._forward_as_sigterm)
    return self

  def _forward_as_sigterm(self, signum, frame):
    """JAX's preemption notifier listens for SIGTERM only: a SIGINT (Ctrl-C) becomes one."""
    del frame
    logging.warning("SIGINT received: passed on as SIGTERM, so every process saves a "
                    "checkpoint of one step (send it again to stop at once).")
    signal.signal(signum, self._previous.get(signum, signal.default_int_handler))
    os.kill(os.getpid(), signal.SIGTERM)

  def _handle(self, signum, frame):
    del frame
    self._signal = signal.Signals(signum).name
    logging.warning("%s received: saving a checkpoint at the next step boundary "
                    "(send it again to stop at once).", self._signal)
    signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def __call__(self, step: int) -> bool:
    if jax.process_count() > 1:
      return bool(self._checkpoints.latest.reached_preemption(step))
    return self._signal is not None


# ----------------------------------------------------------------------- the run


@dataclasses.dataclass
class Run:
  """What `train_and_evaluate` produced: the results written and the final state."""
  results: dict
  state: Any


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       dataset: data_lib.Dataset | None = None, *,
                       allow_config_change: bool = False,
                       clock: Callable[[], float] = time.perf_counter) -> Run:
  """Trains `config` in `workdir`, resuming from its newest good checkpoint.

  Raises `errors.UserError` for problems the user can fix (before training starts),
  `errors.Preempted` after saving a checkpoint on request, `errors.Diverged` when the
  loss or gradients become non-finite.
  """
  check_config(config)
  path = workdir_lib.resolve(workdir)
  lock = workdir_lib.Lock(path)
  if jax.process_index() == 0:
    lock.acquire()
  # However the run ends, pending checkpoint writes complete before the lock is freed.
  with contextlib.ExitStack() as cleanup:
    cleanup.callback(lock.release)
    return _train_and_evaluate(config, path, dataset, allow_config_change, clock, cleanup)


def _train_and_evaluate(config, path, dataset, allow_config_change, clock, cleanup) -> Run:
  dataset = dataset if dataset is not None else load_dataset(config)
  data_lib.check(dataset, config.eval_batch_size)
  logging.info("data: %s", dataset.describe())
  if dataset.test is None:
    logging.warning("no test split: reporting validation error only.")
  model = build_model(config, dataset.num_classes)
  plan = make_plan(config, len(dataset.train))
  schedule = steps_lib.learning_rate_schedule(config, plan.steps_per_epoch)
  tx = steps_lib.make_optimizer(config, schedule)
  probs = model.survival_probs()
  logging.info("model: %s-%d, %d blocks, expected depth %.2f, skip=%s; %d steps "
               "(%d/epoch)", config.model.family, config.model.depth, model.num_blocks,
               survival_lib.expected_depth(probs), model.stage_skip(), plan.total_steps,
               plan.steps_per_epoch)

  checkpoints = cleanup.enter_context(checkpoint_lib.Checkpoints(path))
  state = jax.device_get(steps_lib.create_train_state(
      model, tx, dataset.train.images.shape[1:], config.seed))
  record = new_record(config)
  restored = resume(checkpoints, state, config, allow_config_change)
  start_step = multihost.agree_on_start_step(restored[0] if restored else 0)
  if restored:
    _, state, record = restored
    logging.info("resumed from step %d", start_step)
    if start_step >= plan.stop_step:
      return already_done(path, state, record, start_step)
  watch = Stopwatch(record["timing"], clock)
  reporter = cleanup.enter_context(reporting.Reporter(
      path, enabled=jax.process_index() == 0, start_step=start_step))
  if jax.process_index() == 0:
    workdir_lib.write_text_atomic(path / "config.json",
                                  json.dumps(record["config"], indent=2, sort_keys=True))

  devices = jax.local_device_count()
  p_train = steps_lib.make_train_step(model, tx, seed=config.seed,
                                      mean_image=dataset.mean_image, std=dataset.std,
                                      augment=dataset.augment)
  p_eval = steps_lib.make_eval_step(build_model(config, dataset.num_classes, None),
                                    mean_image=dataset.mean_image, std=dataset.std)
  state = jax_utils.replicate(state)
  metrics = jax_utils.replicate(steps_lib.empty_metrics())
  chunks = plan.chunks(start_step)
  with watch.measure("compile"):
    compiled = compile_train_steps(p_train, state, metrics, set(chunks), dataset, config)
    if jax.process_count() == 1:  # else compiled on first call (see compile_train_steps)
      p_eval = steps_lib.compile_ahead(p_eval, state, next(data_lib.eval_batches(
          dataset.validation, config.eval_batch_size, devices, jax.process_index(),
          jax.process_count())))[0]
  logging.info("compiled in %.1f s", watch.totals["compile_s"])

  pipeline_rate = pipeline_images_per_s(dataset, config, devices)
  logging.info("input pipeline alone: %.0f images/s", pipeline_rate)
  batches = jax_utils.prefetch_to_device(data_lib.train_batches(
      dataset.train, config.seed, config.batch_size, start_step, chunks, devices,
      jax.process_index(), jax.process_count()), 2)
  step, synced_step = start_step, start_step
  watch.restart_train_clock()
  with StopRequest(checkpoints) as stop_requested:
    for length, batch in zip(chunks, batches):
      state, metrics = compiled[length](state, batch, metrics)
      step += length
      events, stopping = plan.events(step), stop_requested(step)
      if not (events or stopping):
        continue
      totals = jax.device_get(jax_utils.unreplicate(metrics))  # the one sync per event
      watch.end_train(step - synced_step)
      synced_step = step
      check_finite(totals, step, path, reporter, record, watch)
      if events.log:
        log_window(reporter, watch, totals, plan, schedule, step, config.batch_size)
        metrics = jax_utils.replicate(steps_lib.empty_metrics())
      if events.evaluate:
        with watch.measure("evaluate"):
          evaluation, improved = evaluate_and_track_best(p_eval, state, dataset, config,
                                                         record["best"], step)
          reporter.write(step, {**evaluation, "epoch": step / plan.steps_per_epoch})
        if improved:
          with watch.measure("checkpoint"):
            save(checkpoints, state, record, watch, step, best=True)
      if events.checkpoint or stopping:
        with watch.measure("checkpoint"):
          save(checkpoints, state, record, watch, step)
        reporter.flush()
      if stopping and not events.stop:
        raise errors.Preempted(step)

  final = {}
  if plan.finished:
    with watch.measure("evaluate"):
      final["final_validation_error"] = evaluate(p_eval, state, dataset.validation,
                                                 config)["error"]
      if dataset.test is not None:
        final["final_test_error"] = evaluate(p_eval, state, dataset.test, config)["error"]
  final_state = jax.device_get(jax_utils.unreplicate(state))
  results = {**final_results(record, plan, step, watch, dataset, model, final_state, config),
             **final, "pipeline_images_per_s": pipeline_rate}
  reporter.results(results)
  logging.info("%s", summary_line(results))
  return Run(results, final_state)


def compile_train_steps(p_train, state, metrics, lengths, dataset, config) -> dict:
  """The train step compiled ahead of time for every call length the plan uses.

  On several processes JAX's pmap cannot run an ahead-of-time compiled step on this
  process's (host-local) arrays: there each length maps to the pmapped step itself,
  which compiles on its first call (its compile time is then booked as train time).
  """
  if jax.process_count() > 1:
    return {length: p_train for length in lengths}
  devices = jax.local_device_count()
  per_device = config.batch_size // jax.process_count() // devices
  image_shape = dataset.train.images.shape[1:]
  compiled = {}
  for length in sorted(lengths):
    shape = (devices, length, per_device)
    batch = {"images": jax.ShapeDtypeStruct(shape + image_shape, np.uint8),
             "labels": jax.ShapeDtypeStruct(shape, np.int32)}
    compiled[length] = steps_lib.compile_ahead(p_train, state, batch, metrics)[0]
  return compiled


def pipeline_images_per_s(dataset, config, devices: int, repeats: int = 20) -> float:
  """Throughput of the input pipeline alone: host gather + transfer to the devices."""
  chunks = [max(1, config.steps_per_call)] * repeats
  batches = data_lib.train_batches(dataset.train, config.seed, config.batch_size, 0, chunks,
                                   devices, jax.process_index(), jax.process_count())
  start = time.perf_counter()
  for batch in jax_utils.prefetch_to_device(batches, 2):
    jax.block_until_ready(batch)
  return sum(chunks) * config.batch_size / (time.perf_counter() - start)


def new_record(config) -> dict:
  """What a checkpoint carries besides the state: the run's config, best validation
  result, timing and config changes."""
  return {"config": workdir_lib.config_dict(config), "seed": config.seed,
          "best": {"validation_error": None, "step": None, "test_error": None},
          "timing": {}, "config_changes": []}


def resume(checkpoints, template, config, allow_config_change: bool):
  """(step, state, record) of the newest good checkpoint, or None to start afresh."""
  current = workdir_lib.config_dict(config)
  changes: list = []

  def check_meta(meta: dict) -> None:
    differences = workdir_lib.config_differences(meta["config"], current)
    if differences and not allow_config_change:
      listed = "; ".join(f"{f}: {old!r} -> {new!r}" for f, old, new in differences)
      raise errors.UserError(
          f"{checkpoints.workdir} holds a run with other settings ({listed}). Use a new "
          "--workdir, or pass --allow_config_change to continue this run with the new "
          "settings (the change is recorded in results.json).")
    changes[:] = differences

  restored = checkpoints.restore_newest_good(template, check_meta)
  if restored is None:
    return None
  step, state, meta = restored
  record = {**new_record(config), **{k: meta[k] for k in ("best", "timing",
                                                          "config_changes") if k in meta}}
  record["config_changes"] = record["config_changes"] + [
      {"step": step, "field": f, "from": old, "to": new} for f, old, new in changes]
  return step, state, record


def save(checkpoints, state, record, watch, step: int, best: bool = False) -> None:
  host_state = jax.device_get(jax_utils.unreplicate(state))
  if not all(np.all(np.isfinite(a)) for a in jax.tree.leaves(host_state)
             if np.issubdtype(a.dtype, np.floating)):
    raise errors.Diverged(step, f"training diverged: the state at step {step} is not "
                          "finite; it was not saved.")
  record["timing"] = watch.snapshot()
  checkpoints.save(step, host_state, record, best=best)


def check_finite(totals, step, path, reporter, record, watch) -> None:
  """Stops the run (`errors.Diverged`) if any step since the last check was non-finite,
  before anything of it is saved."""
  bad = int(totals["first_nonfinite_step"])
  if bad == steps_lib.NO_NONFINITE_STEP:
    return
  message = (f"training diverged: the loss or a gradient is not finite at step {bad}. "
             f"Checkpoints and best/ keep the last finite state; lower the learning rate "
             "or check the data, then start again in a new workdir.")
  reporter.results({"diverged": True, "diverged_at_step": bad, "finished": False,
                    "steps": step, "config": record["config"], "timing": watch.snapshot(),
                    "best_validation_error": record["best"]["validation_error"]})
  raise errors.Diverged(bad, message)


def log_window(reporter, watch, totals, plan, schedule, step, batch_size) -> None:
  """The progress line and the train metrics of the steps since the last log."""
  seconds, steps = watch.take_window()
  window = steps_lib.summarize(totals)
  rate = steps * batch_size / seconds if seconds > 0 else float("nan")
  lr = float(schedule(step - 1))
  remaining = (plan.total_steps - step) * seconds / steps if steps else 0.0
  logging.info("epoch %.2f/%d  step %d/%d  loss %.4f  train error %s  lr %.4g  %.0f img/s"
               "  ETA %s", step / plan.steps_per_epoch, round(plan.total_steps /
                                                              plan.steps_per_epoch),
               step, plan.total_steps, window["loss"], reporting.percent(window["error"]),
               lr, rate, reporting.format_duration(remaining))
  reporter.write(step, {"train/loss": window["loss"], "train/error": window["error"],
                        "train/learning_rate": lr, "train/images_per_s": rate,
                        "train/first_block_grad_abs": window["first_block_grad_abs"],
                        "train/steps": steps,
                        "epoch": step / plan.steps_per_epoch,
                        **{f"timing/{name}": value
                           for name, value in watch.snapshot().items()}})


def final_results(record, plan, step, watch, dataset, model, final_state, config) -> dict:
  timing = watch.snapshot()
  best = record["best"]
  return {"config": record["config"], "seed": config.seed, "dataset": dataset.describe(),
          "steps": int(step), "epochs": step / plan.steps_per_epoch,
          "steps_per_epoch": plan.steps_per_epoch, "finished": plan.finished,
          "timing": timing, "wall_time_s": timing["wall_s"],
          **watch.rates(config.batch_size, plan.steps_per_epoch),
          "best_validation_error": best["validation_error"],
          "best_validation_step": best["step"],
          "test_error_at_best_validation": best["test_error"],
          "survival_probs": [float(p) for p in model.survival_probs()],
          "expected_depth": survival_lib.expected_depth(model.survival_probs()),
          "num_blocks": model.num_blocks,
          "parameters": models.count_params(final_state.params),
          "config_changes": record["config_changes"]}


def already_done(path, state, record, step) -> Run:
  """A restart of a run that already reached its stop step: nothing to train, nothing
  rewritten; the results are those written when it got there."""
  results_path = path / "results.json"
  results = json.loads(results_path.read_text()) if results_path.exists() else {
      "steps": step, "timing": record["timing"]}
  logging.info("%s already reached step %d: nothing to do.", path, step)
  return Run(results, state)


def summary_line(results: dict) -> str:
  return (f"best validation error {reporting.percent(results['best_validation_error'])} "
          f"at step {results['best_validation_step']}; test error there "
          f"{reporting.percent(results['test_error_at_best_validation'])}")

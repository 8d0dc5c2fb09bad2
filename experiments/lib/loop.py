"""The training loop of the paper's protocol: train, evaluate, checkpoint, report.

`train_and_evaluate(config, workdir)` runs one config in one workdir, resuming from the
workdir's newest good checkpoint. The state of the run is one `Training` object whose
methods are its events; the loop asks one `Plan` what happens after each call (log,
evaluate, checkpoint, stop).

What survives faults (each tested):
- SIGTERM/SIGINT (or a preemption notice on any host): a checkpoint at the next step
  boundary, then `errors.Preempted` (exit 75); the restart continues bit-identically.
- A non-finite loss or gradient: `errors.Diverged` (exit 3) naming the first bad step;
  nothing non-finite is saved as a checkpoint or as `best/`.
- A damaged checkpoint: reported and set aside; the next older one is used.
- A restart with different training-relevant settings, or other data: refused, naming
  the fields; processes of one run with different settings or data: refused, naming
  the processes.
- A stop after the last checkpoint: the restart writes the results from it.
- A second process on the same workdir: refused, naming the holder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import contextlib
import dataclasses
import json
import math
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
from experiments.lib import steps as steps_lib
from experiments.lib import workdir as workdir_lib
from experiments.lib import writer
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
  devices = jax.device_count()
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
  ranges = {  # name: (lowest, highest, whether the lowest is allowed)
      "learning_rate": (0.0, math.inf, False), "warmup_learning_rate": (0.0, math.inf, False),
      "lr_drop_factor": (0.0, 1.0, False), "momentum": (0.0, 1.0, True),
      "weight_decay": (0.0, 1.0, True), "warmup_epochs": (0.0, config.epochs, True)}
  for name, (low, high, low_allowed) in ranges.items():
    value = config[name]
    if not (isinstance(value, (int, float)) and math.isfinite(value)
            and (low <= value if low_allowed else low < value) and value <= high):
      raise errors.UserError(
          f"{name} must be a finite number in {'[' if low_allowed else '('}{low:g}, "
          f"{high:g}{')' if math.isinf(high) else ']'}, got {value!r}.")
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


def build_model(config, num_classes: int, axis_name: str | None = steps_lib.AXIS):
  try:
    return steps_lib.build_model(config, num_classes, axis_name)
  except ValueError as e:
    raise errors.UserError(f"model: {e}") from None


def load_dataset(config: ml_collections.ConfigDict) -> data_lib.Dataset:
  return data_lib.load(config.dataset, config.data_dir or None, seed=config.seed,
                       validation_size=config.validation_size, augment=config.augment)


# ------------------------------------------------------------------------ evaluation


def eval_batches(split: data_lib.Split, config):
  """This process's evaluation batches of `split` (every example once over all hosts)."""
  return data_lib.eval_batches(split, config.eval_batch_size, jax.local_device_count(),
                               jax.process_index(), jax.process_count())


def evaluate(p_eval, state, split: data_lib.Split, config) -> dict:
  """Loss and error of the replicated `state` on `split` (every example once)."""
  totals = None
  for batch in eval_batches(split, config):
    sums = p_eval(state, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  return steps_lib.summarize(jax.device_get(jax_utils.unreplicate(totals)))


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

  def __init__(self):
    self.checkpoints: checkpoint_lib.Checkpoints | None = None  # set once the run has them
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
      return bool(self.checkpoints.latest.reached_preemption(step))
    return self._signal is not None


# ----------------------------------------------------------------------- the run


@dataclasses.dataclass
class Best:
  """The best validation error so far, its step, and the test error there (the paper's
  reported number)."""
  validation_error: float | None = None
  step: int | None = None
  test_error: float | None = None


@dataclasses.dataclass
class Record:
  """What a checkpoint carries besides the state: the run's config, its best validation
  result, timing totals and the config changes it went through."""
  config: dict
  seed: int
  best: Best = dataclasses.field(default_factory=Best)
  timing: dict = dataclasses.field(default_factory=dict)
  config_changes: list = dataclasses.field(default_factory=list)
  data: dict | None = None  # the training data's identity (`data.Dataset.identity`)

  @classmethod
  def new(cls, config: ml_collections.ConfigDict, data: dict) -> Record:
    return cls(workdir_lib.config_dict(config), config.seed, data=data)

  @classmethod
  def resumed(cls, config, data: dict, meta: dict, step: int, changes) -> Record:
    """The record of a checkpoint's `meta`, for the current `config` and `data`
    (`changes`: the fields that differ from the checkpoint's, allowed)."""
    return cls(workdir_lib.config_dict(config), config.seed,
               Best(**meta.get("best", {})), dict(meta.get("timing", {})),
               list(meta.get("config_changes", [])) + [
                   {"step": step, "field": f, "from": old, "to": new}
                   for f, old, new in changes], data)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class Outcome:
  """What `train_and_evaluate` produced: the results written and the final state."""
  results: dict
  state: Any


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       dataset: data_lib.Dataset | None = None, *,
                       allow_config_change: bool = False,
                       clock: Callable[[], float] = time.perf_counter) -> Outcome:
  """Trains `config` in `workdir`, resuming from its newest good checkpoint.

  Raises `errors.UserError` for problems the user can fix (before training starts),
  `errors.Preempted` after saving a checkpoint on request, `errors.Diverged` when the
  loss or gradients become non-finite.
  """
  check_config(config)
  path = workdir_lib.resolve(workdir)
  lock = workdir_lib.Lock(path)
  # Signals are handled from taking the lock until the last write is done: one while
  # loading or compiling stops the run after its first call; one after the last
  # checkpoint lets it finish writing the results (seconds) and end as if it came later.
  # However the run ends, pending checkpoint writes complete before the lock is freed.
  with StopRequest() as stop_requested, contextlib.ExitStack() as cleanup:
    if jax.process_index() == 0:
      lock.acquire()
    cleanup.callback(lock.release)
    run = Training(config, path, dataset, allow_config_change, clock, cleanup)
    stop_requested.checkpoints = run.checkpoints
    if run.start_step >= run.plan.stop_step:
      return run.already_done()
    run.compile()
    for length, batch in zip(run.chunks, run.batches()):
      run.train(length, batch)
      events, stopping = run.plan.events(run.step), stop_requested(run.step)
      if not (events or stopping):
        continue
      totals = run.sync()
      run.check_finite(totals)
      if events.log:
        run.log(totals)
      if events.evaluate and run.evaluate():
        run.checkpoint(best=True)
      if events.checkpoint or stopping:
        run.checkpoint()
      if stopping and not events.stop:
        raise errors.Preempted(run.step)
    return run.finish()


class Training:
  """One run of one config in one workdir: its data, model, plan, compiled steps,
  checkpoints, writer, stopwatch and record; its methods are the run's events."""

  def __init__(self, config, path, dataset, allow_config_change, clock, cleanup):
    self.config, self.path = config, path
    self.dataset = dataset if dataset is not None else load_dataset(config)
    data_lib.check(self.dataset, config.eval_batch_size)
    logging.info("data: %s", self.dataset.describe())
    data = self.dataset.identity()
    # Every host trains the same thing (its data_dir may be a local copy of its own).
    multihost.agree_on({**{f"setting {k}": v for k, v in workdir_lib.flatten(
        workdir_lib.config_dict(config)).items() if k != "data_dir"},
                        **{f"data {k}": v for k, v in data.items() if k != "name"}})
    if self.dataset.test is None:
      logging.warning("no test split: reporting validation error only.")
    self.model = build_model(config, self.dataset.num_classes)
    self.plan = make_plan(config, len(self.dataset.train))
    self.schedule = steps_lib.learning_rate_schedule(config, self.plan.steps_per_epoch)
    self.tx = steps_lib.make_optimizer(config, self.schedule)
    probs = self.model.survival_probs()
    logging.info("model: %s-%d, %d blocks, expected depth %.2f, skip=%s; %d steps "
                 "(%d/epoch)", config.model.family, config.model.depth,
                 self.model.num_blocks, survival_lib.expected_depth(probs),
                 self.model.stage_skip() if min(probs) < 1 else "none (every p_l = 1)",
                 self.plan.total_steps, self.plan.steps_per_epoch)

    self.checkpoints = cleanup.enter_context(checkpoint_lib.Checkpoints(path))
    state = jax.device_get(steps_lib.create_train_state(
        self.model, self.tx, self.dataset.train.images.shape[1:], config.seed))
    self.record = Record.new(config, data)
    restored = resume(self.checkpoints, state, config, data, allow_config_change)
    self.start_step = multihost.agree_on_start_step(restored[0] if restored else 0)
    if restored:
      _, state, self.record = restored
      logging.info("resumed from step %d", self.start_step)
    self.step = self._synced_step = self.start_step
    self.state = state
    self.last_evaluation: dict = {}
    self.watch = Stopwatch(self.record.timing, clock)
    self.writer = cleanup.enter_context(writer.RunWriter(
        path, enabled=jax.process_index() == 0, start_step=self.start_step))
    if jax.process_index() == 0:
      workdir_lib.write_text_atomic(path / "config.json",
                                    json.dumps(self.record.config, indent=2, sort_keys=True))
    self.chunks = self.plan.chunks(self.start_step)

  # -------------------------------------------------------------- compiling, training

  def compile(self, train: bool = True) -> None:
    """The eval step and (with `train`) the train step for every call length of the
    plan, compiled ahead of time (on one process; see compile_train_steps)."""
    config, dataset = self.config, self.dataset
    self.p_eval = steps_lib.make_eval_step(
        build_model(config, dataset.num_classes, None), mean_image=dataset.mean_image,
        std=dataset.std)
    self.state = jax_utils.replicate(self.state)
    self.metrics = jax_utils.replicate(steps_lib.empty_metrics())
    with self.watch.measure("compile"):
      if train:
        p_train = steps_lib.make_train_step(self.model, self.tx, seed=config.seed,
                                            mean_image=dataset.mean_image, std=dataset.std,
                                            augment=dataset.augment)
        self.compiled = compile_train_steps(p_train, self.state, self.metrics,
                                            set(self.chunks), dataset, config)
      if jax.process_count() == 1:  # else compiled on first call (see compile_train_steps)
        self.p_eval = steps_lib.compile_ahead(self.p_eval, self.state, next(
            eval_batches(dataset.validation, config)))[0]
    logging.info("compiled in %.1f s", self.watch.totals["compile_s"])

  def batches(self):
    """The rest of the plan's batches, prefetched to the devices; starts the train clock."""
    batches = jax_utils.prefetch_to_device(data_lib.train_batches(
        self.dataset.train, self.config.seed, self.config.batch_size, self.start_step,
        self.chunks, jax.local_device_count(), jax.process_index(), jax.process_count()), 2)
    self.watch.restart_train_clock()
    return batches

  def train(self, length: int, batch) -> None:
    self.state, self.metrics = self.compiled[length](self.state, batch, self.metrics)
    self.step += length

  def sync(self) -> dict:
    """The train metrics since the last log, on the host (the one sync per event)."""
    totals = jax.device_get(jax_utils.unreplicate(self.metrics))
    self.watch.end_train(self.step - self._synced_step)
    self._synced_step = self.step
    return totals

  # ------------------------------------------------------------------------ events

  def check_finite(self, totals) -> None:
    """Stops the run (`errors.Diverged`) if any step since the last check was
    non-finite, before anything of it is saved."""
    bad = int(totals["first_nonfinite_step"])
    if bad == steps_lib.NO_NONFINITE_STEP:
      return
    message = (f"training diverged: the loss or a gradient is not finite at step {bad}. "
               "Checkpoints and best/ keep the last finite state; lower the learning rate "
               "or check the data, then start again in a new workdir.")
    self.writer.results({"diverged": True, "diverged_at_step": bad, "finished": False,
                           "steps": self.step, "config": self.record.config,
                           "timing": self.watch.snapshot(),
                           "best_validation_error": self.record.best.validation_error})
    raise errors.Diverged(bad, message)

  def log(self, totals) -> None:
    """The progress line and the train metrics of the steps since the last log."""
    plan, step = self.plan, self.step
    seconds, steps = self.watch.take_window()
    window = steps_lib.summarize(totals)
    rate = steps * self.config.batch_size / seconds if seconds > 0 else float("nan")
    lr = float(self.schedule(step - 1))
    remaining = (plan.total_steps - step) * seconds / steps if steps else 0.0
    logging.info("epoch %.2f/%d  step %d/%d  loss %.4f  train error %s  lr %.4g  %.0f img/s"
                 "  ETA %s", step / plan.steps_per_epoch,
                 round(plan.total_steps / plan.steps_per_epoch), step, plan.total_steps,
                 window["loss"], writer.percent(window["error"]), lr, rate,
                 writer.format_duration(remaining))
    self.writer.write(step, {
        "train/loss": window["loss"], "train/error": window["error"],
        "train/learning_rate": lr, "train/images_per_s": rate,
        "train/first_block_grad_abs": window["first_block_grad_abs"],
        "train/steps": steps, "train/seconds": seconds,
        "epoch": step / plan.steps_per_epoch,
        **{f"timing/{name}": value for name, value in self.watch.snapshot().items()}})
    self.metrics = jax_utils.replicate(steps_lib.empty_metrics())

  def evaluate(self) -> bool:
    """Validation (and test: at every evaluation with test_every_eval, else at new bests)
    metrics of the current state, written and remembered; whether validation improved."""
    config, best, step = self.config, self.record.best, self.step
    with self.watch.measure("evaluate"):
      val = evaluate(self.p_eval, self.state, self.dataset.validation, config)
      written = {"validation/error": val["error"], "validation/loss": val["loss"]}
      improved = best.validation_error is None or val["error"] < best.validation_error
      test = None
      if self.dataset.test is not None and (config.test_every_eval or improved):
        test = evaluate(self.p_eval, self.state, self.dataset.test, config)
        written.update({"test/error": test["error"], "test/loss": test["loss"]})
      if improved:
        self.record.best = Best(val["error"], int(step),
                                None if test is None else test["error"])
      logging.info("step %d: validation error %s (best %s at step %d)%s", step,
                   writer.percent(val["error"]),
                   writer.percent(self.record.best.validation_error),
                   self.record.best.step, "" if test is None else
                   f", test error {writer.percent(test['error'])}")
      self.writer.write(step, {**written, "epoch": step / self.plan.steps_per_epoch})
    self.last_evaluation = {"step": step, **written}
    return improved

  def checkpoint(self, best: bool = False) -> None:
    """Saves the state (as the newest checkpoint, or as best/) with the record; never a
    non-finite state."""
    with self.watch.measure("checkpoint"):
      host_state = jax.device_get(jax_utils.unreplicate(self.state))
      if not all(np.all(np.isfinite(a)) for a in jax.tree.leaves(host_state)
                 if np.issubdtype(a.dtype, np.floating)):
        raise errors.Diverged(self.step, f"training diverged: the state at step "
                              f"{self.step} is not finite; it was not saved.")
      self.record.timing = self.watch.snapshot()
      self.checkpoints.save(self.step, host_state, self.record.to_json(), best=best)
    if not best:
      self.writer.flush()

  # ------------------------------------------------------------------------ results

  def finish(self) -> Outcome:
    """Writes results.json: the final errors are the last evaluation's (the plan
    evaluates at the last step), test evaluated once more only if that one skipped it."""
    final = {}
    if self.plan.finished:
      last = self.last_evaluation
      if last.get("step") != self.step:  # restarted after the last step's evaluation
        last = self.last_evaluation = {"step": self.step, "validation/error": evaluate(
            self.p_eval, self.state, self.dataset.validation, self.config)["error"]}
      final["final_validation_error"] = last["validation/error"]
      if self.dataset.test is not None:
        if "test/error" not in last:
          with self.watch.measure("evaluate"):
            last["test/error"] = evaluate(self.p_eval, self.state, self.dataset.test,
                                          self.config)["error"]
        final["final_test_error"] = last["test/error"]
    final_state = jax.device_get(jax_utils.unreplicate(self.state))
    results = {**self.results(final_state), **final}
    self.writer.results(results)
    logging.info("%s", summary_line(results))
    return Outcome(results, final_state)

  def results(self, final_state) -> dict:
    plan, config, best = self.plan, self.config, self.record.best
    timing = self.watch.snapshot()
    probs = self.model.survival_probs()
    return {"config": self.record.config, "seed": config.seed,
            "dataset": self.dataset.describe(), "steps": int(self.step),
            "epochs": self.step / plan.steps_per_epoch,
            "steps_per_epoch": plan.steps_per_epoch, "finished": plan.finished,
            "timing": timing, "wall_time_s": timing["wall_s"],
            **self.watch.rates(config.batch_size, plan.steps_per_epoch),
            "best_validation_error": best.validation_error,
            "best_validation_step": best.step,
            "test_error_at_best_validation": best.test_error,
            "survival_probs": [float(p) for p in probs],
            "expected_depth": survival_lib.expected_depth(probs),
            "num_blocks": self.model.num_blocks,
            "parameters": models.count_params(final_state.params),
            "config_changes": self.record.config_changes}

  def already_done(self) -> Outcome:
    """A restart of a run that already reached its stop step: nothing to train. The
    results are those written when it got there; if they are missing, damaged or of
    another step (it stopped between its last checkpoint and its results), they are
    written again from that checkpoint, as the run would have written them."""
    results_path = self.path / "results.json"
    try:
      results = json.loads(results_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
      results = None
    if isinstance(results, dict) and results.get("steps") == self.start_step:
      logging.info("%s already reached step %d: nothing to do.", self.path,
                   self.start_step)
      return Outcome(results, self.state)
    logging.warning("%s reached step %d but its results.json is %s: writing it from that "
                    "step's checkpoint.", self.path, self.start_step,
                    "missing" if results is None else "of another step")
    self.compile(train=False)
    return self.finish()


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


def resume(checkpoints, template, config, data: dict, allow_config_change: bool):
  """(step, state, record) of the newest good checkpoint, or None to start afresh."""
  current = workdir_lib.config_dict(config)
  changes: list = []

  def check_meta(meta: dict) -> None:
    differences = workdir_lib.config_differences(meta["config"], current)
    if meta.get("data") is not None:  # checkpoints of older versions have none
      differences += [(f"data.{k}", meta["data"].get(k), v) for k, v in data.items()
                      if k != "name" and meta["data"].get(k) != v]
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
  return step, state, Record.resumed(config, data, meta, step, changes)


def summary_line(results: dict) -> str:
  return (f"best validation error {writer.percent(results['best_validation_error'])} "
          f"at step {results['best_validation_step']}; test error there "
          f"{writer.percent(results['test_error_at_best_validation'])}")

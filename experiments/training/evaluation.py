"""Evaluating the replicated train state on a source's splits, every example once."""

from __future__ import annotations

from absl import logging
from flax import jax_utils
import jax
import jax.numpy as jnp

from experiments import results as results_lib
from experiments.data import Shard
from experiments.data import Source
from experiments.training import resume
from experiments.training import steps
from experiments.training import stopwatch
from experiments.training import writer as writer_lib
from experiments.training.setup import Setup


class Evaluator:
  """The pmapped eval step of `model` on `source`'s splits, in batches of `batch_size`
  over all processes (`Shard.of_this_process`)."""

  def __init__(self, model, source: Source, batch_size: int, top5: bool = False):
    self.source, self.batch_size = source, batch_size
    self.shard = Shard.of_this_process()
    self.step = steps.make_eval_step(model, preprocess=source.preprocess, top5=top5)

  def compile(self, state) -> None:
    """Compiles the step ahead of time for replicated `state` (several processes compile
    it at its first call instead: `setup.compile_train_steps` says why)."""
    if jax.process_count() == 1:
      _, per_device = self.shard.rows(self.batch_size)
      spec = self.source.batch_spec((self.shard.devices, per_device), train=False)
      self.step = steps.compile_ahead(self.step, state, spec)[0]

  def __call__(self, state, split: str) -> dict:
    """`steps.summarize` of `split`: mean loss and error (and top-5 error)."""
    totals = None  # per device
    for batch in self.source.eval_batches(split, self.batch_size, self.shard):
      sums = self.step(state, batch)
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    return steps.summarize(jax.device_get(jax_utils.unreplicate(
        steps.sum_over_devices(totals))))


class Evaluations:
  """The run's evaluations: validation at every evaluation event (and test: at every
  one with `test_every_eval`, else at new bests), written and remembered; the best
  validation result kept in the record that checkpoints carry."""

  def __init__(self, setup: Setup, record: resume.Record, writer: writer_lib.RunWriter,
               watch: stopwatch.Stopwatch):
    self.setup, self.record, self.writer, self.watch = setup, record, writer, watch
    self.evaluate = Evaluator(setup.eval_model, setup.source, setup.config.eval_batch_size,
                              top5=setup.top5)
    self.has_test = "test" in setup.source.evaluation_splits
    self.last: dict[str, dict] = {}  # split: summary, at `last_step`
    self.last_step: int | None = None

  def compile(self, state) -> None:
    self.evaluate.compile(state)

  def __call__(self, state, step: int) -> bool:
    """Evaluates `state` at `step`; whether validation improved on the best."""
    best = self.record.best
    with self.watch.measure("evaluate"):
      summaries = {"validation": self.evaluate(state, "validation")}
      error = summaries["validation"]["error"]
      improved = best.validation_error is None or error < best.validation_error
      if self.has_test and (self.setup.config.test_every_eval or improved):
        summaries["test"] = self.evaluate(state, "test")
      if improved:
        self.record.best = results_lib.Best(
            error, int(step), summaries.get("test", {}).get("error"),
            summaries["validation"].get("top5_error"))
      self.writer.write_metrics(step, results_lib.evaluation_record(
          self.setup.plan.epoch(step), summaries))
    best = self.record.best
    logging.info("step %d: validation error %s (best %s at step %d)%s", step,
                 results_lib.percent(error), results_lib.percent(best.validation_error),
                 best.step, "" if "test" not in summaries else
                 f", test error {results_lib.percent(summaries['test']['error'])}")
    self.last, self.last_step = summaries, step
    return improved

  def final(self, state, step: int) -> dict[str, dict]:
    """The summaries of every split at the last step: the last evaluation's (the plan
    evaluates there), with what it skipped evaluated now."""
    if self.last_step != step:  # restarted after the last step's evaluation
      self.last, self.last_step = {}, step
    with self.watch.measure("evaluate"):
      for split in self.setup.source.evaluation_splits:
        if split not in self.last:
          self.last[split] = self.evaluate(state, split)
    return self.last

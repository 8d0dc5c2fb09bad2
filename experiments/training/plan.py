"""The steps of a run and what happens after each: the training loop's only schedule."""

from __future__ import annotations

import dataclasses

import ml_collections

from experiments.data import batching
from experiments.training import recipe


@dataclasses.dataclass(frozen=True)
class Events:
  """What the loop does after a step: log the train window, evaluate, checkpoint, stop."""
  log: bool
  evaluate: bool
  checkpoint: bool
  stop: bool

  def __bool__(self) -> bool:
    return self.log or self.evaluate or self.checkpoint or self.stop


@dataclasses.dataclass(frozen=True)
class Plan:
  """When a run logs, evaluates, checkpoints and stops.

  Every event is a function of the step in the whole run's schedule: a run halted
  (`halt_after_steps`, a signal) and resumed logs, evaluates and checkpoints at exactly
  the steps an uninterrupted one does. A stop is no log event: the train window it
  interrupts is saved with the checkpoint and completed after the restart.
  """
  steps_per_epoch: int
  total_steps: int
  stop_step: int  # where this process stops: the end, or halt_after_steps
  eval_every: int
  log_every: int
  checkpoint_every: int
  steps_per_call: int

  @classmethod
  def of(cls, config: ml_collections.ConfigDict, num_train: int) -> Plan:
    per_epoch = batching.steps_per_epoch(num_train, config.batch_size)
    total = recipe.total_steps(config, per_epoch)
    eval_every = config.eval_every_steps or per_epoch
    stop = min(total, config.halt_after_steps) if config.halt_after_steps else total
    return cls(per_epoch, total, stop, eval_every, config.log_every_steps or per_epoch,
               config.checkpoint_every_steps or eval_every, max(1, config.steps_per_call))

  def events(self, step: int) -> Events:
    stop = step == self.stop_step
    return Events(log=step % self.log_every == 0 or step % self.steps_per_epoch == 0,
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
    """Whether this process's stop is the end of training."""
    return self.stop_step == self.total_steps

  def epoch(self, step: int) -> float:
    return step / self.steps_per_epoch

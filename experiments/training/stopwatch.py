"""A run's wall time split into train steps, input waits, evaluation, checkpoints, compiling."""

from __future__ import annotations

from collections.abc import Callable, Iterator
import contextlib
import dataclasses
import time

from experiments import results as results_lib


@dataclasses.dataclass
class Window:
  """The train steps since the last log: their seconds, count, and the seconds of it
  the loop waited for the next batch from the input pipeline."""
  seconds: float = 0.0
  steps: int = 0
  input_wait_s: float = 0.0


class Stopwatch:
  """Train time is the time between the end of one event's work and the host sync of the
  next event, so it holds train steps (and the input pipeline feeding them) only; the
  part of it spent waiting for input is also counted apart. Totals carry over from the
  checkpoint a run resumes from, and so does the window a stop interrupted.
  """

  def __init__(self, start_step: int = 0, totals: dict | None = None,
               window: Window | None = None, clock: Callable[[], float] = time.perf_counter):
    self.clock = clock
    self._step = start_step
    self.totals = results_lib.Timing.of(totals)
    self.window = window or Window()
    self._segment_start = self._mark = clock()
    self._wall_at_start = self.totals.wall_s
    self.last_s = 0.0

  def restart_train_clock(self) -> None:
    self._mark = self.clock()

  def end_train(self, step: int) -> None:
    """Books the time since the last mark as the train steps up to `step` (after a host
    sync)."""
    elapsed, steps = self.clock() - self._mark, step - self._step
    self.totals.train_s += elapsed
    self.totals.train_steps += steps
    self.window.seconds += elapsed
    self.window.steps += steps
    self._mark, self._step = self.clock(), step

  @contextlib.contextmanager
  def waiting_for_input(self) -> Iterator[None]:
    """Counts the time inside as input wait (it stays train time)."""
    start = self.clock()
    try:
      yield
    finally:
      waited = self.clock() - start
      self.totals.input_wait_s += waited
      self.window.input_wait_s += waited

  def take_window(self) -> Window:
    window, self.window = self.window, Window()
    return window

  @contextlib.contextmanager
  def measure(self, what: str) -> Iterator[None]:
    """Counts the time inside as `what` ("evaluate", "checkpoint", "compile": the
    `Timing` field `what`_s), not train time; `last_s` is then how long it took."""
    start = self.clock()
    try:
      yield
    finally:
      self.last_s = self.clock() - start
      field = f"{what}_s"
      setattr(self.totals, field, getattr(self.totals, field) + self.last_s)
      self._mark = self.clock()

  def snapshot(self) -> dict:
    """The totals now, as results.json holds them."""
    wall_s = self._wall_at_start + self.clock() - self._segment_start
    return dataclasses.replace(self.totals, wall_s=wall_s).to_json()

  def rates(self, batch_size: int, steps_per_epoch: int) -> tuple[float | None, float | None]:
    """(images/s, seconds/epoch) of the train steps alone (None before any)."""
    t, n = self.totals.train_s, self.totals.train_steps
    if not n or t <= 0:
      return None, None
    return n * batch_size / t, t / n * steps_per_epoch

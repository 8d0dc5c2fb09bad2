"""Progress lines, metrics.jsonl, TensorBoard event files and results.json."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

from absl import logging


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class Reporter:
  """Writes every metric to metrics.jsonl and TensorBoard (process 0 only)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.workdir = workdir
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "time": time.time(), **{k: float(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for name, value in metrics.items():
      self._tb.add_scalar(name, float(value), int(step))
    self._tb.flush()

  def progress(self, *, step: int, total_steps: int, steps_per_epoch: int, loss: float,
               accuracy: float, learning_rate: float, images_per_s: float,
               seconds_left: float) -> None:
    logging.info(
        "epoch %.2f/%d  step %d/%d  loss %.4f  train acc %.4f  lr %.4g  %.0f img/s  ETA %s",
        step / steps_per_epoch, round(total_steps / steps_per_epoch), step, total_steps,
        loss, accuracy, learning_rate, images_per_s, format_duration(seconds_left))

  def results(self, results: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    path = os.path.join(self.workdir, "results.json")
    with open(path + ".tmp", "w") as f:
      json.dump(results, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()

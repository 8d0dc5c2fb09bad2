"""A run's checkpoints as the loop sees them: what they carry, saving, resuming.

A checkpoint holds the train state and a `Record`: the run's config, its best
validation result, timing totals, the config changes it went through, the identity of
its training data, and the train window a stop interrupted. `Saver` saves them (never a
non-finite state); `restore` finds the newest good one and compares its config and data
with the current ones: training-relevant fields that differ are refused, naming each,
unless `allow_config_change`, which records them (a field a record lacks, added to the
configs later, counts as its default value).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from absl import logging
from flax import jax_utils
import jax
import ml_collections
import numpy as np

from experiments import results as results_lib
from experiments.configs import default
from experiments.runtime import errors
from experiments.training import checkpoints as checkpoints_lib
from experiments.training import stopwatch


@dataclasses.dataclass
class Record:
  """What a checkpoint carries besides the state (module docstring)."""
  config: dict
  seed: int
  best: results_lib.Best = dataclasses.field(default_factory=results_lib.Best)
  timing: dict = dataclasses.field(default_factory=dict)
  config_changes: list = dataclasses.field(default_factory=list)
  data: dict | None = None  # the training data's identity (`Source.identity`)
  window: dict | None = None  # the interrupted train window: metrics and Window fields

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, meta: dict) -> Record:
    fields = {f.name for f in dataclasses.fields(cls)}
    record = cls(**{k: v for k, v in meta.items() if k in fields})
    record.best = results_lib.Best(**(meta.get("best") or {}))
    return record

  def train_window(self) -> stopwatch.Window | None:
    if not self.window:
      return None
    return stopwatch.Window(**{k: v for k, v in self.window.items() if k != "metrics"})


class Saver:
  """Saves the replicated state with the record into `checkpoints`."""

  def __init__(self, checkpoints: checkpoints_lib.Checkpoints, record: Record,
               watch: stopwatch.Stopwatch):
    self.checkpoints, self.record, self.watch = checkpoints, record, watch

  def save(self, state, step: int, window_metrics=None, best: bool = False) -> None:
    """Saves `state` at `step` as the newest checkpoint (or as best/), with the train
    window that `window_metrics` (host metrics) interrupts, if any; never a non-finite
    state (`errors.Diverged`)."""
    with self.watch.measure("checkpoint"):
      host_state = jax.device_get(jax_utils.unreplicate(state))
      if not all(np.all(np.isfinite(a)) for a in jax.tree.leaves(host_state)
                 if np.issubdtype(a.dtype, np.floating)):
        raise errors.Diverged(step, f"training diverged: the state at step {step} is not "
                              "finite; it was not saved.")
      self.record.timing = self.watch.snapshot()
      self.record.window = None if window_metrics is None else {
          "metrics": {name: value.item() for name, value in window_metrics.items()},
          **dataclasses.asdict(self.watch.window)}
      self.checkpoints.save(step, host_state, self.record.to_json(), best=best)


def config_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort())


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{"a.b": leaf} of a nested dict."""
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(flatten(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def config_differences(recorded: dict[str, Any], current: dict[str, Any]
                       ) -> list[tuple[str, Any, Any]]:
  """(field, recorded value, current value) for every training-relevant field that
  differs (lists and tuples compare equal when their items do; a field one side lacks
  has the default config's value)."""
  old, new = flatten(recorded), flatten(current)
  defaults = flatten(config_dict(default.get_config()))
  normal = lambda v: list(v) if isinstance(v, (list, tuple)) else v
  differences = []
  for field in sorted(set(old) | set(new)):
    before, after = old.get(field, defaults.get(field)), new.get(field, defaults.get(field))
    if field not in default.RESTART_MAY_CHANGE and normal(before) != normal(after):
      differences.append((field, before, after))
  return differences


def data_differences(recorded: dict | None, current: dict) -> list[tuple[str, Any, Any]]:
  """(data.field, recorded, current) for every field of the data's identity that
  differs (none when the record has no identity: checkpoints of older versions)."""
  if recorded is None:
    return []
  return [(f"data.{k}", recorded.get(k), v) for k, v in current.items()
          if k != "name" and recorded.get(k) != v]


def restore(checkpoints: checkpoints_lib.Checkpoints, template, config, data: dict,
            allow_config_change: bool) -> tuple[int, Any, Record] | None:
  """(step, state, record) of the newest good checkpoint, or None to start afresh.

  Raises:
    errors.UserError: the checkpoint's settings or data differ and no change is allowed.
    errors.IncompatibleCheckpoint: allowed or not, the checkpoint cannot take them.
  """
  current = config_dict(config)
  changes: list = []

  def check_meta(meta: dict, fits: bool) -> None:
    differences = (config_differences(meta["config"], current)
                   + data_differences(meta.get("data"), data))
    if differences and not allow_config_change:
      raise errors.UserError(
          f"{checkpoints.workdir} holds a run with other settings ({listed(differences)})."
          + (" Use a new --workdir, or pass --allow_config_change to continue this run "
             "with the new settings (the change is recorded in results.json)." if fits else
             " Its checkpoints cannot take them (arrays of other shapes): resume with the "
             "settings it was trained with, or use a new --workdir."))
    changes[:] = differences

  try:
    restored = checkpoints.restore_newest_good(template, check_meta)
  except errors.IncompatibleCheckpoint as e:
    if not changes:
      raise
    raise errors.IncompatibleCheckpoint(f"{listed(changes)}: {e}") from None
  if restored is None:
    return None
  step, state, meta = restored
  record = Record.from_json(meta)
  record.config, record.seed, record.data = current, config.seed, data
  record.config_changes = list(record.config_changes) + [
      {"step": step, "field": f, "from": old, "to": new} for f, old, new in changes]
  if changes:
    logging.warning("resuming step %d with other settings (allowed): %s", step,
                    listed(changes))
  return step, state, record


def listed(differences: list[tuple[str, Any, Any]]) -> str:
  return "; ".join(f"{field}: {old!r} -> {new!r}" for field, old, new in differences)

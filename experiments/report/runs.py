"""Training runs as their workdirs hold them, and the numbers the report derives from them.

A run is a workdir of `experiments.cifar`: config.json, metrics.jsonl and, once a
segment has finished, results.json. From it come Table 1's errors (`error_summary`),
Table 2's times (`timing`), the survival probabilities and expected depth, the per-epoch
series the figures plot, and the groups of runs that form a p_L sweep. Errors are
fractions here; `figures` and `tables` show them as percentages.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
import dataclasses
import json
import math
import os
from typing import Any

from etils import epath
import numpy as np

from experiments import results as results_lib
from experiments.configs import default
from experiments.runtime import errors
from sdnet import options

# ---------------------------------------------------------------------------- runs


@dataclasses.dataclass(frozen=True)
class Run:
  """What one workdir holds: its config, its results (None if none) and its records."""
  path: epath.Path
  config: dict
  results: results_lib.Results | None
  records: list[dict]
  problems: tuple[str, ...] = ()  # what of the workdir could not be read, left out

  @property
  def name(self) -> str:
    return self.path.name

  def setting(self, dotted: str, default: Any = None) -> Any:
    """A config field by dotted name ("survival.p_last")."""
    value = self.config
    for part in dotted.split("."):
      if not isinstance(value, dict) or part not in value:
        return default
      value = value[part]
    return value

  p_last = property(lambda self: float(self.setting("survival.p_last", 1.0)))
  rule = property(lambda self: self.setting("survival.rule", options.PAPER_SURVIVAL_RULE))
  depth = property(lambda self: int(self.setting("model.depth")))
  dataset = property(lambda self: self.setting("dataset", "?"))
  epochs = property(lambda self: float(self.setting("epochs")))

  @property
  def is_constant_depth(self) -> bool:
    return self.p_last == 1.0

  @property
  def finished(self) -> bool:
    return bool(self.results and self.results.finished)

  @property
  def diverged(self) -> bool:
    return bool(self.results and self.results.diverged)

  @property
  def label(self) -> str:
    """"constant depth", "SD p_L=0.5" or "SD uniform p_L=0.5"."""
    if self.is_constant_depth:
      return "constant depth"
    rule = "" if self.rule == options.PAPER_SURVIVAL_RULE else f"{self.rule} "
    return f"SD {rule}p_L={self.p_last:g}"

  @property
  def legend(self) -> str:
    return f"{self.label} ({self.name})"

  def status(self) -> str:
    """"finished", "unfinished (epoch 3.2 of 10)" or "diverged at step N"."""
    if self.diverged:
      return f"diverged at step {self.results.diverged_at_step}"
    if self.finished:
      return "finished"
    return f"unfinished (epoch {self.epochs_done():.1f} of {self.epochs:g})"

  def epochs_done(self) -> float:
    if self.results and self.results.epochs is not None:
      return float(self.results.epochs)
    return max((record_epoch(r) for r in self.records), default=0.0)

  @property
  def has_test_split(self) -> bool:
    """Whether the run evaluated on a test split (else its numbers are validation's)."""
    return (any(results_lib.error_name("test") in r for r in self.records)
            or bool(self.results and self.results.has_test_error))


def record_epoch(record: dict) -> float:
  return float(record[results_lib.EPOCH])


def _read_results(path: epath.Path, problems: list[str]) -> results_lib.Results | None:
  """The results in `path`; None (and a problem noted) if they are missing or damaged."""
  if not path.exists():
    return None
  try:
    return results_lib.parse_results(path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    problems.append(f"{path.name} is damaged ({e}), left out")
    return None


def _read_config(path: epath.Path, problems: list[str]) -> dict | None:
  """The config recorded in `path` (config.json); None (and a problem noted) if damaged."""
  try:
    value = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    problems.append(f"{path.name} is damaged ({e}), left out")
    return None
  if not isinstance(value, dict):
    problems.append(f"{path.name} holds no JSON object, left out")
    return None
  return value


def load_run(run_dir: str | os.PathLike) -> Run | None:
  """The run in `run_dir`, its unreadable parts left out and named in `Run.problems`;
  None when it has no metrics.jsonl (it never logged) or no readable config.

  Raises:
    errors.UserError: `run_dir` holds no config.json, so it is no run's workdir.
  """
  path = epath.Path(run_dir)
  if not path.exists():
    raise errors.UserError(f"{run_dir} does not exist (give the --workdir of a training "
                           "run).")
  if not (path / "config.json").exists():
    raise errors.UserError(f"{run_dir} is not a run directory: it has no config.json "
                           "(give the --workdir of a training run).")
  metrics = path / "metrics.jsonl"
  if not metrics.exists():
    return None
  problems: list[str] = []
  results = _read_results(path / "results.json", problems)
  config = results.config if results else _read_config(path / "config.json", problems)
  if config is None:
    return None
  records, damaged = results_lib.read_records(metrics.read_bytes())
  if damaged:
    problems.append(f"{damaged} damaged line(s) of metrics.jsonl left out")
  records.sort(key=lambda r: r[results_lib.STEP])
  return Run(path, config, results, records, tuple(problems))


def load_runs(run_dirs: Iterable[str | os.PathLike]) -> tuple[list[Run], list[str]]:
  """The runs of `run_dirs`, and one warning per directory skipped or read in part."""
  runs, warnings = [], []
  for run_dir in run_dirs:
    run = load_run(run_dir)
    if run is None:
      why = ("it has no metrics.jsonl (the run never logged)"
             if not (epath.Path(run_dir) / "metrics.jsonl").exists()
             else "neither its results.json nor its config.json can be read")
      warnings.append(f"skipping {run_dir}: {why}.")
      continue
    if run.problems:
      warnings.append(f"{run_dir}: {'; '.join(run.problems)}.")
    runs.append(run)
  return runs, warnings


# ---------------------------------------------------------------- per-epoch series


def epoch_index(record: dict) -> int:
  """The 1-based epoch a train window belongs to (windows never straddle an epoch)."""
  return max(1, math.ceil(round(record_epoch(record), 6)))


def per_epoch_mean(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(epochs, values): the step-weighted mean of `key` over each epoch's train windows."""
  sums: dict[int, float] = {}
  weights: dict[int, float] = {}
  for record in records:
    if key not in record:
      continue
    epoch = epoch_index(record)
    weight = float(record.get(results_lib.WINDOW_STEPS, 1.0))
    sums[epoch] = sums.get(epoch, 0.0) + weight * float(record[key])
    weights[epoch] = weights.get(epoch, 0.0) + weight
  epochs = sorted(sums)
  return (np.asarray(epochs, dtype=np.float64),
          np.asarray([sums[e] / weights[e] for e in epochs], dtype=np.float64))


def evaluation_curve(run: Run) -> tuple[np.ndarray, np.ndarray, str]:
  """(epochs, errors, split): test error at each evaluation, or validation error when
  the run has no test records."""
  split = "test" if run.has_test_split else "validation"
  name = results_lib.error_name(split)
  points = [(record_epoch(r), float(r[name])) for r in run.records if name in r]
  epochs, values = zip(*points) if points else ((), ())
  return np.asarray(epochs, dtype=np.float64), np.asarray(values, dtype=np.float64), split


def lr_change_epochs(run: Run) -> list[float]:
  """Epochs where the learning rate changes: the end of warm-up and every drop."""
  marks = [float(f) * run.epochs for f in run.setting("lr_drop_fractions", ())]
  warmup = float(run.setting("warmup_epochs", 0.0) or 0.0)
  return sorted(set(marks + ([warmup] if warmup > 0 else [])))


# ----------------------------------------------------------------- the numbers


@dataclasses.dataclass(frozen=True)
class ErrorSummary:
  """The Table 1 numbers of a run (fractions): at the best validation error, and final;
  the top-5 validation errors there where the run measured them (ImageNet)."""
  split: str  # "test" or "validation"
  at_best_validation: float | None
  final: float | None
  top5_at_best_validation: float | None = None
  top5_final: float | None = None


def error_summary(run: Run) -> ErrorSummary:
  """Table 1 numbers from results.json, or from metrics.jsonl where it lacks them."""
  split = "test" if run.has_test_split else "validation"
  results = run.results
  at_best = results.error_at_best_validation(split) if results else None
  top5 = results.best_validation_top5_error if results else None
  if at_best is None:
    at_best = _at_best_validation(run.records, results_lib.error_name(split))
    top5 = _at_best_validation(run.records, results_lib.error_name("validation", top=5))
  if not run.finished:
    return ErrorSummary(split, at_best, None, top5)
  return ErrorSummary(split, at_best, results.final_error(split), top5,
                      results.final_validation_top5_error)


def _at_best_validation(records: Sequence[dict], name: str) -> float | None:
  """The metric `name` at the first evaluation with the lowest validation error."""
  best, validation = None, results_lib.error_name("validation")
  for record in records:
    if validation in record and (best is None or record[validation] < best[validation]):
      best = record
  return None if best is None else best.get(name)


@dataclasses.dataclass(frozen=True)
class Timing:
  """Train-step time of a run (None where unknown)."""
  seconds_per_epoch: float | None
  images_per_s: float | None
  train_s: float | None


def timing(run: Run) -> Timing:
  """From results.json, or from the train windows of metrics.jsonl (unfinished runs)."""
  results = run.results
  totals = results_lib.Timing.of(results.timing) if results else None
  train_s = totals.train_s if totals and totals.train_steps else None
  if results and results.seconds_per_epoch is not None and train_s is not None:
    return Timing(results.seconds_per_epoch, results.train_images_per_s, train_s)
  steps_name, seconds_name = results_lib.WINDOW_STEPS, results_lib.WINDOW_SECONDS
  windows = [r for r in run.records if r.get(seconds_name, 0) > 0
             and r.get(steps_name, 0) > 0]
  if not windows:
    return Timing(None, None, train_s)
  batch = float(run.setting("batch_size"))
  steps = sum(r[steps_name] for r in windows)
  seconds = sum(r[seconds_name] for r in windows)
  last = windows[-1]
  steps_per_epoch = last[results_lib.STEP] / record_epoch(last)
  return Timing(seconds / steps * steps_per_epoch, steps * batch / seconds, seconds)


def expected_depth(run: Run) -> tuple[np.ndarray, float]:
  """(p_l per block, expected number of blocks): from results.json, else from the
  model the run's config builds."""
  if run.results and run.results.survival_probs:
    probs = np.asarray(run.results.survival_probs, dtype=np.float64)
    return probs, float(probs.sum())
  # pylint: disable=g-import-not-at-top  (pulls in jax: only for runs without results)
  from experiments.training import recipe
  config = default.with_values(run.config)
  probs = np.asarray(recipe.build_model(config, num_classes=1).survival_probs(),
                     dtype=np.float64)
  return probs, float(probs.sum())


def sweep_groups(runs: Sequence[Run]) -> list[list[Run]]:
  """Groups of at least 3 runs with distinct (p_L, rule) and otherwise the same
  training config (fields that do not change training ignored)."""
  ignored = set(default.RESTART_MAY_CHANGE)
  groups: dict[str, list[Run]] = {}
  for run in runs:
    rest = {k: v for k, v in run.config.items() if k not in ignored}
    rest["survival"] = {k: v for k, v in (rest.get("survival") or {}).items()
                        if k not in ("p_last", "rule")}
    groups.setdefault(json.dumps(rest, sort_keys=True, default=str), []).append(run)
  return [group for group in groups.values()
          if len({(r.p_last, r.rule) for r in group}) >= 3]


def one_run_per_p_last(runs: Sequence[Run]) -> list[Run]:
  """The runs sorted by p_L, one per p_L (the first finished one, else the first)."""
  chosen: dict[float, Run] = {}
  for run in runs:
    if run.p_last not in chosen or (run.finished and not chosen[run.p_last].finished):
      chosen[run.p_last] = run
  return [chosen[p] for p in sorted(chosen)]


def schedule_train_s(run: Run) -> float | None:
  """Train-step time of the whole schedule: measured when finished, else seconds per
  epoch so far times the configured epochs."""
  measured = timing(run)
  if run.finished and measured.train_s is not None:
    return measured.train_s
  if measured.seconds_per_epoch is None:
    return None
  return measured.seconds_per_epoch * run.epochs

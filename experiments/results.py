"""The one schema of what a run reports: results.json (`Results`) and metrics.jsonl.

The training loop writes them, the report and the sweeps read them; every field and
metric name is defined here. Errors are fractions (0.0523 is 5.23%, as `percent` shows
it); times are seconds.

results.json is version 2. A file without a version field is version 1 (written before
it had one); it reads with the same numbers: version 2 only dropped `wall_time_s`, a copy
of `timing["wall_s"]`, and added `timing["input_wait_s"]` (0 where unknown).

metrics.jsonl holds one JSON object per line, {"step": int, "time": float, name: value},
a train window at every log event (`train_record`) and an evaluation at every evaluation
(`evaluation_record`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

VERSION = 2

# -------------------------------------------------------------------- results.json

@dataclasses.dataclass
class Timing:
  """A run's time totals in seconds, carried across its resumes: results.json's "timing"
  (as a dict) and the `TIMING_PREFIX` fields of metrics.jsonl. Train time holds the train
  steps and the input feeding them; the wait for input is also counted apart."""
  train_s: float = 0.0
  train_steps: int = 0
  input_wait_s: float = 0.0
  evaluate_s: float = 0.0
  checkpoint_s: float = 0.0
  compile_s: float = 0.0
  wall_s: float = 0.0

  @classmethod
  def of(cls, totals: dict | None) -> Timing:
    """From results.json's dict (fields it lacks are 0; others are ignored)."""
    return cls(**{k: v for k, v in (totals or {}).items() if k in TIMING_FIELDS})

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


TIMING_FIELDS = tuple(field.name for field in dataclasses.fields(Timing))


@dataclasses.dataclass
class Best:
  """The evaluation with the lowest validation error so far: its error and step, the
  test error there (the paper's reported number) and, where the run measures it, the
  top-5 validation error there."""
  validation_error: float | None = None
  step: int | None = None
  test_error: float | None = None
  validation_top5_error: float | None = None


@dataclasses.dataclass
class Results:
  """results.json: how a run (or its latest segment) ended, and its reported numbers.

  The paper's number is `test_error_at_best_validation`: the test error at the
  evaluation with the lowest validation error (Huang et al., 2016, Sec. 4). Runs without
  a test split have None there and report validation errors.
  """
  config: dict
  steps: int
  finished: bool
  timing: dict = dataclasses.field(default_factory=dict)  # a `Timing`, as a dict
  seed: int | None = None
  dataset: str | None = None  # the data source's description
  epochs: float | None = None
  steps_per_epoch: int | None = None
  train_images_per_s: float | None = None  # of the train steps alone
  seconds_per_epoch: float | None = None
  best_validation_error: float | None = None
  best_validation_step: int | None = None
  test_error_at_best_validation: float | None = None
  best_validation_top5_error: float | None = None  # where the run measures top-5
  final_validation_error: float | None = None  # at the last step (finished runs)
  final_test_error: float | None = None
  final_validation_top5_error: float | None = None
  survival_probs: list[float] | None = None
  expected_depth: float | None = None
  num_blocks: int | None = None
  parameters: int | None = None
  config_changes: list[dict] = dataclasses.field(default_factory=list)
  diverged: bool = False
  diverged_at_step: int | None = None
  version: int = VERSION

  @classmethod
  def of_run(cls, *, best: Best, final: dict[str, dict], **fields) -> Results:
    """The results of a run whose best evaluation is `best`, `final` the summaries of
    its last evaluation ({split: {"error", ...}}; {} before the end), `fields` the rest."""
    validation, test = final.get("validation", {}), final.get("test", {})
    return cls(best_validation_error=best.validation_error, best_validation_step=best.step,
               test_error_at_best_validation=best.test_error,
               best_validation_top5_error=best.validation_top5_error,
               final_validation_error=validation.get("error"),
               final_test_error=test.get("error"),
               final_validation_top5_error=validation.get("top5_error"), **fields)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, value: Any) -> Results:
    """The results of a parsed results.json of any version; ValueError if it is none."""
    if not isinstance(value, dict):
      raise ValueError("it holds no JSON object")
    missing = [f for f in ("config", "steps", "finished") if f not in value]
    if missing:
      raise ValueError(f"it lacks {', '.join(missing)}")
    known = {f.name for f in dataclasses.fields(cls)}
    fields = {k: v for k, v in value.items() if k in known}  # v1's wall_time_s: a copy
    fields["version"] = value.get("version", 1)
    _check_types(fields)
    fields["timing"] = {"input_wait_s": 0.0, **(value.get("timing") or {})}
    return cls(**fields)

  def error_at_best_validation(self, split: str) -> float | None:
    """`split`'s error at the best validation evaluation ("test": the paper's number)."""
    if split == "test":
      return self.test_error_at_best_validation
    return self.best_validation_error

  def final_error(self, split: str) -> float | None:
    return self.final_test_error if split == "test" else self.final_validation_error

  @property
  def has_test_error(self) -> bool:
    return self.test_error_at_best_validation is not None or self.final_test_error is not None


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


# What each field of results.json must hold (None is allowed for the optional ones).
_KINDS = {"config": dict, "timing": dict, "config_changes": list, "steps": int,
          "finished": bool, "diverged": bool, "version": int, "survival_probs": list}


def _check_types(fields: dict) -> None:
  """ValueError naming the first field of results.json that holds the wrong kind."""
  for name, value in fields.items():
    kind = _KINDS.get(name)
    if value is None and name not in ("config", "steps", "finished"):
      continue
    if kind is int and isinstance(value, bool):
      ok = False
    elif kind is not None:
      ok = isinstance(value, kind)
    elif name in ("seed", "steps_per_epoch", "best_validation_step", "diverged_at_step",
                  "num_blocks", "parameters"):
      ok = isinstance(value, int) and not isinstance(value, bool)
    elif name == "dataset":
      ok = isinstance(value, str)
    else:
      ok = _is_number(value)
    if name == "survival_probs" and ok:
      ok = all(_is_number(p) for p in value)
    if name == "timing" and ok:
      ok = all(_is_number(v) for v in value.values())
    if not ok:
      raise ValueError(f"its {name} is {value!r}, not what results.json holds there")


def results_text(results: Results) -> str:
  return json.dumps(results.to_json(), indent=2, sort_keys=True)


def parse_results(text: str) -> Results:
  """Results of results.json's text; ValueError (saying why) if it is damaged."""
  try:
    return Results.from_json(json.loads(text))
  except json.JSONDecodeError as e:
    raise ValueError(f"it is no JSON ({e})") from None
  except TypeError as e:  # a field of the wrong kind
    raise ValueError(str(e)) from None


# -------------------------------------------------------------------- metrics.jsonl

STEP, TIME, EPOCH = "step", "time", "epoch"
TRAIN_LOSS = "train/loss"
TRAIN_ERROR = "train/error"
LEARNING_RATE = "train/learning_rate"
IMAGES_PER_S = "train/images_per_s"
FIRST_BLOCK_GRADIENT = "train/first_block_grad_abs"  # mean |dL/dW|, the paper's Fig. 7
WINDOW_STEPS = "train/steps"
WINDOW_SECONDS = "train/seconds"
INPUT_WAIT_FRACTION = "train/input_wait_fraction"  # of the window's seconds
TIMING_PREFIX = "timing/"  # + a TIMING_FIELDS name: the run's totals at that step


def error_name(split: str, top: int = 1) -> str:
  """The metric of `split`'s error ("validation/error", "test/top5_error")."""
  return f"{split}/error" if top == 1 else f"{split}/top{top}_error"


def loss_name(split: str) -> str:
  return f"{split}/loss"


def train_record(*, epoch: float, loss: float, error: float, learning_rate: float,
                 first_block_gradient: float, steps: int, seconds: float,
                 input_wait_s: float, batch_size: int, timing: dict) -> dict[str, float]:
  """The metrics of one train window of `steps` steps that took `seconds`."""
  rate = steps * batch_size / seconds if seconds > 0 else float("nan")
  return {TRAIN_LOSS: loss, TRAIN_ERROR: error, LEARNING_RATE: learning_rate,
          IMAGES_PER_S: rate, FIRST_BLOCK_GRADIENT: first_block_gradient,
          WINDOW_STEPS: steps, WINDOW_SECONDS: seconds,
          INPUT_WAIT_FRACTION: input_wait_s / seconds if seconds > 0 else 0.0,
          EPOCH: epoch, **{TIMING_PREFIX + name: value for name, value in timing.items()}}


def evaluation_record(epoch: float, summaries: dict[str, dict]) -> dict[str, float]:
  """The metrics of one evaluation: {split: {"error", "loss"[, "top5_error"]}}."""
  record = {EPOCH: epoch}
  for split, summary in summaries.items():
    record[error_name(split)] = summary["error"]
    record[loss_name(split)] = summary["loss"]
    if "top5_error" in summary:
      record[error_name(split, 5)] = summary["top5_error"]
  return record


def record_line(step: int, metrics: dict[str, float]) -> str:
  return json.dumps({STEP: int(step), TIME: time.time(),
                     **{k: float(v) for k, v in metrics.items()}})


def is_record(value: Any) -> bool:
  """Whether `value` is a metrics.jsonl record: a JSON object with an integer step and
  an epoch, every other value a number."""
  return (isinstance(value, dict) and isinstance(value.get(STEP), int)
          and not isinstance(value.get(STEP), bool) and EPOCH in value
          and all(_is_number(v) for k, v in value.items() if k != STEP))


def read_records(data: bytes) -> tuple[list[dict], int]:
  """The records of a metrics.jsonl file and the number of its damaged lines (not
  records, e.g. the half-written last line of a run killed mid-write)."""
  records, damaged = [], 0
  for line in data.decode("utf-8", errors="replace").splitlines():
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      record = None
    if is_record(record):
      records.append(record)
    else:
      damaged += 1
  return records, damaged


# -------------------------------------------------------------------------- showing


def percent(fraction: float | None) -> str:
  return "-" if fraction is None else f"{100 * fraction:.2f}%"


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"

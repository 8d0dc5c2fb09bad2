"""The paper's tables from runs, as Markdown.

Table 1 (test error at the best validation epoch and at the end, beside the paper's),
Table 2 (training time of each stochastic / constant-depth pair) and the expected depth
of every run; `document` puts them in REPORT.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
import dataclasses
from typing import Any

from experiments.report import paper
from experiments.report import runs as runs_lib
from experiments.results import format_duration
from experiments.results import percent

# ----------------------------------------------------------------------- tables


@dataclasses.dataclass(frozen=True)
class Table1Row:
  run: runs_lib.Run
  errors: runs_lib.ErrorSummary
  paper_error: float | None  # percent
  notes: tuple[str, ...]


def table1_rows(runs: Sequence[runs_lib.Run]) -> list[Table1Row]:
  """One row per run: its error at the best validation epoch and at the end, and the
  paper's number for the same dataset, depth and p_L."""
  rows = []
  for run in runs:
    summary = runs_lib.error_summary(run)
    reference = paper.match(run.config, run.results.dataset if run.results else "")
    notes = list(reference.notes)
    if summary.split == "validation":
      notes.insert(0, "validation error: the paper's ImageNet figures are validation "
                   "errors too" if run.setting("model.family") == "imagenet" else
                   "no test split: validation error")
    if not run.finished:
      notes.insert(0, run.status())
    rows.append(Table1Row(run, summary, paper.error(reference.setting, run.p_last, run.rule),
                          tuple(notes)))
  return rows


@dataclasses.dataclass(frozen=True)
class Table2Row:
  stochastic: runs_lib.Run
  constant: runs_lib.Run
  stochastic_timing: runs_lib.Timing
  constant_timing: runs_lib.Timing

  @property
  def epoch_ratio(self) -> float | None:
    return _ratio(self.stochastic_timing.seconds_per_epoch,
                  self.constant_timing.seconds_per_epoch)

  @property
  def total_ratio(self) -> float | None:
    """None unless both runs finished (a partial time is not a total)."""
    if not (self.stochastic.finished and self.constant.finished):
      return None
    return _ratio(self.stochastic_timing.train_s, self.constant_timing.train_s)


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
  if numerator is None or not denominator:
    return None
  return numerator / denominator


def _pair_key(run: runs_lib.Run) -> tuple:
  return (run.dataset, run.setting("data_dir", ""), run.setting("model.family", "cifar"),
          run.depth, run.epochs, run.setting("batch_size"))


def table2_rows(runs: Sequence[runs_lib.Run]) -> list[Table2Row]:
  """Every (stochastic, constant-depth) pair of runs with the same dataset, depth,
  epochs and batch size."""
  return [Table2Row(sd, constant, runs_lib.timing(sd), runs_lib.timing(constant))
          for sd in runs if not sd.is_constant_depth
          for constant in runs if constant.is_constant_depth
          and _pair_key(constant) == _pair_key(sd)]


def expected_depth_rows(runs: Sequence[runs_lib.Run]) -> list[tuple[runs_lib.Run, int, float]]:
  """(run, number of blocks L, expected number of blocks E[L~]) per run."""
  rows = []
  for run in runs:
    probs, expected = runs_lib.expected_depth(run)
    rows.append((run, len(probs), expected))
  return rows


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def _error_cell(value: float | None, split: str, top5: float | None = None) -> str:
  if value is None:
    return "-"
  return (percent(value) + (" (validation)" if split == "validation" else "")
          + ("" if top5 is None else f", top-5 {percent(top5)}"))


def _duration(seconds: float | None) -> str:
  return "-" if seconds is None else format_duration(seconds)


def _number(value: float | None, digits: int = 0) -> str:
  return "-" if value is None else f"{value:,.{digits}f}"


def table1_markdown(rows: Sequence[Table1Row]) -> str:
  header = ["run", "dataset", "depth", "p_L (rule)", "epochs", "error at best validation",
            "final error", "paper", "note"]
  return markdown_table(header, [
      (row.run.name, row.run.dataset, row.run.depth,
       f"{row.run.p_last:g} ({row.run.rule})", f"{row.run.epochs:g}",
       _error_cell(row.errors.at_best_validation, row.errors.split,
                   row.errors.top5_at_best_validation),
       _error_cell(row.errors.final, row.errors.split, row.errors.top5_final)
       if row.run.finished
       else f"- ({'diverged' if row.run.diverged else 'unfinished'})",
       "-" if row.paper_error is None else f"{row.paper_error:.2f}%",
       "; ".join(row.notes)) for row in rows])


def _paper_times(row: Table2Row) -> str:
  setting = paper.match(row.stochastic.config).setting
  sd = paper.train_seconds(setting, row.stochastic.p_last, row.stochastic.rule)
  constant = paper.train_seconds(setting, 1.0, paper.RULE)
  if sd is None or constant is None:
    return "-"
  return f"{format_duration(sd)} vs {format_duration(constant)} ({sd / constant:.2f})"


def table2_markdown(rows: Sequence[Table2Row]) -> str:
  header = ["stochastic run", "constant run", "s/epoch SD", "s/epoch const",
            "images/s SD", "images/s const", "train time SD", "train time const",
            "SD/const per epoch", "SD/const total", "paper (SD vs const)", "note"]
  table = []
  for row in rows:
    sd, constant = row.stochastic_timing, row.constant_timing
    unfinished = [f"{r.name} {r.status()}" for r in (row.stochastic, row.constant)
                  if not r.finished]
    table.append((
        f"{row.stochastic.name} ({row.stochastic.label})", row.constant.name,
        _number(sd.seconds_per_epoch, 1), _number(constant.seconds_per_epoch, 1),
        _number(sd.images_per_s), _number(constant.images_per_s),
        _duration(sd.train_s), _duration(constant.train_s),
        _number(row.epoch_ratio, 2), _number(row.total_ratio, 2), _paper_times(row),
        "; ".join(unfinished)))
  return markdown_table(header, table)


def expected_depth_markdown(rows: Sequence[tuple[runs_lib.Run, int, float]]) -> str:
  return markdown_table(
      ["run", "p_L (rule)", "blocks L", "expected blocks E[L~]", "E[L~] / L"],
      [(run.name, f"{run.p_last:g} ({run.rule})", blocks, f"{expected:.2f}",
        f"{expected / blocks:.3f}") for run, blocks, expected in rows])

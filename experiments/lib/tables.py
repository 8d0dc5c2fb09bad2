"""The paper's tables from runs, and REPORT.md: every figure and table of a set of runs.

Table 1 (test error at the best validation epoch and at the end, beside the paper's) and
Table 2 (training time of each stochastic / constant-depth pair) as Markdown;
`write_report` writes the figures (`experiments.lib.figures`) and REPORT.md showing them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
import dataclasses
import os
from typing import Any

from etils import epath

from experiments.lib import errors
from experiments.lib import figures
from experiments.lib import paper
from experiments.lib import runs as runs_lib
from experiments.lib.writer import format_duration
from experiments.lib.writer import percent

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
    reference = paper.match(run.config, (run.results or {}).get("dataset", ""))
    notes = list(reference.notes)
    if summary.split == "validation":
      notes.insert(0, "no test split: validation error")
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


def _error_cell(value: float | None, split: str) -> str:
  if value is None:
    return "-"
  return percent(value) + (" (validation)" if split == "validation" else "")


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
       _error_cell(row.errors.at_best_validation, row.errors.split),
       _error_cell(row.errors.final, row.errors.split) if row.run.finished
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


# ----------------------------------------------------------------------- report


def write_report(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike,
                 failed: Sequence[tuple[str, int]] = ()) -> tuple[epath.Path, list[str]]:
  """Writes the figures and OUT/REPORT.md for the runs in `run_dirs`, and lists the
  `failed` runs of a sweep, (name, exit status), in a section of their own.

  Returns:
    The path of REPORT.md and the warnings about directories skipped or read in part
    (also listed at the end of REPORT.md).
  Raises:
    errors.UserError: a directory is not a run's, or no run has any metrics.
  """
  runs, warnings = runs_lib.load_runs(run_dirs)
  if not runs:
    raise errors.UserError("none of the given run directories has metrics.jsonl: "
                           "nothing to report.")
  out = epath.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  sections = ["# Stochastic depth: report\n", _runs_section(runs)]
  if failed:
    sections.append(
        "## Failed runs\n\nThese runs of the sweep ended in failure (exit status as "
        "`experiments.cifar` documents it; their logs say why). Runs above that share "
        "their name are what they wrote before failing.\n\n" +
        markdown_table(["run", "exit status"], [(name, str(code)) for name, code in failed]))
  figures.save_figure(figures.learning_curves_figure(runs), out / figures.FIGURE_FILES["curves"])
  sections.append(
      "## Learning curves (Fig. 3)\n\n"
      f"![learning curves]({figures.FIGURE_FILES['curves']})\n\n"
      "Solid: test error per evaluation (validation error for runs without a test split, "
      "as the legend says); dashed: training loss, the step-weighted mean of each epoch; "
      "dotted: learning-rate changes.\n")
  sections.append(
      "## Table 1: error\n\n" + table1_markdown(table1_rows(runs)) +
      "\nPaper: test error of Huang et al. (2016), Table 1 (ResNet-1202: Sec. 4), for the "
      "same dataset, depth and p_L (linear decay); \"-\" where the paper has none.\n")
  pairs = table2_rows(runs)
  sections.append("## Table 2: training time\n\n" + (
      table2_markdown(pairs) + "\nTimes are of the train steps alone (timing.train_s), "
      "without evaluation, checkpoints or compilation. Paper: Huang et al. (2016), "
      "Table 2 (p_L = 0.5).\n" if pairs else
      "No pair of a stochastic and a constant-depth run with the same dataset, depth, "
      "epochs and batch size.\n"))
  gradients = figures.gradient_figure(runs)
  if gradients is not None:
    figures.save_figure(gradients, out / figures.FIGURE_FILES["gradients"])
    sections.append(
        "## Gradient magnitude (Fig. 7)\n\n"
        f"![first-block gradients]({figures.FIGURE_FILES['gradients']})\n\n"
        "Mean absolute gradient of the first convolution of residual block 1, per epoch.\n")
  figures.save_figure(figures.survival_figure(runs), out / figures.FIGURE_FILES["survival"])
  sections.append(
      "## Survival probabilities and expected depth\n\n"
      f"![survival probabilities]({figures.FIGURE_FILES['survival']})\n\n" +
      expected_depth_markdown(expected_depth_rows(runs)))
  for i, group in enumerate(runs_lib.sweep_groups(runs)):
    name = figures.FIGURE_FILES["sweep"] if i == 0 else figures.FIGURE_FILES["sweep"].replace(
        ".png", f"_{i + 1}.png")
    figures.save_figure(figures.plot_sweep(group), out / name)
    sections.append(
        f"## p_L sweep (Fig. 8, left): {len(group)} runs\n\n![p_L sweep]({name})\n\n"
        "Left: error at the best validation epoch against p_L per survival rule "
        "(constant depth, p_L = 1, on both lines). Right: train-step time of the whole "
        "schedule (unfinished runs: seconds per epoch so far x epochs).\n")
  if warnings:
    sections.append("## Left out\n\n" + "".join(f"- {w}\n" for w in warnings))
  report = out / "REPORT.md"
  report.write_text("\n".join(sections))
  return report, warnings


def _runs_section(runs: Sequence[runs_lib.Run]) -> str:
  rows = [(run.name, str(run.path), run.label, run.status(),
           (run.results or {}).get("dataset", run.dataset)) for run in runs]
  return "## Runs\n\n" + markdown_table(["run", "workdir", "survival", "status", "data"],
                                        rows)

"""REPORT.md: every figure and table of a set of runs, in the order of the paper."""

from __future__ import annotations

from collections.abc import Sequence
import os
import sys

from etils import epath

from experiments.report import figures
from experiments.report import runs as runs_lib
from experiments.report import tables
from experiments.runtime import errors
from experiments.runtime import workdir as workdir_lib


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
  failed_codes = dict(failed)
  shown = {run.name for run in runs}
  sections = ["# Stochastic depth: report\n", runs_section(runs, failed_codes),
              failed_section([(n, c) for n, c in failed if n not in shown]),
              curves_section(runs, out), table1_section(runs), table2_section(runs),
              gradients_section(runs, out), survival_section(runs, out),
              *sweep_sections(runs, out)]
  if warnings:
    sections.append("## Left out\n\n" + "".join(f"- {w}\n" for w in warnings))
  report = out / "REPORT.md"
  workdir_lib.write_text_atomic(report, "\n".join(section for section in sections if section))
  return report, warnings


def runs_section(runs: Sequence[runs_lib.Run], failed: dict[str, int]) -> str:
  """One row per run, with one status: what it wrote, and how it ended if it failed."""
  status = lambda run: run.status() + (f"; failed (exit {failed[run.name]})"
                                       if run.name in failed else "")
  rows = [(run.name, str(run.path), run.label, status(run),
           run.results.dataset if run.results and run.results.dataset else run.dataset)
          for run in runs]
  return "## Runs\n\n" + tables.markdown_table(
      ["run", "workdir", "survival", "status", "data"], rows)


def failed_section(failed: Sequence[tuple[str, int]]) -> str:
  if not failed:
    return ""
  return ("## Failed runs\n\nThese runs of the sweep failed before they logged anything "
          "(exit status as `experiments.cifar` documents it; their logs say why); the "
          "runs that failed later are in the table above, their status saying so.\n\n" +
          tables.markdown_table(["run", "exit status"],
                                [(name, str(code)) for name, code in failed]))


def curves_section(runs: Sequence[runs_lib.Run], out: epath.Path) -> str:
  name = figures.FIGURE_FILES["curves"]
  figures.save_figure(figures.learning_curves_figure(runs), out / name)
  return ("## Learning curves (Fig. 3)\n\n"
          f"![learning curves]({name})\n\n"
          "Solid: test error per evaluation (validation error for runs without a test "
          "split, as the legend says); dashed: training loss, the step-weighted mean of "
          "each epoch; dotted: learning-rate changes.\n")


def table1_section(runs: Sequence[runs_lib.Run]) -> str:
  return ("## Table 1: error\n\n" + tables.table1_markdown(tables.table1_rows(runs)) +
          "\nPaper: test error of Huang et al. (2016), Table 1 (ResNet-1202 and ImageNet: "
          "Sec. 4; ImageNet: top-1 validation error after 90 or 120 epochs, there is no "
          "test split), for the same dataset, depth and p_L (linear decay); \"-\" where "
          "the paper has none.\n")


def table2_section(runs: Sequence[runs_lib.Run]) -> str:
  pairs = tables.table2_rows(runs)
  if not pairs:
    return ("## Table 2: training time\n\nNo pair of a stochastic and a constant-depth run "
            "with the same dataset, depth, epochs and batch size.\n")
  return ("## Table 2: training time\n\n" + tables.table2_markdown(pairs) +
          "\nTimes are of the train steps alone (timing.train_s), without evaluation, "
          "checkpoints or compilation. Paper: Huang et al. (2016), Table 2 (p_L = 0.5).\n")


def gradients_section(runs: Sequence[runs_lib.Run], out: epath.Path) -> str:
  gradients = figures.gradient_figure(runs)
  if gradients is None:
    return ""
  name = figures.FIGURE_FILES["gradients"]
  figures.save_figure(gradients, out / name)
  return ("## Gradient magnitude (Fig. 7)\n\n"
          f"![first-block gradients]({name})\n\n"
          "Mean absolute gradient of the first convolution of residual block 1, per "
          "epoch.\n")


def survival_section(runs: Sequence[runs_lib.Run], out: epath.Path) -> str:
  name = figures.FIGURE_FILES["survival"]
  figures.save_figure(figures.survival_figure(runs), out / name)
  return ("## Survival probabilities and expected depth\n\n"
          f"![survival probabilities]({name})\n\n" +
          tables.expected_depth_markdown(tables.expected_depth_rows(runs)))


def sweep_sections(runs: Sequence[runs_lib.Run], out: epath.Path) -> list[str]:
  sections = []
  for i, group in enumerate(runs_lib.sweep_groups(runs)):
    name = figures.FIGURE_FILES["sweep"]
    if i:
      name = name.replace(".png", f"_{i + 1}.png")
    figures.save_figure(figures.plot_sweep(group), out / name)
    sections.append(
        f"## p_L sweep (Fig. 8, left): {len(group)} runs\n\n![p_L sweep]({name})\n\n"
        "Left: error at the best validation epoch against p_L per survival rule "
        "(constant depth, p_L = 1, on both lines). Right: train-step time of the whole "
        "schedule (unfinished runs: seconds per epoch so far x epochs).\n")
  return sections


def parse_failed(values: list[str]) -> list[tuple[str, int]]:
  """(name, exit status) of each --failed=NAME=EXIT_STATUS."""
  failed = []
  for value in values:
    name, _, code = value.rpartition("=")
    if not name or not code.lstrip("-").isdigit():
      raise errors.UserError(f"--failed={value}: give NAME=EXIT_STATUS, e.g. constant=2.")
    failed.append((name, int(code)))
  return failed


def report(run_dirs: list[str], out: str, failed: list[str] = ()) -> int:
  """Writes OUT/REPORT.md for `run_dirs` (and the `failed` runs, NAME=EXIT_STATUS);
  prints its path, or one error line.

  Returns:
    The exit status: 0 written, 2 a problem to fix, 5 `out` cannot be written.
  """
  try:
    path, warnings = write_report(run_dirs, out, parse_failed(list(failed)))
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except OSError as e:
    fault = errors.filesystem_error(e)
    if fault is None:
      raise
    print(f"error: cannot write the report into {out}: {fault.strerror or fault}"
          f"{f' ({fault.filename})' if fault.filename else ''}.", file=sys.stderr)
    return errors.FILESYSTEM_EXIT_CODE
  for warning in warnings:
    print(f"warning: {warning}", file=sys.stderr)
  print(path)
  return 0

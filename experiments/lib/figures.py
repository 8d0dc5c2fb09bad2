"""The paper's figures and tables from finished (or unfinished) runs, and REPORT.md.

A run is a workdir of `experiments.cifar`: config.json, metrics.jsonl and, once a
segment has finished, results.json. Figures follow Huang et al. (2016): learning curves
(Fig. 3), the gradient magnitude of the first convolution (Fig. 7), survival
probabilities per block, and the p_L sweep (Fig. 8, left); tables follow Table 1 (test
error) and Table 2 (training time). Every figure function returns its matplotlib
`Figure`, whose plotted data the tests read back.

Errors in runs are fractions; they are plotted and tabulated as percentages.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
import dataclasses
import io
import json
import math
import os
from typing import Any

from etils import epath
import matplotlib
from matplotlib import figure as mpl_figure
from matplotlib import lines as mpl_lines
from matplotlib.backends import backend_agg
import numpy as np

from experiments.lib import errors
from experiments.lib import paper
from experiments.lib import workdir as workdir_lib
from experiments.lib.reporting import format_duration
from experiments.lib.reporting import percent

RULES = ("linear_decay", "uniform")
LR_DROP_GID = "lr_drop"
FIGURE_FILES = {"curves": "learning_curves.png", "gradients": "first_block_gradients.png",
                "survival": "survival_probabilities.png", "sweep": "p_last_sweep.png"}

# ---------------------------------------------------------------------------- runs


@dataclasses.dataclass(frozen=True)
class Run:
  """What one workdir holds: its config, its results (None if none) and its records."""
  path: epath.Path
  config: dict
  results: dict | None
  records: list[dict]

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

  @property
  def p_last(self) -> float:
    return float(self.setting("survival.p_last", 1.0))

  @property
  def rule(self) -> str:
    return self.setting("survival.rule", "linear_decay")

  @property
  def depth(self) -> int:
    return int(self.setting("model.depth"))

  @property
  def dataset(self) -> str:
    return self.setting("dataset", "?")

  @property
  def epochs(self) -> float:
    return float(self.setting("epochs"))

  @property
  def is_constant_depth(self) -> bool:
    return self.p_last == 1.0

  @property
  def finished(self) -> bool:
    return bool(self.results and self.results.get("finished"))

  @property
  def diverged(self) -> bool:
    return bool(self.results and self.results.get("diverged"))

  @property
  def label(self) -> str:
    """"constant depth", "SD p_L=0.5" or "SD uniform p_L=0.5"."""
    if self.is_constant_depth:
      return "constant depth"
    rule = "" if self.rule == "linear_decay" else f"{self.rule} "
    return f"SD {rule}p_L={self.p_last:g}"

  @property
  def legend(self) -> str:
    return f"{self.label} ({self.name})"

  def status(self) -> str:
    """"finished", "unfinished (epoch 3.2 of 10)" or "diverged at step N"."""
    if self.diverged:
      return f"diverged at step {self.results.get('diverged_at_step', '?')}"
    if self.finished:
      return "finished"
    return f"unfinished (epoch {self.epochs_done():.1f} of {self.epochs:g})"

  def epochs_done(self) -> float:
    if self.results and self.results.get("epochs") is not None:
      return float(self.results["epochs"])
    return max((record_epoch(r) for r in self.records), default=0.0)

  @property
  def has_test_split(self) -> bool:
    """Whether the run evaluated on a test split (else its numbers are validation's)."""
    results = self.results or {}
    return (any("test/error" in r for r in self.records)
            or results.get("test_error_at_best_validation") is not None
            or results.get("final_test_error") is not None)


def record_epoch(record: dict) -> float:
  return float(record["epoch"])


def _read_json(path: epath.Path) -> dict:
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise errors.UserError(f"{path} is not valid JSON: {e}.") from e


def load_run(run_dir: str | os.PathLike) -> Run | None:
  """The run in `run_dir`; None when it has no metrics.jsonl (it never logged).

  Raises:
    errors.UserError: `run_dir` holds no config.json, so it is no run's workdir.
  """
  path = epath.Path(run_dir)
  if not (path / "config.json").exists():
    raise errors.UserError(f"{run_dir} is not a run directory: it has no config.json "
                           "(give the --workdir of a training run).")
  metrics = path / "metrics.jsonl"
  if not metrics.exists():
    return None
  results = _read_json(path / "results.json") if (path / "results.json").exists() else None
  config = (results or {}).get("config") or _read_json(path / "config.json")
  records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
  records.sort(key=lambda r: r["step"])
  return Run(path, config, results, records)


def load_runs(run_dirs: Iterable[str | os.PathLike]) -> tuple[list[Run], list[str]]:
  """The runs of `run_dirs` and one warning per directory skipped for lack of metrics."""
  runs, warnings = [], []
  for run_dir in run_dirs:
    run = load_run(run_dir)
    if run is None:
      warnings.append(f"skipping {run_dir}: it has no metrics.jsonl (the run never logged).")
    else:
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
    weight = float(record.get("train/steps", 1.0))
    sums[epoch] = sums.get(epoch, 0.0) + weight * float(record[key])
    weights[epoch] = weights.get(epoch, 0.0) + weight
  epochs = sorted(sums)
  return (np.asarray(epochs, dtype=np.float64),
          np.asarray([sums[e] / weights[e] for e in epochs], dtype=np.float64))


def evaluation_curve(run: Run) -> tuple[np.ndarray, np.ndarray, str]:
  """(epochs, errors, split): test error at each evaluation, or validation error when
  the run has no test records."""
  split = "test" if any("test/error" in r for r in run.records) else "validation"
  points = [(record_epoch(r), float(r[f"{split}/error"])) for r in run.records
            if f"{split}/error" in r]
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
  """The Table 1 numbers of a run (fractions): at the best validation error, and final."""
  split: str  # "test" or "validation"
  at_best_validation: float | None
  final: float | None


def error_summary(run: Run) -> ErrorSummary:
  """Table 1 numbers from results.json, or from metrics.jsonl where it lacks them."""
  split = "test" if run.has_test_split else "validation"
  results = run.results or {}
  if split == "test" and results.get("test_error_at_best_validation") is not None:
    at_best = results["test_error_at_best_validation"]
  elif split == "validation" and results.get("best_validation_error") is not None:
    at_best = results["best_validation_error"]
  else:
    at_best = _error_at_best_validation(run.records, split)
  final = results.get(f"final_{split}_error") if run.finished else None
  return ErrorSummary(split, at_best, final)


def _error_at_best_validation(records: Sequence[dict], split: str) -> float | None:
  """`split` error at the first evaluation with the lowest validation error."""
  best = None
  for record in records:
    if "validation/error" in record and (
        best is None or record["validation/error"] < best["validation/error"]):
      best = record
  return None if best is None else best.get(f"{split}/error")


@dataclasses.dataclass(frozen=True)
class Timing:
  """Train-step time of a run (None where unknown)."""
  seconds_per_epoch: float | None
  images_per_s: float | None
  train_s: float | None


def timing(run: Run) -> Timing:
  """From results.json, or from the train windows of metrics.jsonl (unfinished runs)."""
  results = run.results or {}
  train_s = (results.get("timing") or {}).get("train_s")
  if results.get("seconds_per_epoch") is not None and train_s is not None:
    return Timing(results["seconds_per_epoch"], results.get("train_images_per_s"), train_s)
  windows = [r for r in run.records if r.get("train/images_per_s", 0) > 0
             and r.get("train/steps", 0) > 0]
  if not windows:
    return Timing(None, None, train_s)
  batch = float(run.setting("batch_size"))
  steps = sum(r["train/steps"] for r in windows)
  seconds = sum(r["train/steps"] * batch / r["train/images_per_s"] for r in windows)
  last = windows[-1]
  steps_per_epoch = last["step"] / last["epoch"]
  return Timing(seconds / steps * steps_per_epoch, steps * batch / seconds, seconds)


def expected_depth(run: Run) -> tuple[np.ndarray, float]:
  """(p_l per block, expected number of blocks): from results.json, else from the config
  through the model library."""
  results = run.results or {}
  if results.get("survival_probs"):
    probs = np.asarray(results["survival_probs"], dtype=np.float64)
    return probs, float(results.get("expected_depth", probs.sum()))
  from sdnet import models  # pylint: disable=g-import-not-at-top  (pulls in jax: only here)
  if run.setting("model.family", "cifar") == "cifar":
    build = models.CifarResNet
  else:
    build = models.ImageNetResNet
  probs = np.asarray(build(run.depth, p_last=run.p_last,
                           survival_rule=run.rule).survival_probs(), dtype=np.float64)
  return probs, float(probs.sum())


# ---------------------------------------------------------------------- figures


def _new_figure(width: float = 8.0, height: float = 5.0) -> mpl_figure.Figure:
  fig = mpl_figure.Figure(figsize=(width, height), layout="constrained")
  backend_agg.FigureCanvasAgg(fig)
  return fig


def _colors(n: int) -> list:
  cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
  return [cmap(i % cmap.N) for i in range(n)]


def _mark_lr_changes(ax, runs: Sequence[Run]) -> None:
  for epoch in sorted({e for run in runs for e in lr_change_epochs(run)}):
    ax.axvline(epoch, color="0.6", linestyle=":", linewidth=1, gid=LR_DROP_GID,
               label="_nolegend_")


def _split_words(splits: set[str]) -> str:
  return " / ".join(s for s in ("test", "validation") if s in splits)


def _legend_below(fig: mpl_figure.Figure, handles: list, labels: list[str]) -> None:
  fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize="small")


def learning_curves_figure(runs: Sequence[Run]) -> mpl_figure.Figure:
  """Fig. 3: error per evaluation (solid, left axis, %) and training loss per epoch
  (dashed, right axis) of every run; dotted lines where the learning rate changes."""
  fig = _new_figure(8, 5 + 0.2 * len(runs))
  ax_error = fig.add_subplot()
  ax_loss = ax_error.twinx()
  splits, handles, legends = set(), [], []
  for run, color in zip(runs, _colors(len(runs))):
    epochs, errors_, split = evaluation_curve(run)
    splits.add(split)
    handles += ax_error.plot(epochs, 100 * errors_, color=color, gid=f"{run.name}/error",
                             label=f"{run.legend}: {split} error")
    if split == "test" and len(epochs) < sum("validation/error" in r for r in run.records):
      legends.append(f"{run.legend}, test error at new best validation only")
    else:
      legends.append(run.legend)
    epochs, losses = per_epoch_mean(run.records, "train/loss")
    ax_loss.plot(epochs, losses, color=color, linestyle="--", gid=f"{run.name}/loss",
                 label=f"{run.legend}: training loss")
  _mark_lr_changes(ax_error, runs)
  words = _split_words(splits)
  ax_error.set_xlabel("epoch")
  ax_error.set_ylabel(f"{words} error (%), solid")
  ax_loss.set_ylabel("training loss (epoch mean), dashed")
  styles = [mpl_lines.Line2D([], [], color="k"),
            mpl_lines.Line2D([], [], color="k", linestyle="--"),
            mpl_lines.Line2D([], [], color="0.6", linestyle=":")]
  _legend_below(fig, handles + styles,
                legends + [f"{words} error", "training loss", "learning-rate change"])
  ax_error.set_title("Learning curves (Huang et al. 2016, Fig. 3)")
  return fig


def gradient_figure(runs: Sequence[Run]) -> mpl_figure.Figure | None:
  """Fig. 7: mean |dL/dW| of the first convolution of block 1 per epoch; None when no
  run logged it."""
  key = "train/first_block_grad_abs"
  runs = [run for run in runs if any(key in r for r in run.records)]
  if not runs:
    return None
  fig = _new_figure(8, 5 + 0.1 * len(runs))
  ax = fig.add_subplot()
  positive = True
  for run, color in zip(runs, _colors(len(runs))):
    epochs, values = per_epoch_mean(run.records, key)
    positive &= bool(np.all(values > 0))
    ax.plot(epochs, values, color=color, gid=f"{run.name}/gradient", label=run.legend)
  _mark_lr_changes(ax, runs)
  if positive:
    ax.set_yscale("log")
  ax.set_xlabel("epoch")
  ax.set_ylabel("mean |gradient|, first conv of block 1")
  _legend_below(fig, *ax.get_legend_handles_labels())
  ax.set_title("Gradient magnitude (Huang et al. 2016, Fig. 7)")
  return fig


def survival_figure(runs: Sequence[Run]) -> mpl_figure.Figure:
  """p_l against block l = 1..L for every run."""
  fig = _new_figure(7, 4 + 0.1 * len(runs))
  ax = fig.add_subplot()
  for run, color in zip(runs, _colors(len(runs))):
    probs, _ = expected_depth(run)
    ax.plot(np.arange(1, len(probs) + 1), probs, color=color, gid=f"{run.name}/survival",
            label=run.legend)
  ax.set_xlabel("residual block l")
  ax.set_ylabel("survival probability p_l")
  ax.set_ylim(0, 1.05)
  _legend_below(fig, *ax.get_legend_handles_labels())
  return fig


def sweep_groups(runs: Sequence[Run]) -> list[list[Run]]:
  """Groups of at least 3 runs with distinct (p_L, rule) and otherwise the same
  training config (fields that do not change training ignored)."""
  ignored = set(workdir_lib.UNCHECKED_FIELDS)
  groups: dict[str, list[Run]] = {}
  for run in runs:
    rest = {k: v for k, v in run.config.items() if k not in ignored}
    rest["survival"] = {k: v for k, v in (rest.get("survival") or {}).items()
                        if k not in ("p_last", "rule")}
    groups.setdefault(json.dumps(rest, sort_keys=True, default=str), []).append(run)
  return [group for group in groups.values()
          if len({(r.p_last, r.rule) for r in group}) >= 3]


def plot_sweep(runs: Sequence[Run]) -> mpl_figure.Figure:
  """Fig. 8 (left): error against p_L, one line per survival rule (constant depth,
  p_L = 1, belongs to both), and the training time of each run against p_L."""
  fig = _new_figure(11, 4.5)
  ax_error, ax_time = fig.subplots(1, 2)
  splits = set()
  hours = max((timing(r).train_s or 0) for r in runs) > 2 * 3600
  for rule in RULES:
    members = _one_run_per_p_last([r for r in runs if r.rule == rule or r.is_constant_depth])
    if not any(r.rule == rule and not r.is_constant_depth for r in members):
      continue
    summaries = [error_summary(r) for r in members]
    splits |= {s.split for s in summaries}
    p_last = [r.p_last for r in members]
    error = [np.nan if s.at_best_validation is None else 100 * s.at_best_validation
             for s in summaries]
    ax_error.plot(p_last, error, marker="o", gid=f"error/{rule}", label=rule)
    seconds = [_schedule_train_s(r) for r in members]
    ax_time.plot(p_last, [np.nan if s is None else s / (3600 if hours else 60)
                          for s in seconds], marker="o", gid=f"time/{rule}", label=rule)
  ax_error.set_xlabel("p_L")
  ax_error.set_ylabel(f"{_split_words(splits)} error at best validation (%)")
  ax_error.set_title("Error vs p_L (Huang et al. 2016, Fig. 8 left)")
  ax_time.set_xlabel("p_L")
  ax_time.set_ylabel(f"training time ({'h' if hours else 'min'}, train steps)")
  ax_time.set_title("Training time vs p_L")
  for ax in (ax_error, ax_time):
    ax.legend()
  return fig


def _one_run_per_p_last(runs: Sequence[Run]) -> list[Run]:
  """The runs sorted by p_L, one per p_L (the first finished one, else the first)."""
  chosen: dict[float, Run] = {}
  for run in runs:
    if run.p_last not in chosen or (run.finished and not chosen[run.p_last].finished):
      chosen[run.p_last] = run
  return [chosen[p] for p in sorted(chosen)]


def _schedule_train_s(run: Run) -> float | None:
  """Train-step time of the whole schedule: measured when finished, else seconds per
  epoch so far times the configured epochs."""
  measured = timing(run)
  if run.finished and measured.train_s is not None:
    return measured.train_s
  if measured.seconds_per_epoch is None:
    return None
  return measured.seconds_per_epoch * run.epochs


def save_figure(fig: mpl_figure.Figure, path: str | os.PathLike) -> None:
  """Writes `fig` as PNG to `path` (local or any epath filesystem)."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=110)
  epath.Path(path).write_bytes(buffer.getvalue())


def sweep_figure(run_dirs: Iterable[str | os.PathLike],
                 out: str | os.PathLike) -> mpl_figure.Figure:
  """The p_L sweep figure of the runs in `run_dirs`, written to the PNG file `out`."""
  runs, _ = load_runs(run_dirs)
  if not runs:
    raise errors.UserError("no run with metrics.jsonl to plot a sweep of.")
  fig = plot_sweep(runs)
  save_figure(fig, out)
  return fig


# ----------------------------------------------------------------------- tables


@dataclasses.dataclass(frozen=True)
class Table1Row:
  run: Run
  errors: ErrorSummary
  paper_error: float | None  # percent
  notes: tuple[str, ...]


def table1_rows(runs: Sequence[Run]) -> list[Table1Row]:
  """One row per run: its error at the best validation epoch and at the end, and the
  paper's number for the same dataset, depth and p_L."""
  rows = []
  for run in runs:
    summary = error_summary(run)
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
  stochastic: Run
  constant: Run
  stochastic_timing: Timing
  constant_timing: Timing

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


def _pair_key(run: Run) -> tuple:
  return (run.dataset, run.setting("data_dir", ""), run.setting("model.family", "cifar"),
          run.depth, run.epochs, run.setting("batch_size"))


def table2_rows(runs: Sequence[Run]) -> list[Table2Row]:
  """Every (stochastic, constant-depth) pair of runs with the same dataset, depth,
  epochs and batch size."""
  return [Table2Row(sd, constant, timing(sd), timing(constant))
          for sd in runs if not sd.is_constant_depth
          for constant in runs if constant.is_constant_depth
          and _pair_key(constant) == _pair_key(sd)]


def expected_depth_rows(runs: Sequence[Run]) -> list[tuple[Run, int, float]]:
  """(run, number of blocks L, expected number of blocks E[L~]) per run."""
  rows = []
  for run in runs:
    probs, expected = expected_depth(run)
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


def expected_depth_markdown(rows: Sequence[tuple[Run, int, float]]) -> str:
  return markdown_table(
      ["run", "p_L (rule)", "blocks L", "expected blocks E[L~]", "E[L~] / L"],
      [(run.name, f"{run.p_last:g} ({run.rule})", blocks, f"{expected:.2f}",
        f"{expected / blocks:.3f}") for run, blocks, expected in rows])


# ----------------------------------------------------------------------- report


def write_report(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike
                 ) -> tuple[epath.Path, list[str]]:
  """Writes the figures and OUT/REPORT.md for the runs in `run_dirs`.

  Returns:
    The path of REPORT.md and the warnings about directories skipped.
  Raises:
    errors.UserError: a directory is not a run's, or no run has any metrics.
  """
  runs, warnings = load_runs(run_dirs)
  if not runs:
    raise errors.UserError("none of the given run directories has metrics.jsonl: "
                           "nothing to report.")
  out = epath.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  sections = ["# Stochastic depth: report\n", _runs_section(runs)]
  save_figure(learning_curves_figure(runs), out / FIGURE_FILES["curves"])
  sections.append(
      "## Learning curves (Fig. 3)\n\n"
      f"![learning curves]({FIGURE_FILES['curves']})\n\n"
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
  gradients = gradient_figure(runs)
  if gradients is not None:
    save_figure(gradients, out / FIGURE_FILES["gradients"])
    sections.append(
        "## Gradient magnitude (Fig. 7)\n\n"
        f"![first-block gradients]({FIGURE_FILES['gradients']})\n\n"
        "Mean absolute gradient of the first convolution of residual block 1, per epoch.\n")
  save_figure(survival_figure(runs), out / FIGURE_FILES["survival"])
  sections.append(
      "## Survival probabilities and expected depth\n\n"
      f"![survival probabilities]({FIGURE_FILES['survival']})\n\n" +
      expected_depth_markdown(expected_depth_rows(runs)))
  for i, group in enumerate(sweep_groups(runs)):
    name = FIGURE_FILES["sweep"] if i == 0 else FIGURE_FILES["sweep"].replace(
        ".png", f"_{i + 1}.png")
    save_figure(plot_sweep(group), out / name)
    sections.append(
        f"## p_L sweep (Fig. 8, left): {len(group)} runs\n\n![p_L sweep]({name})\n\n"
        "Left: error at the best validation epoch against p_L per survival rule "
        "(constant depth, p_L = 1, on both lines). Right: train-step time of the whole "
        "schedule (unfinished runs: seconds per epoch so far x epochs).\n")
  report = out / "REPORT.md"
  report.write_text("\n".join(sections))
  return report, warnings


def _runs_section(runs: Sequence[Run]) -> str:
  rows = [(run.name, str(run.path), run.label, run.status(),
           (run.results or {}).get("dataset", run.dataset)) for run in runs]
  return "## Runs\n\n" + markdown_table(["run", "workdir", "survival", "status", "data"],
                                        rows)

"""The paper's figures from runs (`experiments.report.runs`), as matplotlib Figures.

Following Huang et al. (2016): learning curves (Fig. 3), the gradient magnitude of the
first convolution (Fig. 7), survival probabilities per block, and the p_L sweep (Fig. 8,
left). Every function returns its `Figure`, whose plotted data the tests read back.
"""

from __future__ import annotations

from collections.abc import Sequence
import io
import os

from etils import epath
import matplotlib
from matplotlib import figure as mpl_figure
from matplotlib import lines as mpl_lines
from matplotlib.backends import backend_agg
import numpy as np

from experiments import results as results_lib
from experiments.report import runs as runs_lib
from experiments.runtime import workdir as workdir_lib
from sdnet import options

LR_DROP_GID = "lr_drop"
FIGURE_FILES = {"curves": "learning_curves.png", "gradients": "first_block_gradients.png",
                "survival": "survival_probabilities.png", "sweep": "p_last_sweep.png"}

# ---------------------------------------------------------------------- figures


def _new_figure(width: float = 8.0, height: float = 5.0) -> mpl_figure.Figure:
  fig = mpl_figure.Figure(figsize=(width, height), layout="constrained")
  backend_agg.FigureCanvasAgg(fig)
  return fig


def _colors(n: int) -> list:
  cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
  return [cmap(i % cmap.N) for i in range(n)]


def _mark_lr_changes(ax, runs: Sequence[runs_lib.Run]) -> None:
  for epoch in sorted({e for run in runs for e in runs_lib.lr_change_epochs(run)}):
    ax.axvline(epoch, color="0.6", linestyle=":", linewidth=1, gid=LR_DROP_GID,
               label="_nolegend_")


def _split_words(splits: set[str]) -> str:
  return " / ".join(s for s in ("test", "validation") if s in splits)


def _legend_below(fig: mpl_figure.Figure, handles: list, labels: list[str]) -> None:
  fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize="small")


def learning_curves_figure(runs: Sequence[runs_lib.Run]) -> mpl_figure.Figure:
  """Fig. 3: error per evaluation (solid, left axis, %) and training loss per epoch
  (dashed, right axis) of every run; dotted lines where the learning rate changes."""
  fig = _new_figure(8, 5 + 0.2 * len(runs))
  ax_error = fig.add_subplot()
  ax_loss = ax_error.twinx()
  splits, handles, legends = set(), [], []
  for run, color in zip(runs, _colors(len(runs))):
    epochs, errors_, split = runs_lib.evaluation_curve(run)
    splits.add(split)
    handles += ax_error.plot(epochs, 100 * errors_, color=color, gid=f"{run.name}/error",
                             label=f"{run.legend}: {split} error")
    evaluations = sum(results_lib.error_name("validation") in r for r in run.records)
    if split == "test" and len(epochs) < evaluations:
      legends.append(f"{run.legend}, test error at new best validation only")
    else:
      legends.append(run.legend)
    epochs, losses = runs_lib.per_epoch_mean(run.records, results_lib.TRAIN_LOSS)
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


def gradient_figure(runs: Sequence[runs_lib.Run]) -> mpl_figure.Figure | None:
  """Fig. 7: mean |dL/dW| of the first convolution of block 1 per epoch; None when no
  run logged it."""
  key = results_lib.FIRST_BLOCK_GRADIENT
  runs = [run for run in runs if any(key in r for r in run.records)]
  if not runs:
    return None
  fig = _new_figure(8, 5 + 0.1 * len(runs))
  ax = fig.add_subplot()
  positive = True
  for run, color in zip(runs, _colors(len(runs))):
    epochs, values = runs_lib.per_epoch_mean(run.records, key)
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


def survival_figure(runs: Sequence[runs_lib.Run]) -> mpl_figure.Figure:
  """p_l against block l = 1..L for every run."""
  fig = _new_figure(7, 4 + 0.1 * len(runs))
  ax = fig.add_subplot()
  for run, color in zip(runs, _colors(len(runs))):
    probs, _ = runs_lib.expected_depth(run)
    ax.plot(np.arange(1, len(probs) + 1), probs, color=color, gid=f"{run.name}/survival",
            label=run.legend)
  ax.set_xlabel("residual block l")
  ax.set_ylabel("survival probability p_l")
  ax.set_ylim(0, 1.05)
  _legend_below(fig, *ax.get_legend_handles_labels())
  return fig


def plot_sweep(runs: Sequence[runs_lib.Run]) -> mpl_figure.Figure:
  """Fig. 8 (left): error against p_L, one line per survival rule (constant depth,
  p_L = 1, belongs to both), and the training time of each run against p_L."""
  fig = _new_figure(11, 4.5)
  ax_error, ax_time = fig.subplots(1, 2)
  splits = set()
  hours = max((runs_lib.timing(r).train_s or 0) for r in runs) > 2 * 3600
  for rule in options.choices(options.SurvivalRule):
    members = runs_lib.one_run_per_p_last([r for r in runs if r.rule == rule or r.is_constant_depth])
    if not any(r.rule == rule and not r.is_constant_depth for r in members):
      continue
    summaries = [runs_lib.error_summary(r) for r in members]
    splits |= {s.split for s in summaries}
    p_last = [r.p_last for r in members]
    error = [np.nan if s.at_best_validation is None else 100 * s.at_best_validation
             for s in summaries]
    ax_error.plot(p_last, error, marker="o", gid=f"error/{rule}", label=rule)
    seconds = [runs_lib.schedule_train_s(r) for r in members]
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


def save_figure(fig: mpl_figure.Figure, path: str | os.PathLike) -> None:
  """Writes `fig` as PNG to `path` (local or any epath filesystem), atomically."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=110)
  workdir_lib.write_bytes_atomic(epath.Path(path), buffer.getvalue())

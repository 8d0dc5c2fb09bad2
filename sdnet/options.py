"""The option values of the library, as `Literal` types, and their one check.

Each option is checked against its own choices only (`check`); which skipping methods
suit which gate mode is checked on its own (`check_skip_for_mode`).
"""

from __future__ import annotations

import typing
from typing import Literal

Mode = Literal["batch", "row", "subset"]
"""How the gates of a block are drawn:

  "batch"   one gate per block and mini-batch, b_l ~ Bern(p_l) (the paper);
  "row"     one gate per block and example, independent Bern(p_l) ("drop path", timm);
  "subset"  exactly k_l = round(p_l * n) of every n examples run the block, drawn without
            replacement (DINOv2's fixed subset): the same expectation as "row", not its
            Bernoulli draw (`sdnet.gates.draw`).
"""

ROW_MODES = ("row", "subset")
"""The modes that gate every example apart."""

Scaling = Literal["paper", "inverted", "none"]
"""Where the branch is scaled: x p_l at test (the paper), / p_l in training, or never."""

SurvivalRule = Literal["linear_decay", "uniform"]
"""How p_l falls with depth: linearly to p_L (the paper's default), or p_l = p_L."""

PAPER_SURVIVAL_RULE: SurvivalRule = "linear_decay"
"""The paper's rule (Huang et al., 2016, Eq. 4): every default of the library."""

Skip = Literal["auto", "cond", "mask", "gather"]
"""How `StochasticResidual` drops a block: `lax.cond` (batch mode), the kept examples
gathered into a smaller batch (row and subset modes, `sdnet.rows`), or a gate multiply
(every mode; the dropped work is still done)."""

StageSkip = Literal["auto", "cond", "mask", "compact", "gather"]
"""How a network drops blocks: the block methods, or compaction of a whole stage."""

_SKIPS_FOR_MODE = {"batch": ("auto", "cond", "mask", "compact"),
                   "row": ("auto", "mask", "gather"),
                   "subset": ("auto", "mask", "gather")}


def choices(option_type) -> tuple[str, ...]:
  return typing.get_args(option_type)


def check(what: str, value, option_type) -> None:
  """ValueError naming `what`, the bad `value` and the allowed choices."""
  if value not in choices(option_type):
    raise ValueError(f"unknown {what} {value!r}; choose one of {choices(option_type)}.")


def check_skip_for_mode(skip: str, mode: str) -> None:
  """Per-example gates skip rows, not whole branches; batch gates skip whole branches."""
  if skip in _SKIPS_FOR_MODE.get(mode, (skip,)):
    return
  if mode in ROW_MODES:
    raise ValueError(
        f"{mode} mode drops blocks per example, so a branch runs for some rows of most "
        f"batches: skip={skip!r} cannot skip it whole. Use skip='gather' (runs the branch "
        "on the kept rows only), 'mask' or 'auto'.")
  raise ValueError(
      f"batch mode drops a block for the whole mini-batch: skip={skip!r} is a per-example "
      "method. Use skip='cond', 'compact', 'mask' or 'auto', or mode='row'.")

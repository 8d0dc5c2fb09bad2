"""The option values of the library, as `Literal` types, and their one check.

Each option is checked against its own choices only (`check`); the one pairing that is
not allowed, per-example gates with a skipping implementation, is checked on its own
(`check_skip_for_mode`).
"""

from __future__ import annotations

import typing
from typing import Literal

Mode = Literal["batch", "row"]
"""One gate per block and mini-batch (the paper) or one per block and example."""

Scaling = Literal["paper", "inverted", "none"]
"""Where the branch is scaled: x p_l at test (the paper), / p_l in training, or never."""

SurvivalRule = Literal["linear_decay", "uniform"]
"""How p_l falls with depth: linearly to p_L (the paper's default), or p_l = p_L."""

PAPER_SURVIVAL_RULE: SurvivalRule = "linear_decay"
"""The paper's rule (Huang et al., 2016, Eq. 4): every default of the library."""

Skip = Literal["auto", "cond", "mask"]
"""How `StochasticResidual` drops one block: `lax.cond`, or a gate multiply."""

StageSkip = Literal["auto", "cond", "mask", "compact"]
"""How a `ResNet` drops blocks: the block methods, or compaction of a whole stage."""


def choices(option_type) -> tuple[str, ...]:
  return typing.get_args(option_type)


def check(what: str, value, option_type) -> None:
  """ValueError naming `what`, the bad `value` and the allowed choices."""
  if value not in choices(option_type):
    raise ValueError(f"unknown {what} {value!r}; choose one of {choices(option_type)}.")


def check_skip_for_mode(skip: str, mode: str) -> None:
  """Per-example gates cannot skip a branch: some rows of the batch still need it."""
  if mode == "row" and skip in ("cond", "compact"):
    raise ValueError(
        "row mode drops blocks per example, so the branch always runs for some rows: "
        f"it cannot be skipped (skip={skip!r}). Use skip='mask' or 'auto'.")

"""Survival probabilities p_l of the residual blocks (Huang et al., 2016, Sec. 3).

Block l (l = 1..L, every residual block counted, transition blocks included, the stem
never) survives a training mini-batch with probability p_l. The schedules here return
NumPy arrays: they are static model configuration, not traced values.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sdnet import options

SurvivalSpec = Sequence[float] | np.ndarray


def _check_probability(p: float, name: str) -> None:
  if not 0.0 < p <= 1.0:
    raise ValueError(
        f"{name} must lie in (0, 1], got {p}: it is the probability that a block "
        "survives (1 means the block is never dropped).")


def _check_num_blocks(num_blocks: int) -> None:
  if int(num_blocks) != num_blocks or num_blocks < 1:
    raise ValueError(f"num_blocks must be a positive integer, got {num_blocks!r}.")


def linear_decay(num_blocks: int, p_last: float) -> np.ndarray:
  """Linear decay rule, Eq. (4) of the paper.

  p_l = 1 - (l / L) * (1 - p_L),  l = 1..L,

  so p_0 = 1 would be the (never dropped) input and p_L = p_last the last block.
  For L = 54, p_last = 0.5: p_1 = 0.99074, p_54 = 0.5, sum = (3L - 1) / 4 = 40.25.
  """
  _check_num_blocks(num_blocks)
  _check_probability(p_last, "p_last")
  l = np.arange(1, num_blocks + 1, dtype=np.float64)
  return 1.0 - (l / num_blocks) * (1.0 - p_last)


def uniform(num_blocks: int, p: float) -> np.ndarray:
  """Uniform rule: p_l = p for every block (the paper's weaker alternative, Fig. 8)."""
  _check_num_blocks(num_blocks)
  _check_probability(p, "p")
  return np.full((num_blocks,), float(p))


def drop_path_linear(num_blocks: int, rate: float) -> np.ndarray:
  """The drop-path schedule of DeiT, Swin and ConvNeXt (timm's `linspace(0, rate, L)`).

  p_i = 1 - rate * i / (L - 1),  i = 0..L-1,

  so the first block never drops and the last drops with probability `rate` (L = 1:
  p_0 = 1). Unlike the paper's Eq. (4), the denominator is L - 1 and the count starts at
  0: `linear_decay(L, 1 - rate)` gives 1 - rate * l / L for l = 1..L instead.
  """
  _check_num_blocks(num_blocks)
  if not 0.0 <= rate < 1.0:
    raise ValueError(
        f"drop_path_rate must lie in [0, 1), got {rate}: it is the probability that the "
        "last block is dropped for an example (0 disables drop path).")
  return 1.0 - np.linspace(0.0, rate, num_blocks, dtype=np.float64)


def validate(probs: SurvivalSpec, num_blocks: int | None = None) -> np.ndarray:
  """Checks an explicit per-block array of survival probabilities and returns it."""
  arr = np.asarray(probs, dtype=np.float64)
  if arr.ndim != 1:
    raise ValueError(f"survival probabilities must be a 1-D array, got shape {arr.shape}.")
  if num_blocks is not None and arr.shape[0] != num_blocks:
    raise ValueError(
        f"got {arr.shape[0]} survival probabilities for a network of {num_blocks} "
        "residual blocks: give exactly one per block.")
  bad = ~((arr > 0.0) & (arr <= 1.0))
  if bad.any():
    raise ValueError(
        f"survival probabilities must lie in (0, 1]; block(s) {np.flatnonzero(bad) + 1} "
        f"have {arr[bad]}.")
  return arr


def schedule(num_blocks: int, p_last: float = 0.5,
             rule: options.SurvivalRule = options.PAPER_SURVIVAL_RULE,
             probs: SurvivalSpec | None = None) -> np.ndarray:
  """The survival probabilities of a network: explicit `probs`, or `rule` at `p_last`.

  p_last = 1 gives constant depth (every block always runs).
  """
  if probs is not None:
    return validate(probs, num_blocks)
  options.check("survival rule", rule, options.SurvivalRule)
  return (linear_decay if rule == "linear_decay" else uniform)(num_blocks, p_last)


def expected_depth(probs: SurvivalSpec) -> float:
  """Expected number of residual blocks computed per mini-batch: E[L~] = sum_l p_l."""
  return float(np.sum(validate(probs)))


def is_constant_depth(probs: SurvivalSpec) -> bool:
  """True when no block can be dropped (every p_l = 1)."""
  return bool(np.all(validate(probs) == 1.0))

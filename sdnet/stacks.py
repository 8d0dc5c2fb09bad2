"""Stacks of same-shape stochastic blocks on stacked parameters, run as scans.

A deep stack of identical blocks (a ViT's encoder blocks, a ConvNeXt stage) keeps each
parameter once, with a leading block axis, as `nn.scan` creates it, and runs as a
`lax.scan` over that axis: the program holds one block whatever the depth, so it compiles
in about the time of one block instead of L (benchmarks/README.md, "Drop path").

What a block's program must know statically splits the stack into runs of consecutive
blocks of one kind (`BlockKind`), each its own scan over its slice of the parameters:

  - whether a traced gate decides the block (timm's first block, p = 1, never drops and
    runs plain),
  - the skip method its drop rate resolves to (`skip="auto"` may mask the blocks below a
    drop rate and gather those above),
  - in subset mode (training), k = round(p_l n): the size of the gathered batch. Blocks
    with the same k share a scan, however their p_l differ (the rows they run and their
    scale n / k are the same).

A block class here is a Linen module with attributes `train`, `skip` and
`survival_prob` (a static p_l, or None to read it from xs) called as
block(x, xs) -> (y, None), xs = {"prob": p_l, "gate": its gates}, each key optional: the
signature `nn.scan` needs. Blocks hold parameters only (no batch statistics).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np

from sdnet import backend
from sdnet import gates as gates_lib
from sdnet import options
from sdnet import residual as residual_lib


class BlockKind(NamedTuple):
  """What a block's program fixes statically (the module docstring)."""
  gated: bool                 # a traced gate, xs["gate"], decides the block
  scaled: bool                # the block reads its traced p_l from xs["prob"]
  skip: str                   # "cond", "gather" or "mask": the resolved method
  survival_prob: float | None  # a static p_l (subset training), else None
  run: Any = None             # what else separates runs (subset mode: k)


def block_kinds(probs: np.ndarray, gated: np.ndarray, *, train: bool, skip: options.Skip,
                mode: options.Mode, rows_per_group: int) -> list[BlockKind]:
  """The kind of every block of a stack with survival `probs` (NumPy, static), `gated`
  saying which blocks a traced gate decides."""
  kinds = []
  for p, gate in zip(np.asarray(probs, float), gated):
    how = residual_lib.resolve_skip(skip, mode, 1.0 - float(p))
    static_p = run = None
    if mode == "subset" and train and gate and p < 1:
      static_p, run = float(p), gates_lib.subset_size(float(p), rows_per_group)
    kinds.append(BlockKind(bool(gate), bool(p < 1 and static_p is None), how, static_p,
                           run))
  return kinds


def runs(kinds: Sequence[BlockKind]) -> list[tuple[int, int]]:
  """[lo, hi) ranges of consecutive blocks that can share a scan."""
  key = lambda k: k._replace(survival_prob=None)
  edges = [0] + [i for i in range(1, len(kinds)) if key(kinds[i]) != key(kinds[i - 1])]
  return list(zip(edges, edges[1:] + [len(kinds)]))


def run_stack(module: nn.Module, name: str, block_cls: type[nn.Module], block_kwargs: dict,
              x: jax.Array, kinds: Sequence[BlockKind], probs: jax.Array,
              gates: jax.Array | None, unroll: int | bool | str = "auto") -> jax.Array:
  """x through the stack `name` of `module`: len(kinds) blocks of `block_cls(**block_kwargs)`
  on stacked parameters, one `lax.scan` per run of blocks of one kind.

  Args:
    probs: (L,) p_l of every block (traced where scaled). gates: (L, ...) the blocks'
      gates (the rows of the ungated blocks are not read), or None.
    unroll: `lax.scan`'s unroll of every run, or "auto" (`sdnet.backend.unroll_blocks`).
  """
  length = len(kinds)
  if module.is_initializing():
    scanned = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                      length=length)
    x, _ = scanned(**block_kwargs, skip="mask", name=name)(x, {})
    return x
  params = module.get_variable("params", name)
  for lo, hi in runs(kinds):
    kind = kinds[lo]
    block = block_cls(**block_kwargs, skip=kind.skip, survival_prob=kind.survival_prob,
                      parent=None)
    xs = {}
    if kind.scaled:
      xs["prob"] = probs[lo:hi]
    if kind.gated:
      xs["gate"] = gates[lo:hi]
    run_params = jax.tree.map(lambda a: a[lo:hi], params)  # pylint: disable=cell-var-from-loop

    def body(h, params_xs, block=block):
      block_params, block_xs = params_xs
      return block.apply({"params": block_params}, h, block_xs)[0], None

    run_unroll = (backend.unroll_blocks(kind.skip, kind.gated) if unroll == "auto"
                  else unroll)
    x, _ = jax.lax.scan(body, x, (run_params, xs), unroll=run_unroll)
  return x

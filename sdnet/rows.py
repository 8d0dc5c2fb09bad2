"""Per-example stochastic depth that skips the rows it drops ("drop path" that saves work).

With per-example gates b_i (row mode: b_i ~ Bern(p_l); subset mode: exactly k of every n
rows), a residual block computes

    y_i = shortcut(x)_i + b_i * s * f(x)_i.

Masking (timm, torchvision, scenic) computes f on every row and multiplies by b_i. Here
f runs on the kept rows only, and a dropped row gets its shortcut alone:

  1. The batch is split into G contiguous groups of n rows (G = the number of devices the
     batch is sharded over, so that every device gathers and scatters its own rows; 1 on
     one device or under `pmap`). In each group, `order` lists the kept rows first, in
     their original order, then the dropped ones.
  2. The first c rows of `order` of every group are gathered into a batch of G * c rows,
     f runs on it, and its outputs are scattered back to their rows; rows past the k_g
     kept ones of group g (padding, c - k_g of them) are multiplied by 0 before the
     scatter, so they contribute nothing, forward or backward.
  3. c is static: row mode chooses it with one `lax.switch` among the capacities
     q, 2q, ..., n (q = ceil(n / 8)), the smallest that holds max_g k_g; subset mode
     knows it in advance (c = k) and needs no conditional.

The padding is less than q <= n / 8 + 1 rows per group (none in subset mode, and none
when k is a multiple of q). Eight capacities keep the program small (a switch of eight
copies of f) while the padding stays under an eighth of the batch: with q = n / 16 it
would halve, at twice the copies of f in the program (and of their saved residuals in the
backward pass of a switch, which JAX joins over branches). For every k from 0 to n the
outputs, gradients and parameter updates equal masking's, for branches whose examples are
independent (LayerNorm, attention within an example, MLPs, convolutions): every kept row
of f(gathered) is the row of f(x). A branch with batch statistics (BatchNorm in training)
sees other rows here than under masking; `sdnet.residual` refuses that pairing.

In row mode every capacity's function is rematerialised (`remat`): its backward pass
recomputes its forward pass from the batch x. Without it, JAX differentiates a switch
by making every branch return the saved residuals of all branches (zeros for those not
taken), eight sets of activations of 1/8 to 8/8 of the batch each, written every step:
that cost more than the recomputation (benchmarks/README.md, "Drop path").

The conditional itself is the caller's (`switch`): `jax.lax.switch` for pure functions,
`flax.linen.switch` or `flax.nnx.switch` for modules, so that both APIs share this math.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import math
from typing import Any

import jax
import jax.numpy as jnp

from sdnet import gates as gates_lib

CAPACITY_STEPS = 8
"""Capacities per group in row mode: q, 2q, ..., n with q = ceil(n / CAPACITY_STEPS)."""


def capacities(rows: int, steps: int = CAPACITY_STEPS) -> tuple[int, ...]:
  """The static batch sizes (per group) a row-mode branch may run on: multiples of
  q = ceil(rows / steps), the last one `rows`."""
  if rows < 1:
    raise ValueError(f"a group needs at least one row, got {rows}.")
  q = math.ceil(rows / steps)
  return tuple(sorted({min(rows, q * j) for j in range(1, steps + 1)}))


def kept_first(gate: jax.Array, groups: int) -> jax.Array:
  """(G, n) row indices within each group: the kept rows in order, then the dropped ones."""
  rows = gates_lib.check_groups(gate.shape[0], groups)
  return jnp.argsort(~gate.reshape(groups, rows), axis=-1, stable=True)


def capacity_index(gate: jax.Array, groups: int, sizes: Sequence[int]) -> jax.Array:
  """The index in `sizes` of the smallest capacity holding the kept rows of every group."""
  kept = jnp.max(jnp.sum(gate.reshape(groups, -1), axis=-1, dtype=jnp.int32))
  return jnp.searchsorted(jnp.asarray(sizes, jnp.int32), kept, side="left")


def gather(x: jax.Array, order: jax.Array, capacity: int) -> jax.Array:
  """The first `capacity` rows of `order` in every group: (G * capacity, ...)."""
  groups, rows = order.shape
  index = order[:, :capacity].reshape((groups, capacity) + (1,) * (x.ndim - 1))
  grouped = x.reshape((groups, rows) + x.shape[1:])
  return jnp.take_along_axis(grouped, index, axis=1).reshape((-1,) + x.shape[1:])


def scatter(y: jax.Array, order: jax.Array, gate: jax.Array, capacity: int) -> jax.Array:
  """The (G * capacity, ...) rows `y` back at their rows of the batch, zeros elsewhere;
  gathered rows that were dropped (padding) are zeroed first.

  A gather by the inverse permutation of `order` rather than a scatter: it keeps every
  group on its device under a sharded batch, and its transpose is the forward gather."""
  groups, rows = order.shape
  kept = jnp.take_along_axis(gate.reshape(groups, rows), order[:, :capacity], axis=1)
  y = y.reshape((groups, capacity) + y.shape[1:])
  y = jnp.where(kept.reshape(kept.shape + (1,) * (y.ndim - 2)), y, jnp.zeros((), y.dtype))
  padded = jnp.pad(y, ((0, 0), (0, rows - capacity)) + ((0, 0),) * (y.ndim - 2))
  position = jnp.argsort(order, axis=-1)  # where each row of the group sits in `order`
  index = position.reshape(position.shape + (1,) * (y.ndim - 2))
  return jnp.take_along_axis(padded, index, axis=1).reshape((groups * rows,) + y.shape[2:])


def run_kept(call: Callable[[Any, jax.Array], jax.Array], branch: Any, x: jax.Array,
             gate: jax.Array, *, groups: int = 1, subset: int | None = None,
             switch: Callable | None = None, remat: Callable | None = None) -> jax.Array:
  """b * f(x) row by row, with f run on the kept rows only (the module docstring).

  Args:
    call: call(branch, rows) -> f(rows); the branch's examples must be independent.
    branch: what `call` and `switch` pass through (a module, parameters, or None).
    x: (B, ...) input. gate: (B,) bool, True where the row keeps the branch.
    groups: G, the number of contiguous groups (devices) the batch is split into.
    subset: k in subset mode (exactly k of every group's rows are open): f runs on
      G * k rows with no conditional. None: row mode, capacities chosen by `switch`.
    switch: switch(index, functions, branch, x) calling functions[index](branch, x):
      `jax.lax.switch` adapted (the default), `flax.linen.switch`, `flax.nnx.switch`.
    remat: remat(function) -> the function rematerialised in the backward pass
      (`jax.checkpoint`, the default; `flax.linen.checkpoint`, `flax.nnx.remat`), applied
      to every capacity's function in row mode (see below).

  Returns (B, ...) with f(x)_i where b_i, 0 elsewhere.
  """
  gate = jnp.asarray(gate, jnp.bool_)
  order = kept_first(gate, groups)

  def bucket(capacity):
    def run(branch, h):
      return scatter(call(branch, gather(h, order, capacity)), order, gate, capacity)
    return run

  if subset is not None:
    return bucket(subset)(branch, x)
  sizes = capacities(x.shape[0] // groups)
  if len(sizes) == 1:
    return bucket(sizes[0])(branch, x)
  if switch is None:
    switch = lambda i, fns, b, h: jax.lax.switch(i, [lambda h, f=f: f(b, h) for f in fns], h)
  remat = remat or jax.checkpoint
  return switch(capacity_index(gate, groups, sizes), [remat(bucket(c)) for c in sizes],
                branch, x)


def rows_computed(gate: jax.Array, groups: int = 1, subset: int | None = None) -> jax.Array:
  """The rows `run_kept` computes for `gate` (kept rows plus padding), as a fraction of
  the batch: the benchmarks print it beside the times."""
  gate = jnp.asarray(gate, jnp.bool_)
  batch = gate.shape[0]
  if subset is not None:
    return jnp.asarray(groups * subset / batch, jnp.float32)
  sizes = capacities(batch // groups)
  index = capacity_index(gate, groups, sizes)
  return jnp.asarray(sizes, jnp.float32)[index] * groups / batch

"""Skipping by compaction: a stage's surviving blocks run in a few fixed-length scans.

A per-block `lax.cond` costs one conditional per block and pass; on XLA:GPU each one
copies its predicate to the host and drains the stream, so the 54 blocks of ResNet-110
cost 108 round trips per step, more than the skipped convolutions save. Compaction runs
a stage of n same-shape blocks with gates b_1..b_n (one per mini-batch, the paper's) and
k = sum_l b_l surviving blocks as follows:

  1. k in binary: k = sum_j c_j 2^j, j = m-1 .. 0, with m = bit_length(n).
  2. Segment j has 2^j slots and runs under one `lax.cond(c_j)` as a scan of length 2^j.
     Segments are taken in order of decreasing j; the survivors fill the open segments in
     their original order, so the stage computes H_l = H_{l-1} + f_l(H_{l-1}) for the
     surviving l, in order, and nothing for the dropped ones (the paper's Eq. 2-3).
  3. The blocks' stacked variables are gathered into the slots before the segments run;
     the new BatchNorm statistics are scattered back to the survivors' rows afterwards.

Exactly k blocks are computed, with m conditionals per stage (5 for ResNet-110's stages of
18, 8 for ResNet-1202's of 200) instead of n, and a program of m scan bodies per stage.
The gradient needs nothing special: the gather's transpose sends each slot's gradient
back to its block; dropped blocks get zero.
"""

from __future__ import annotations

from typing import Any, Callable, Tuple

import jax
import jax.numpy as jnp

# apply_block(block_variables, h, survival_prob) -> (new h, new block batch_stats)
BlockFn = Callable[[Any, jax.Array, jax.Array], Tuple[jax.Array, Any]]


def segment_lengths(num_blocks: int) -> Tuple[int, ...]:
  """2^(m-1), ..., 2, 1 with m = bit_length(num_blocks): enough to write any k <= n."""
  if num_blocks < 1:
    raise ValueError(f"a stage needs at least one block, got {num_blocks}.")
  return tuple(2 ** j for j in reversed(range(int(num_blocks).bit_length())))


def slot_blocks(gates: jax.Array) -> jax.Array:
  """The block index held by every slot, or n (no block) for the slots of closed segments.

  With survivors s_0 < s_1 < ... < s_{k-1} and segment j (length 2^j, static start S_j)
  open when bit j of k is set, slot S_j + t holds s_{o_j + t}, where
  o_j = sum_{i > j} c_i 2^i = (k >> (j + 1)) << (j + 1) survivors fill earlier segments.
  """
  gates = jnp.asarray(gates, jnp.bool_)
  n = gates.shape[0]
  survivors = jnp.argsort(~gates, stable=True)  # survivors first, in block order
  k = jnp.sum(gates, dtype=jnp.int32)
  slots = []
  for length in segment_lengths(n):
    bit = length.bit_length() - 1
    offset = (k >> (bit + 1)) << (bit + 1)
    ranks = offset + jnp.arange(length, dtype=jnp.int32)
    is_open = ((k >> bit) & 1) == 1
    slots.append(jnp.where(is_open, survivors[jnp.minimum(ranks, n - 1)], n))
  return jnp.concatenate(slots).astype(jnp.int32)


def run_stage(apply_block: BlockFn, variables: Any, x: jax.Array, gates: jax.Array,
              survival_probs: jax.Array, checkpoint: bool = False,
              unroll: int | bool = 1):
  """Runs the surviving blocks of a stage; returns (output, new stacked batch_stats).

  Args:
    apply_block: one block as a pure function (see BlockFn), called with a survivor's
      variables; it must not drop the block itself.
    variables: {"params": ..., "batch_stats": ...} stacked along a leading block axis n.
    x: the stage input. gates: (n,) bool, one per block. survival_probs: (n,) p_l.
    checkpoint: rematerialise each block in the backward pass.
    unroll: `lax.scan`'s unroll for every segment.
  """
  n = gates.shape[0]
  slots = slot_blocks(gates)
  gather = lambda a, fill: jnp.take(a, slots, axis=0, mode="fill", fill_value=fill)
  slot_vars = jax.tree.map(lambda a: gather(a, 0), variables)
  slot_probs = gather(jnp.asarray(survival_probs, jnp.float32), 1)
  k = jnp.sum(gates, dtype=jnp.int32)
  block = jax.checkpoint(apply_block) if checkpoint else apply_block

  def scan_segment(h, seg_vars, seg_probs):
    return jax.lax.scan(lambda h, vp: block(vp[0], h, vp[1]), h, (seg_vars, seg_probs),
                        unroll=unroll)

  def pass_segment(h, seg_vars, seg_probs):
    return h, seg_vars.get("batch_stats", {})

  new_stats, start = [], 0
  for length in segment_lengths(n):
    take = lambda a: a[start:start + length]
    seg_vars, seg_probs = jax.tree.map(take, slot_vars), take(slot_probs)
    is_open = ((k >> (length.bit_length() - 1)) & 1) == 1
    x, stats = jax.lax.cond(is_open, scan_segment, pass_segment, x, seg_vars, seg_probs)
    new_stats.append(stats)
    start += length
  new_stats = jax.tree.map(lambda *s: jnp.concatenate(s), *new_stats)
  scatter = lambda old, new: old.at[slots].set(new.astype(old.dtype), mode="drop")
  return x, jax.tree.map(scatter, variables.get("batch_stats", {}), new_stats)


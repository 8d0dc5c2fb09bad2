"""Skipping by compaction: a stage's surviving blocks run in a few fixed-length scans.

A per-block `lax.cond` costs one conditional per block and pass; on XLA:GPU each one
copies its predicate to the host and drains the stream, so the 54 blocks of ResNet-110
cost 108 round trips per step, more than the skipped convolutions save. Compaction runs
a stage of n same-shape blocks with gates b_1..b_n (one per mini-batch, the paper's) and
k = sum_l b_l surviving blocks as follows:

  1. The stage has segments of fixed lengths r, 2^(m-2), ..., 2, 1, where m = bit_length(n)
     and r = n - 2^(m-1) + 1: they sum to n, and k is the sum of a subset of them (with r
     when k >= r, then k - r <= 2^(m-1) - 1 in binary; else k < r <= 2^(m-1) in binary).
  2. Each segment runs under one `lax.cond` (is it in k's subset?) as a scan of its
     length. The survivors fill the open segments in their original order, so the stage
     computes H_l = H_{l-1} + f_l(H_{l-1}) for the surviving l, in order, and nothing for
     the dropped ones (the paper's Eq. 2-3).
  3. Each segment gathers its survivors' stacked variables; the new BatchNorm statistics
     are scattered back to the survivors' rows afterwards.

Exactly k blocks are computed, with m conditionals per stage (5 for ResNet-110's stages of
18, 8 for ResNet-1202's of 200) instead of n. The n slots hold as many saved activations
as a plain scan of the stage, and the program has m scan bodies per stage.
The gradient needs nothing special: the gather's transpose sends each slot's gradient
back to its block; dropped blocks get zero.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

# apply_block(block_variables, h, survival_prob) -> (new h, new block batch_stats)
BlockFn = Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, Any]]


def segment_lengths(num_blocks: int) -> tuple[int, ...]:
  """(r, 2^(m-2), ..., 2, 1), m = bit_length(n), r = n - 2^(m-1) + 1; they sum to n."""
  if num_blocks < 1:
    raise ValueError(f"a stage needs at least one block, got {num_blocks}.")
  m = int(num_blocks).bit_length()
  return (num_blocks - 2 ** (m - 1) + 1,) + tuple(2 ** j for j in reversed(range(m - 1)))


def open_segments(k: jax.Array, num_blocks: int):
  """For every segment, whether it runs: a subset of `segment_lengths` summing to k."""
  first, *powers = segment_lengths(num_blocks)
  with_first = k >= first
  rest = jnp.where(with_first, k - first, k)
  return [with_first] + [((rest >> (p.bit_length() - 1)) & 1) == 1 for p in powers]


def slot_blocks(gates: jax.Array) -> jax.Array:
  """The block index held by every slot, or n (no block) for the slots of closed segments.

  With survivors s_0 < s_1 < ... < s_{k-1}, slot S_i + t of segment i (static start S_i)
  holds s_{o_i + t}, where o_i is the total length of the open segments before i.
  """
  gates = jnp.asarray(gates, jnp.bool_)
  n = gates.shape[0]
  survivors = jnp.argsort(~gates, stable=True)  # survivors first, in block order
  k = jnp.sum(gates, dtype=jnp.int32)
  slots, offset = [], jnp.zeros((), jnp.int32)
  for length, is_open in zip(segment_lengths(n), open_segments(k, n)):
    ranks = offset + jnp.arange(length, dtype=jnp.int32)
    slots.append(jnp.where(is_open, survivors[jnp.minimum(ranks, n - 1)], n))
    offset = offset + jnp.where(is_open, length, 0)
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
  survival_probs = jnp.asarray(survival_probs, jnp.float32)
  block = jax.checkpoint(apply_block) if checkpoint else apply_block

  def scan_segment(h, seg_vars, seg_probs):
    return jax.lax.scan(lambda h, vp: block(vp[0], h, vp[1]), h, (seg_vars, seg_probs),
                        unroll=unroll)

  def pass_segment(h, seg_vars, seg_probs):
    return h, seg_vars.get("batch_stats", {})

  new_stats, start = [], 0
  for length in segment_lengths(n):
    seg_slots = slots[start:start + length]
    is_open = seg_slots[0] < n  # a closed segment's slots hold no block
    gather = lambda a, fill: jnp.take(a, seg_slots, axis=0, mode="fill", fill_value=fill)
    seg_vars = jax.tree.map(lambda a: gather(a, 0), variables)
    seg_probs = gather(survival_probs, 1)
    x, stats = jax.lax.cond(is_open, scan_segment, pass_segment, x, seg_vars, seg_probs)
    new_stats.append(stats)
    start += length
  new_stats = jax.tree.map(lambda *s: jnp.concatenate(s), *new_stats)
  scatter = lambda old, new: old.at[slots].set(new.astype(old.dtype), mode="drop")
  return x, jax.tree.map(scatter, variables.get("batch_stats", {}), new_stats)


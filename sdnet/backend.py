"""What sdnet does differently per JAX backend: every such choice, in one place.

- `auto_skip`: how `skip="auto"` drops blocks.
- `unroll_stages`: whether a stage's scan over its blocks is unrolled.
- `trace_steps_one_by_one`: whether several training steps in one compiled call are a
  Python loop (traced one after another) rather than a `lax.scan`.

Only the CPU choices are measured (a ResNet-20 train step at batch 8 took 30 ms plain
and 305 ms with a per-block `cond`; convolutions inside a loop ran about 20x slower than
unrolled). The GPU and TPU choices are reasoned, not measured: `benchmarks/suite.py`
measures every method on the machine it runs on, and the README keeps its figures.
"""

from __future__ import annotations

import jax

from sdnet import options


def platform() -> str:
  """The default JAX backend: "cpu", "gpu" or "tpu"."""
  return jax.default_backend()


def auto_skip(mode: options.Mode = "batch", *, stage: bool = True) -> str:
  """The implementation `skip="auto"` stands for (a stage's, or a lone block's).

  Per-example gates (row mode) cannot skip, so they mask. Otherwise:
    CPU  "mask"   measured: XLA:CPU runs a conditional around convolutions at ~10x the
                  cost of the plain block, more than the skipped work saves.
    GPU  "compact" for a stage, "cond" for a lone block. Reasoned, NOT measured: XLA:GPU
                  copies every conditional's predicate to the host and waits, so the
                  fewest conditionals should win; compaction runs bit_length(n) per stage
                  of n blocks instead of n, and computes only the survivors.
    TPU  "cond"   reasoned, not measured: TPUs evaluate predicates on the device.
  """
  if mode == "row":
    return "mask"
  backend = platform()
  if backend == "cpu":
    return "mask"
  if backend == "gpu" and stage:
    return "compact"
  return "cond"


def unroll_stages(length: int, remat: bool) -> int | bool:
  """`lax.scan` unroll for a stage of `length` blocks under `scan_unroll="auto"`.

  CPU: stages of up to 64 blocks unroll fully (measured: XLA:CPU runs convolutions
  inside a loop ~20x slower). Elsewhere, deeper, or with remat: a real loop (unrolled,
  XLA merges the recomputation with the forward pass and remat saves no memory: measured).
  """
  if remat:
    return 1
  return length <= 64 if platform() == "cpu" else 1


def trace_steps_one_by_one() -> bool:
  """Several train steps per compiled call: a Python loop on CPU (a loop around the
  convolutions is slow there, as above), a `lax.scan` elsewhere."""
  return platform() == "cpu"

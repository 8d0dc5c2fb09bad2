"""What sdnet does differently per JAX backend: every such choice, in one place.

- `conv_general_dilated`: the convolution the models compute with.
- `compiler_options`: the XLA options programs with those convolutions compile with.
- `auto_skip`, `resolve_skip`: how `skip="auto"` (and row mode) drop blocks.
- `unroll_stages`, `unroll_blocks`: whether a stage's scan over its blocks is unrolled.
- `branch_policy`: what a residual branch keeps for its backward pass.
- `keep_freed_host_memory`: host memory a CPU step frees stays for the next step.

The CPU choices are measured (2 cores, one process, variants interleaved); the GPU and
TPU ones are reasoned, not measured. The measurements behind each choice, and their
history, are in benchmarks/README.md; `python -m benchmarks.train_step` and
`benchmarks.suite` measure them again on any machine.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import importlib.util
import pkgutil

import jax
import jax.numpy as jnp

from sdnet import conv
from sdnet import options


def platform() -> str:
  """The default JAX backend: "cpu", "gpu" or "tpu"."""
  return jax.default_backend()


def conv_general_dilated():
  """The convolution the library's models compute with.

  CPU  `sdnet.conv.conv_general_dilated`: its gradients are canonical convolutions, which
       XLA:CPU runs fast inside conditionals and loops too (lax's run tens of times
       slower there, jax #12868).
  GPU, TPU  `lax.conv_general_dilated`.
  """
  return conv.conv_general_dilated if platform() == "cpu" else jax.lax.conv_general_dilated


# XLA:CPU's libraries: dots and reductions stay YNNPACK's (XLA's default list, jax 0.10.2
# and 0.12), convolutions go to oneDNN where XLA can call it, else to Eigen.
_YNN_WITHOUT_CONVOLUTIONS = "LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
_CPU_CONVOLUTIONS = {"xla_cpu_experimental_onednn_custom_call": True,
                     "xla_cpu_experimental_ynn_fusion_type": _YNN_WITHOUT_CONVOLUTIONS}


def compiler_options() -> dict:
  """XLA compiler options for programs that compute with `conv_general_dilated()`: pass
  them to `jax.jit(f, compiler_options=...)` or `.lower(...).compile(compiler_options=...)`.

  CPU  convolutions out of YNNPACK (XLA:CPU's default for more than 16 channels, the
       slowest of its kernels here) and into oneDNN where this jaxlib has it (jax 0.12),
       else into Eigen (jax 0.10.2 accepts the oneDNN option and rewrites nothing): the
       plain ResNet-56 step 0.84-0.92 of the default's time. Values differ from the
       default kernels' by float rounding. jax 0.12 cannot write a program with oneDNN
       calls to its persistent compilation cache (it warns and compiles it again).
  GPU, TPU  {} (nothing to choose).
  """
  if platform() != "cpu" or _compiled_probe() is None:
    return {}
  return dict(_CPU_CONVOLUTIONS)


def _rewrites_convolutions_to_onednn() -> bool:
  """Whether `compiler_options()` puts this jaxlib's CPU convolutions in oneDNN."""
  text = _compiled_probe()
  return text is not None and "__onednn$convolution" in text


@functools.cache
def _compiled_probe() -> str | None:
  """The compiled text of a convolution under `_CPU_CONVOLUTIONS`, or None if this XLA
  rejects those options."""
  image = jax.ShapeDtypeStruct((1, 4, 4, 32), jnp.float32)
  kernel = jax.ShapeDtypeStruct((3, 3, 32, 32), jnp.float32)
  convolve = functools.partial(jax.lax.conv_general_dilated, window_strides=(1, 1),
                               padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  try:
    return jax.jit(convolve).lower(image, kernel).compile(
        compiler_options=_CPU_CONVOLUTIONS).as_text()
  except jax.errors.JaxRuntimeError:
    return None


def auto_skip(mode: options.Mode = "batch", *, stage: bool = True,
              drop_rate: float | None = None) -> str:
  """The implementation `skip="auto"` stands for (a stage's, or a lone block's), in
  `mode`, for a block dropped with probability `drop_rate` (None: not known statically).

  Batch mode (one gate per mini-batch):
    CPU  "cond"    measured: per-block cond, its stages unrolled, is the fastest at
                   ResNet-56 and -110 on both JAX versions.
    GPU  "compact" for a stage, "cond" for a lone block; reasoned: XLA:GPU copies every
                   conditional's predicate to the host and waits, and compaction runs
                   bit_length(n) conditionals per stage of n blocks instead of n.
    TPU  "cond"    reasoned: TPUs evaluate predicates on the device.
  Row mode (Bernoulli per example):
    CPU  "mask"    measured (`benchmarks.drop_path`): gathering the kept rows costs a
                   conditional and a recomputed forward pass per branch; at
                   drop_path_rate 0.5 it saved 11-14% (ViT-S, ConvNeXt-T), below 0.4 on
                   a ConvNeXt nothing.
    GPU, TPU  "gather" above a drop rate of GATHER_FROM, else "mask"; reasoned, not
                   measured: DINOv2 found its subset gather paid only above 0.1.
  Subset mode (exactly round(p_l * B) examples: static shapes, no conditional):
    every backend  "gather" above a drop rate of GATHER_FROM, else "mask" (CPU measured:
                   the step costs about the rows it computes).
  """
  if mode in options.ROW_MODES:
    if mode == "row" and platform() == "cpu":
      return "mask"
    return "gather" if drop_rate is None or drop_rate > GATHER_FROM else "mask"
  if platform() == "gpu" and stage:
    return "compact"
  return "cond"


GATHER_FROM = 0.1
"""The drop rate of a block above which `auto_skip` gathers its kept rows (where it
gathers at all)."""


def resolve_skip(skip: str, mode: options.Mode = "batch", *, stage: bool = True,
                 drop_rate: float | None = None) -> str:
  """"cond", "compact", "gather" or "mask": what `skip` stands for on this backend, in
  `mode` and at `drop_rate` (`auto_skip`)."""
  if skip == "auto":
    return auto_skip(mode, stage=stage, drop_rate=drop_rate)
  return skip


def branch_policy(conv_output: str, gated: bool):
  """The remat policy of a residual block, or None; `gated`: its branch sits in a
  conditional (skip="cond") and the policy wraps the branch, else the block always runs
  and the policy wraps the whole block; `conv_output` is the name its convolutions'
  outputs carry.

  Saving only the convolutions' outputs (BatchNorm and activations recomputed in the
  backward pass) leaves two residuals per basic block; a closed `lax.cond` writes zeros
  of every residual's shape, so it writes fewer. Around a whole block it also recomputes
  the output activation's mask instead of stacking it in a scan.
    CPU  save only `conv_output`, gated or not (measured: SD ResNet-56 0.83 of the plain
         step against 0.91 without it; the plain ResNet-110 step 0.68 of keeping every
         residual on jax 0.12, 0.86 on jax 0.10.2, in about half the memory; around the
         whole plain block rather than its branch, 0.95-1.00 of the step in 7% less
         memory).
    GPU, TPU  None (not measured).
  """
  del gated  # the same choice for both kinds on every backend measured so far
  if platform() != "cpu":
    return None
  return jax.checkpoint_policies.save_only_these_names(conv_output)


def unroll_blocks(skip: str, gated: bool) -> int | bool:
  """`lax.scan` unroll of a run of stacked ViT or ConvNeXt blocks (`sdnet.stacks`) under
  `scan_unroll="auto"`, for blocks that skip with `skip` where `gated`.

  CPU  unrolled (True), except gathered blocks: measured (ViT-S/16, 112 px, B 64, rate
       0.5), the rolled masking step took 1.13x the unrolled one; rolled gathering 1.05x,
       while it compiled in 13 s against 43 (each block a switch of eight copies of its
       branches), so gathered blocks stay a loop (1).
  GPU, TPU  a loop (1): compile time and program size stay those of one block; reasoned.
  """
  if platform() != "cpu":
    return 1
  return 1 if gated and skip == "gather" else True


def unroll_stages(length: int, remat: bool, gated: bool = False) -> int | bool:
  """`lax.scan` unroll for `length` same-shape blocks under `scan_unroll="auto"`;
  `gated`: a traced gate decides whether each block runs (cond, compaction; a masked
  block always runs, so its stage counts as plain).

  CPU  gated stages of up to 64 blocks unroll (measured: 0.79-0.82 of the rolled SD
       step at ResNet-56 and -110). Plain stages of up to 64 blocks unroll where XLA
       keeps an `optimization_barrier` out of its fusions (jax 0.12: 0.95-0.98 of the
       rolled step, which spends ~10% of it zeroing and copying the scan's stacked
       residuals), and roll where it does not (jax 0.10.2: XLA then fuses the
       recomputation of every earlier block into the kernel gradients' transposes, 1.9x
       the step); `_fuses_through_barriers` asks this XLA. See `benchmarks.backend_choices`
       in benchmarks/README.md.
  Elsewhere, or with remat: a real loop (unrolled, XLA merges the recomputation with the
  forward pass and remat saves no memory).
  """
  if remat or platform() != "cpu" or length > 64:
    return 1
  return True if gated or not _fuses_through_barriers() else 1


@functools.cache
def _fuses_through_barriers() -> bool:
  """Whether this XLA:CPU fuses an elementwise producer into a transpose across an
  `optimization_barrier` (the barrier is dropped before fusion: jax 0.10.2)."""
  def program(x):
    y = jnp.maximum(x * 2.0 + 1.0, 0.0)
    return y, jax.lax.transpose(jax.lax.optimization_barrier(y), (1, 0))
  text = jax.jit(program).lower(jax.ShapeDtypeStruct((8, 16), jnp.float32)).compile().as_text()
  fused = [c for c in text.split("\n\n") if "maximum(" in c and "transpose(" in c]
  return bool(fused)


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_freed_host_memory() -> bool:
  """On a CPU-only JAX, makes glibc's malloc keep the memory a step frees for the next
  step: one arena, no mmap'd chunks, no trimming below 2 GiB free. Returns whether it
  did (False with accelerators installed, or without glibc).

  XLA:CPU mallocs each step's temporary buffers (hundreds of MB) on its worker threads and
  frees them when the step ends; glibc serves such sizes with mmap and gives them back
  with munmap, so every step page-faults and zeroes them again: ~110 thousand faults per
  ResNet-56 step (~450 MB), two thirds of a step with every block dropped (190 -> 64 ms,
  jax 0.10.2 and 0.12.1). Call it before JAX initialises its backend: threads that have
  malloc'd keep their arenas. The process keeps its peak heap. Not on GPU or TPU hosts,
  whose input pipelines' many threads would share the one arena (not measured).
  """
  if not _only_cpu_installed():
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  return all(mallopt(option, value) == 1 for option, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))


def _only_cpu_installed() -> bool:
  """Whether JAX will run on the CPU alone, known without initialising a backend:
  `jax_platforms` says "cpu", or no accelerator plugin (nor libtpu) is installed."""
  platforms = jax.config.jax_platforms
  if platforms:
    return set(platforms.split(",")) == {"cpu"}
  if importlib.util.find_spec("libtpu") is not None:
    return False
  if list(importlib.metadata.entry_points(group="jax_plugins")):
    return False
  namespace = importlib.util.find_spec("jax_plugins")
  return namespace is None or not list(
      pkgutil.iter_modules(namespace.submodule_search_locations))

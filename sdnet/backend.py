"""What sdnet does differently per JAX backend: every such choice, in one place.

- `conv_general_dilated`: the convolution the models compute with.
- `compiler_options`: the XLA options programs with those convolutions compile with.
- `auto_skip`: how `skip="auto"` drops blocks.
- `unroll_stages`: whether a stage's scan over its blocks is unrolled.
- `gated_branch_policy`: what a branch inside a conditional keeps for its backward pass.

Several training steps in one compiled call are a `lax.scan` on every backend: on CPU it
was a Python loop while loops around convolutions were slow; with `sdnet.conv` the scan
is as fast (ResNet-20, 4 steps per call: 571 against 646 ms per step plain, 446 against
456 SD on jax 0.12; 808/820 and 559/564 on jax 0.10.2) and compiles in half the time
(6 against 13-17 s).

The CPU choices are measured on 2 cores (Xeon, AVX-512), float32, batch 128, one jitted
train step (forward, backward, Nesterov SGD), variants interleaved in one process, medians
of 5-7 repetitions, jax 0.12.0.1 (Python 3.12) / jax 0.10.2 (Python 3.11); "rolled" is a
`lax.scan` over a stage's blocks, "unrolled" the same scan fully unrolled; SD is linear
decay to p_L = 0.5; all with `sdnet.conv`'s convolutions in XLA:CPU's default kernels,
before `compiler_options` (`python -m benchmarks.train_step` measures the defaults; with
the options, README 2026-12-02, the same choices give SD 0.81 / 0.72 of the plain step
at ResNet-56 / 110 on jax 0.12 and 0.73 / 0.72 on jax 0.10.2):

  ms per step                      ResNet-56 (0.12 / 0.10)    ResNet-110 (0.12)
  plain, rolled                     1519 / 1495                2871  (compile  6 s)
  plain, unrolled                   1158 / 1953                2638  (compile 28 s)
  SD, cond per block, rolled        1470 / 1620                2853
  SD, cond per block, unrolled      1161 / 1330                2294
  SD, compact, rolled               1421 / 1541                  -
  SD, compact, unrolled             1327 / 1305                  -
  SD, mask, rolled                  1628 / 1626                  -

With `lax`'s convolutions a conditional or loop around a convolution costs tens of times
the convolution (jax #12868, `sdnet.conv`): the SD cond step of ResNet-20 took ~30 s
against 0.6 s plain. The GPU and TPU choices are reasoned, not measured:
`benchmarks/suite.py` measures every method on the machine it runs on, and the README
keeps its figures.
"""

from __future__ import annotations

import functools

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
       XLA:CPU runs fast inside conditionals and loops too (top level: as fast as lax's,
       bit-identical; inside `lax.cond`, kernel gradient of NHWC 128x16x16x32 3x3: 23 ms
       against lax's 1062 ms on jax 0.10.2, 14 ms against 1037 ms on jax 0.12).
  GPU, TPU  `lax.conv_general_dilated` (nothing measured says otherwise).
  """
  return conv.conv_general_dilated if platform() == "cpu" else jax.lax.conv_general_dilated


# XLA:CPU's libraries: dots and reductions stay YNNPACK's (XLA's default list, jax 0.10.2
# and 0.12), convolutions go to oneDNN where XLA can call it, else to Eigen.
_YNN_WITHOUT_CONVOLUTIONS = "LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
_CPU_CONVOLUTIONS = {"xla_cpu_experimental_onednn_custom_call": True,
                     "xla_cpu_experimental_ynn_fusion_type": _YNN_WITHOUT_CONVOLUTIONS}


def compiler_options() -> dict:
  """XLA compiler options for programs that compute with `conv_general_dilated()`: pass
  them to `jax.jit(f, compiler_options=...)` or `.lower(...).compile(compiler_options=...)`
  (the experiments' steps compile with them, `experiments.lib.steps.compile_ahead`).

  CPU  convolutions not in YNNPACK, to which XLA:CPU gives those of more than 16 channels
       by default (the others go to Eigen) at 1.5-3x the time of PyTorch's oneDNN kernels
       (`benchmarks.conv_kernels`), but in oneDNN (XLA:CPU's `__onednn$convolution` custom
       call) where this jaxlib has it (jax 0.12), else in Eigen (jax 0.10.2 accepts the
       oneDNN option and rewrites nothing). Plain ResNet-56 step, batch 128, one process,
       interleaved, medians of 7-9:
         jax 0.12, oneDNN: 1641 -> 1385 ms (0.84; paired 0.89), 1573 -> 1394 (0.89;
           paired 0.84); SD p_L = 0.5: 1217 -> 1093, still 0.78 of the plain step. Per
           kernel (NHWC batch 128, 3x3): forward 9.8 -> 5.3 ms (32x32x16), 7.6 -> 4.4
           (16x16x32), 5.8 -> 4.6 (8x8x64); input gradient 8.3 -> 4.7, 7.4 -> 4.5,
           4.9 -> 4.6; the kernel gradient as `sdnet.conv` computes it 13.9 -> 18.0 (a
           forward convolution with a 32x32 kernel, oneDNN's weak case), 9.6 -> 12.1,
           8.5 -> 7.0, yet the whole step measured as fast as with only it in Eigen.
           Also tried, slower: YNNPACK's elementwise fusions (1.16), XLA's own
           reductions (1.13), kernel-gradient chunks of 8 or 32 (1.04, 1.09).
         jax 0.10.2, Eigen: 1880 -> 1728 ms (0.92; paired 0.93); SD 1310 -> 1266, 0.73 of
           the plain step.
       Values differ from the default kernels' by float rounding (relative 1e-6). jax 0.12
       cannot write a program with oneDNN calls to JAX's persistent compilation cache
       (XLA's serialisation fails with std::bad_alloc; jax warns, compiles it again next
       time).
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


def auto_skip(mode: options.Mode = "batch", *, stage: bool = True) -> str:
  """The implementation `skip="auto"` stands for (a stage's, or a lone block's).

  Per-example gates (row mode) cannot skip, so they mask. Otherwise:
    CPU  "cond"   measured (module table): per-block cond, its stages unrolled, is the
                  fastest at ResNet-56 and -110 on both JAX versions (compact ties on
                  jax 0.10 and compiles 3x longer).
    GPU  "compact" for a stage, "cond" for a lone block. Reasoned, NOT measured: XLA:GPU
                  copies every conditional's predicate to the host and waits, so the
                  fewest conditionals should win; compaction runs bit_length(n) per stage
                  of n blocks instead of n, and computes only the survivors.
    TPU  "cond"   reasoned, not measured: TPUs evaluate predicates on the device.
  """
  if mode == "row":
    return "mask"
  if platform() == "gpu" and stage:
    return "compact"
  return "cond"


def gated_branch_policy(conv_output: str):
  """The remat policy of a residual branch that sits in a conditional (skip="cond"), or
  None; `conv_output` is the name its convolutions' outputs carry.

  The backward pass of a `lax.cond` needs the residuals of the branch that ran, so the
  forward cond outputs them from both branches: a closed one writes zeros of every
  residual's shape (~10 ms of a closed ResNet-56 block's time on CPU). Saving only the
  convolutions' outputs (BatchNorm and activations are recomputed in the backward pass)
  leaves two residuals per basic block instead of several.
    CPU  save only `conv_output`: ResNet-56, batch 128, SD p_L = 0.5 (cond), medians of 7
         interleaved steps: 0.83 of the plain step against 0.91 without it (jax 0.12),
         0.79 against 0.85 (jax 0.10.2); saving nothing (full remat of the branch) 0.86 /
         0.98. `benchmarks.train_step` with it: ResNet-56 0.83 (13 repetitions), ResNet-110
         0.74 (jax 0.12), ResNet-56 0.80 (jax 0.10.2); a closed step 0.17-0.20 of an open
         one (0.26-0.29 without).
    GPU, TPU  None (not measured).
  """
  if platform() != "cpu":
    return None
  return jax.checkpoint_policies.save_only_these_names(conv_output)


def unroll_stages(length: int, remat: bool, gated: bool = False) -> int | bool:
  """`lax.scan` unroll for `length` same-shape blocks under `scan_unroll="auto"`;
  `gated`: a traced gate decides whether each block runs (cond, compaction; a masked
  block always runs, so its stage counts as plain).

  CPU (module table): gated stages of up to 64 blocks unroll (0.79-0.82 of the rolled
  step's time at ResNet-56 and -110). Plain stages of up to 18 blocks unroll on jax >= 0.12
  (0.76 of the rolled step at ResNet-56, 0.92 at ResNet-110, compiling 2-4x longer) and roll
  on older jax (unrolled: 1.31x the rolled step at ResNet-56); longer plain stages roll.
  Elsewhere, or with remat: a real loop (unrolled, XLA merges the recomputation with the
  forward pass and remat saves no memory: measured).
  """
  if remat or platform() != "cpu":
    return 1
  if gated:
    return True if length <= 64 else 1
  return True if length <= 18 and jax.__version_info__ >= (0, 12) else 1

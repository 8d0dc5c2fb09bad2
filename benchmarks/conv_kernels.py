r"""Times the convolutions of a CIFAR ResNet training step one by one: the floor under the step.

  python -m benchmarks.conv_kernels --cases=56:128                 # the library's, alone
  python -m benchmarks.conv_kernels --cases=56:128 --torch         # and PyTorch's, same process

Every distinct convolution of `sdnet.models.CifarResNet(depth)` (`inventory`) is timed at
the top level of a jitted program, as its three kernels: the forward convolution, the
gradient with respect to its input (not needed for the stem) and the gradient with respect
to its kernel, computed as the library's models compute them on this backend
(`sdnet.backend.conv_general_dilated`, differentiated by `jax.vjp`, compiled with
`sdnet.backend.compiler_options()`; no bias, which is an addition). With --torch the same
kernels of PyTorch eager (`torch.nn.functional.conv2d`, `aten.convolution_backward`, NCHW
as in `benchmarks.torch_reference`, on its GPU if it sees one) run in the same process,
interleaved with the jax ones: every repetition runs every kernel of both in turn, so a
machine whose speed drifts slows both alike. Reported: median ms per kernel, and
"per step": the sum over the network's convolutions of count x (forward + input gradient +
kernel gradient), which is what one training step spends in convolutions if each runs as
fast as alone. A whole step (`benchmarks.train_step`, `benchmarks.torch_reference`) cannot
take less than its convolutions, so the per-step ratio bounds how close the library's step
can come to PyTorch's on the same machine with these kernels.
"""

from __future__ import annotations

import dataclasses
import time

from absl import app
from absl import flags
import jax
import numpy as np

from benchmarks import common
from sdnet import backend
from sdnet import models

FLAGS = flags.FLAGS


def define_flags():
  """Its flags, defined when it runs as a program: importing it (the tests do) defines
  none, so it imports beside other programs' flags."""
  common.define_flags()
  flags.DEFINE_bool("torch", False, "Also time PyTorch's kernels, in this process.")


KERNELS = ("forward", "input gradient", "kernel gradient")


@dataclasses.dataclass(frozen=True)
class Convolution:
  """One distinct 3x3 convolution of a CIFAR ResNet: NHWC input (batch, size, size,
  in_features), `count` of them per network."""
  name: str
  size: int
  in_features: int
  out_features: int
  stride: int
  count: int

  @property
  def kernels(self) -> tuple[str, ...]:
    """The kernels a training step runs for it: the stem's input is data, so no input
    gradient."""
    return KERNELS if self.name != "stem" else (KERNELS[0], KERNELS[2])


def inventory(depth: int) -> list[Convolution]:
  """The convolutions of `models.CifarResNet(depth)`: the stem, then per stage its first
  branch convolution (stride 2 from stage 2 on) and the 2n - 1 others (n = (depth-2)/6)."""
  n = (depth - 2) // 6
  (f1, f2, f3) = models.CIFAR_FEATURES
  return [Convolution("stem", 32, 3, f1, 1, 1),
          Convolution("stage 1", 32, f1, f1, 1, 2 * n),
          Convolution("stage 2, first", 32, f1, f2, 2, 1),
          Convolution("stage 2", 16, f2, f2, 1, 2 * n - 1),
          Convolution("stage 3, first", 16, f2, f3, 2, 1),
          Convolution("stage 3", 8, f3, f3, 1, 2 * n - 1)]


def _operands(conv: Convolution, batch: int, rng):
  """x (B, size, size, in), w (3, 3, in, out), dy (B, size/stride, size/stride, out)."""
  out_size = conv.size // conv.stride
  x = rng.standard_normal((batch, conv.size, conv.size, conv.in_features), np.float32)
  w = rng.standard_normal((3, 3, conv.in_features, conv.out_features), np.float32) * 0.1
  dy = rng.standard_normal((batch, out_size, out_size, conv.out_features), np.float32)
  return x, w, dy


def jax_kernels(conv: Convolution, batch: int, rng) -> dict:
  """{kernel: (compiled, args)} of the library's convolution on this backend."""
  convolve = backend.conv_general_dilated()
  strides, padding = (conv.stride,) * 2, ((1, 1), (1, 1))

  def forward(x, w):
    return convolve(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def input_gradient(x, w, dy):
    return jax.vjp(lambda x: forward(x, w), x)[1](dy)[0]

  def kernel_gradient(x, w, dy):
    return jax.vjp(lambda w: forward(x, w), w)[1](dy)[0]

  x, w, dy = (jax.device_put(a) for a in _operands(conv, batch, rng))
  programs = {KERNELS[0]: (forward, (x, w)), KERNELS[1]: (input_gradient, (x, w, dy)),
              KERNELS[2]: (kernel_gradient, (x, w, dy))}
  options = backend.compiler_options()
  return {k: (jax.jit(f).lower(*args).compile(compiler_options=options), args)
          for k, (f, args) in programs.items() if k in conv.kernels}


def torch_kernels(conv: Convolution, batch: int, rng) -> dict:
  """{kernel: (callable, args)} of PyTorch's convolution (NCHW, `torch_reference`'s)."""
  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  x, w, dy = (torch.from_numpy(np.ascontiguousarray(a.transpose(axes))).to(device)
              for a, axes in zip(_operands(conv, batch, rng),
                                 ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))))
  strides, padding = (conv.stride,) * 2, (1, 1)

  def backward(mask):
    return lambda: torch.ops.aten.convolution_backward(
        dy, x, w, None, strides, padding, (1, 1), False, (0, 0), 1, mask)

  calls = {KERNELS[0]: lambda: F.conv2d(x, w, None, strides, padding),
           KERNELS[1]: backward((True, False, False)),
           KERNELS[2]: backward((False, True, False))}
  return {k: (f, ()) for k, f in calls.items() if k in conv.kernels}


def _torch_synchronize(out):
  """Waits for PyTorch's kernels (on CPU they are done when they return)."""
  import torch  # pylint: disable=import-outside-toplevel
  if torch.cuda.is_available():
    torch.cuda.synchronize()
  return out


def _time(fn, args, calls: int, block) -> float:
  start = time.perf_counter()
  for _ in range(calls):
    out = fn(*args)
  block(out)
  return (time.perf_counter() - start) / calls


def measure(depth: int, batch: int, *, with_torch: bool, repeats: int, calls: int,
            seed: int = 0) -> list[dict]:
  """One row per (framework, convolution, kernel) and a "per step" row per framework:
  {"framework", "convolution", "kernel", "count", "median_ms", "min_ms", "max_ms"}."""
  rng = np.random.default_rng(seed)
  frameworks = {"jax": (jax_kernels, jax.block_until_ready)}
  if with_torch:
    frameworks["torch"] = (torch_kernels, _torch_synchronize)
  timed = []  # (framework, conv, kernel, fn, args, block, times)
  for conv in inventory(depth):
    for name, (build, block) in frameworks.items():
      for kernel, (fn, args) in build(conv, batch, rng).items():
        _time(fn, args, 1, block)  # warm-up
        timed.append((name, conv, kernel, fn, args, block, []))
  for _ in range(repeats):
    for _, _, _, fn, args, block, times in timed:
      times.append(_time(fn, args, calls, block))
  rows, per_step = [], {}
  for name, conv, kernel, _, _, _, times in timed:
    ms = np.asarray(times) * 1e3
    rows.append({"framework": name, "convolution": conv.name, "kernel": kernel,
                 "count": conv.count, "median_ms": float(np.median(ms)),
                 "min_ms": float(ms.min()), "max_ms": float(ms.max())})
    per_step[name] = per_step.get(name, 0.0) + conv.count * rows[-1]["median_ms"]
  for name, total in per_step.items():
    rows.append({"framework": name, "convolution": f"ResNet-{depth} step", "kernel": "all",
                 "count": depth - 1, "median_ms": total, "min_ms": None, "max_ms": None})
  return rows


def format_table(rows: list[dict]) -> str:
  """One line per convolution and kernel: each framework's median ms, and their ratio."""
  by_key = {}
  for r in rows:
    by_key.setdefault((r["convolution"], r["kernel"], r["count"]), {})[r["framework"]] = r
  frameworks = list(dict.fromkeys(r["framework"] for r in rows))
  lines = [f"{'convolution':>16} {'kernel':>16} {'count':>5} " +
           " ".join(f"{f + ' ms':>10}" for f in frameworks) +
           (f" {'jax/torch':>9}" if len(frameworks) == 2 else "")]
  for (conv, kernel, count), by_framework in by_key.items():
    cells = [by_framework.get(f) for f in frameworks]
    line = f"{conv:>16} {kernel:>16} {count:>5} " + " ".join(
        f"{c['median_ms']:10.2f}" if c else f"{'-':>10}" for c in cells)
    if len(frameworks) == 2 and all(cells):
      line += f" {cells[0]['median_ms'] / cells[1]['median_ms']:9.2f}"
    lines.append(line)
  return "\n".join(lines)


def main(argv):
  del argv
  common.prepare_host(FLAGS.cores)
  print(f"JAX {jax.__version__} ({jax.default_backend()}), convolution "
        f"{backend.conv_general_dilated().__module__}")
  rows = []
  for depth, batch in common.cases(FLAGS.cases, FLAGS.small):
    rows += [{"depth": depth, "batch": batch, **r} for r in measure(
        depth, batch, with_torch=FLAGS.torch, repeats=FLAGS.repeats, calls=FLAGS.calls)]
    print(f"ResNet-{depth}, batch {batch}, medians of {FLAGS.repeats} interleaved "
          f"repetitions of {FLAGS.calls} calls:")
    print(format_table([r for r in rows if r["depth"] == depth and r["batch"] == batch]))
  if FLAGS.out:
    common.write_json(FLAGS.out, {"jax": jax.__version__, "backend": jax.default_backend(),
                                  "date": time.strftime("%Y-%m-%d"), "rows": rows})


if __name__ == "__main__":
  define_flags()
  app.run(main)

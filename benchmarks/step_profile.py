r"""Where a train step's time goes: the library's compiled step op by op, in categories,
and PyTorch eager's beside it.

  python -m benchmarks.step_profile --cases=56:128 --variants=constant,open,SD --repeats=5
  python -m benchmarks.step_profile --cases=56:128 --torch   # with PyTorch's (an
                                                             # interpreter with both)

JAX: the experiments' compiled step (`benchmarks.timing.make_variant`) runs `--repeats`
times under `jax.profiler`; XLA:CPU records one event per executed thunk, named after its
instruction of the compiled program (in conditionals and loops too), and an "end: <name>"
event where it finishes (later, for an asynchronous one). Each instruction's `op_name`
metadata is JAX's name stack: `jvp(...)` in the forward pass, `transpose(...)` in the
backward, the Flax module path, and the scopes the project names (`sdnet.conv`'s
"input_gradient" and "kernel_gradient", the train step's "update"); `categorize` puts
every instruction in one of `CATEGORIES`. Each instant of the trace is split equally among
the thunks running then (`shared_time`): the categories add up to the time a thunk ran,
close to the step's wall time, and two thunks run at once each get half.

PyTorch: `torch.profiler` over the same number of steps; each operator's self time goes to
a category by its name (`torch_category`); `aten::convolution_backward` computes both
gradients of a convolution in one call, so PyTorch has one "conv gradients" row.

CPU only: on a GPU or TPU the device's own trace lines hold the work (XProf reads them).

Variants: "constant" (p_L = 1, no gate), "open" / "closed" (every gate forced,
`timing.ForcedGates`), "SD" (p_L = --p_last, `skip="auto"`). benchmarks/README.md keeps the
figures.
"""

from __future__ import annotations

import collections
import glob
import re
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

from benchmarks import common

FLAGS = flags.FLAGS

CATEGORIES = (
    "conv forward", "conv input gradient", "conv kernel gradient", "conv gradients",
    "BatchNorm, ReLU, add: forward", "BatchNorm, ReLU, add: backward",
    "remat copies (reduce_precision)", "loop slices, copies", "update", "other")
"""The rows of the table: the convolutions' three kernels (PyTorch: "conv gradients",
both in one call); the rest of a residual block (BatchNorm, ReLU, the shortcut's add and
pooling, a closed branch's zeros); the copies JAX's remat makes of saved residuals (its
`reduce_precision`, an identity on float32 that XLA:CPU runs as a copy); the bookkeeping
of loops and conditionals (a scan's slices of stacked parameters and residuals, zeroed
accumulators, copies); the optimizer; and the rest (augmentation, stem, head, loss, gate
draws, metrics)."""

_CONVOLUTION = re.compile(r"^(convolution|custom-call:__onednn\$convolution)")
_INSTRUCTION = re.compile(r"%([\w.\-]+) = .*? ([a-z][a-z0-9\-]*)\((.*)$", re.M)


def instructions(hlo_text: str) -> dict[str, tuple[str, str]]:
  """{instruction name: (opcode, op_name)} of a compiled program's text; a custom call's
  opcode carries its target ("custom-call:__onednn$convolution")."""
  table = {}
  for name, opcode, rest in _INSTRUCTION.findall(hlo_text):
    target = re.search(r'custom_call_target="([^"]*)"', rest)
    op_name = re.search(r'op_name="([^"]*)"', rest)
    table[name] = (opcode + (f":{target.group(1)}" if target else ""),
                   op_name.group(1) if op_name else "")
  return table


def categorize(name: str, opcode: str, op_name: str) -> str:
  """The category (`CATEGORIES`) of one instruction of the compiled step."""
  backward = "transpose(" in op_name
  scopes = op_name.split("/")
  if "kernel_gradient" in scopes:
    return "conv kernel gradient"
  if "input_gradient" in scopes:
    return "conv input gradient"
  if _CONVOLUTION.match(opcode):
    # A backward convolution whose metadata is the add it absorbed (oneDNN's sum
    # post-op): the input gradient added to the shortcut's.
    return "conv input gradient" if backward else "conv forward"
  if "reduce_precision" in scopes[-1] or opcode == "reduce-precision":
    return "remat copies (reduce_precision)"
  if "update" in scopes:
    return "update"
  if (opcode in ("copy", "copy-start", "copy-done", "dynamic-slice", "dynamic-update-slice")
      or "dynamic" in name or "dynamic_slice" in op_name or "dynamic_update" in op_name
      or (name.startswith("wrapped_broadcast") and not scopes[-1])):
    return "loop slices, copies"
  if "jvp(" in op_name and any(s.startswith(("BatchNorm", "stem_norm", "residual"))
                               or s in ("jit(relu)", "relu") for s in scopes):
    return f"BatchNorm, ReLU, add: {'backward' if backward else 'forward'}"
  return "other"


_CONTROL_FLOW = ("while", "conditional", "call")


def thunk_intervals(events) -> list[tuple[int, int, str]]:
  """(start_ns, end_ns, instruction) of every executed thunk, from the events of every
  thread: (start_ns, duration_ns, name). A thunk ends where its "end: <name>" event ends:
  an asynchronous one (XLA:CPU's Eigen convolutions on jax 0.10) returns at once and
  finishes on other threads."""
  events = sorted(events)
  pending = collections.defaultdict(collections.deque)
  intervals = []
  for start, duration, name in events:
    if name.startswith("end: "):
      begun = pending[name[5:]]
      if begun:
        index = begun.popleft()
        intervals[index] = (intervals[index][0], start + duration, intervals[index][2])
    elif not name.startswith(("ThunkExecutor", "Slinky", "ThreadpoolListener")):
      pending[name].append(len(intervals))
      intervals.append((start, start + duration, name))
  return intervals


def shared_time(intervals, category_of) -> dict[str, float]:
  """{category: ns} of wall time in which thunks ran, each instant split equally among the
  thunks running then (so the sum is the time any thunk ran, never more)."""
  boundaries = []
  for index, (start, end, name) in enumerate(intervals):
    boundaries += [(start, 1, index), (end, -1, index)]
  boundaries.sort()
  totals, running, last = collections.Counter(), {}, None
  for time_ns, kind, index in boundaries:
    if running and last is not None and time_ns > last:
      share = (time_ns - last) / len(running)
      for category in running.values():
        totals[category] += share
    if kind > 0:
      running[index] = category_of(intervals[index][2])
    else:
      running.pop(index, None)
    last = time_ns
  return totals


def trace_events(variant, repeats: int) -> tuple[list[tuple[int, int, str]], list[float]]:
  """The XLA:CPU thread events of `repeats` calls of `variant`'s compiled step, as
  (start_ns, duration_ns, name), and each call's wall time in seconds."""
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import timing  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as directory:
    with jax.profiler.trace(directory):
      wall = [timing.run_variant(variant, 1, 1) for _ in range(repeats)]
    [path] = glob.glob(f"{directory}/**/*.xplane.pb", recursive=True)
    profile = jax.profiler.ProfileData.from_file(path)
    # An event is named after its instruction, a custom call's with its target appended:
    # "custom-call.7.clone__onednn$convolution".
    events = [(e.start_ns, e.duration_ns, e.name.split("__")[0])
              for plane in profile.planes for line in plane.lines
              if line.name.startswith("tf_XLA") for e in line.events]
  return events, wall


def jax_breakdown(variant, repeats: int) -> dict[str, float]:
  """{category: ms per step} of `variant`'s compiled step (module doc), with "wall" (the
  median step) and "busy" (the categories' sum: the time a thunk ran)."""
  table = instructions(variant["fn"].as_text())
  events, wall = trace_events(variant, repeats)
  # Thunks only (the runtime's own events are not instructions), and of control flow
  # only the bodies.
  intervals = [i for i in thunk_intervals(events)
               if i[2] in table and table[i[2]][0] not in _CONTROL_FLOW]
  totals = shared_time(intervals, lambda name: categorize(name, *table[name]))
  breakdown = {c: totals[c] / 1e6 / repeats for c in CATEGORIES}
  return {**breakdown, "busy": sum(breakdown.values()),
          "wall": float(np.median(wall)) * 1e3}


def torch_category(op: str, ancestors: tuple[str, ...] = ()) -> str:
  """The category of a PyTorch operator's self time, by its name and its callers' (the
  optimizer's step, autograd's backward nodes)."""
  if op.startswith("Optimizer.") or any(a.startswith("Optimizer.") for a in ancestors):
    return "update"
  if op in ("aten::convolution_backward", "aten::mkldnn_convolution_backward"):
    return "conv gradients"
  if op in ("aten::mkldnn_convolution", "aten::thnn_conv2d", "aten::_slow_conv2d_forward",
            "aten::convolution", "aten::_convolution", "aten::conv2d"):
    return "conv forward"
  if op.startswith(("aten::native_batch_norm", "aten::batch_norm", "aten::_batch_norm",
                    "aten::relu", "aten::add", "aten::threshold", "aten::clamp_min")):
    backward = "backward" in op or any("Backward" in a for a in ancestors)
    return f"BatchNorm, ReLU, add: {'backward' if backward else 'forward'}"
  return "other"


def torch_breakdown(step, repeats: int) -> dict[str, float]:
  """{category: ms per step} of PyTorch eager's `step` (module doc)."""
  import torch  # pylint: disable=g-import-not-at-top
  wall = []
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(repeats):
      start = time.perf_counter()
      step()
      wall.append(time.perf_counter() - start)
  totals = collections.Counter()
  for event in prof.events():
    ancestors, parent = [], event.cpu_parent
    while parent is not None:
      ancestors.append(parent.name)
      parent = parent.cpu_parent
    totals[torch_category(event.name, tuple(ancestors))] += event.self_cpu_time_total / 1e3
  breakdown = {c: totals[c] / repeats for c in CATEGORIES}
  return {**breakdown, "busy": sum(breakdown.values()),
          "wall": float(np.median(wall)) * 1e3}


VARIANTS = {"constant": (1.0, None), "open": (None, True), "closed": (None, False),
            "SD": (None, None)}


def format_breakdowns(columns: dict[str, dict[str, float]]) -> str:
  """One row per category, one column per variant: ms per step."""
  width = max(len(c) for c in CATEGORIES + ("busy (sum)",))
  lines = [f"{'ms per step':<{width}} " + " ".join(f"{n:>14}" for n in columns)]
  for category in CATEGORIES + ("busy", "wall"):
    label = {"busy": "busy (sum)", "wall": "wall (median)"}.get(category, category)
    lines.append(f"{label:<{width}} " + " ".join(
        f"{columns[n][category]:>14.1f}" for n in columns))
  return "\n".join(lines)


def main(argv):
  del argv
  common.prepare_host(FLAGS.cores)
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import timing  # pylint: disable=g-import-not-at-top
  if jax.default_backend() != "cpu":
    raise app.UsageError(
        f"step_profile reads XLA:CPU's thread events; this is {jax.default_backend()}. "
        "On a GPU or TPU open the trace of jax.profiler.trace in XProf (TensorBoard's "
        "profile plugin), which has the device's op-level view.")
  print(f"JAX {jax.__version__}, {jax.devices()[0].device_kind}; "
        f"{FLAGS.repeats} traced steps per variant")
  results = {}
  for depth, batch in common.cases(FLAGS.cases, FLAGS.small):
    columns = {}
    for name in FLAGS.variants:
      p_last, forced = VARIANTS[name]
      variant = timing.make_variant(depth, batch, FLAGS.p_last if p_last is None else p_last,
                                    "auto", 1, forced_gates=forced)
      columns[f"jax {name}"] = jax_breakdown(variant, FLAGS.repeats)
      del variant
    if FLAGS.torch:
      import torch  # pylint: disable=g-import-not-at-top
      from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top
      print(f"PyTorch {torch.__version__}, {torch.get_num_threads()} threads")
      for name, p_last in (("torch full", 1.0), ("torch SD", FLAGS.p_last)):
        variant = torch_reference.make_variant(depth, batch, p_last, torch.device("cpu"))
        variant["step"]()  # warm-up
        columns[name] = torch_breakdown(variant["step"], FLAGS.repeats)
    print(f"\nResNet-{depth}, batch {batch}\n{format_breakdowns(columns)}")
    results[f"{depth}:{batch}"] = columns
  if FLAGS.out:
    common.write_json(FLAGS.out, {"jax": jax.__version__, "date": time.strftime("%Y-%m-%d"),
                                  "breakdowns": results})


if __name__ == "__main__":
  common.define_flags()
  flags.DEFINE_list("variants", ["constant", "open", "SD"],
                    f"Library variants to profile, of {list(VARIANTS)}.")
  flags.register_validator("variants", lambda names: set(names) <= set(VARIANTS),
                           f"--variants takes names of {list(VARIANTS)}, comma-separated.")
  flags.DEFINE_bool("torch", False, "Also profile PyTorch eager's full and SD steps.")
  app.run(main)

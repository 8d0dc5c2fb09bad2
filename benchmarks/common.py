"""What the benchmarks share: their common flags, one row schema, one text table."""

import json
import os
import subprocess
import sys
import tempfile

from absl import flags
import numpy as np

from experiments.runtime import workdir as workdir_lib


def define_flags():
  """The flags of both timing programs (`train_step`, `torch_reference`), defined by them
  when they start: importing this module defines nothing."""
  flags.DEFINE_bool("small", False, "ResNet-8 at batch 8: a CPU check of the script.")
  flags.DEFINE_integer("repeats", 7, "Interleaved repetitions per variant.")
  flags.DEFINE_integer("calls", 5, "Timed calls per repetition.")
  flags.DEFINE_list("cases", ["110:128", "110:512", "1202:128"], "depth:batch pairs.")
  flags.DEFINE_float("p_last", 0.5, "p_L of the stochastic-depth variants.")
  flags.DEFINE_string("out", "", "Write the rows as JSON here.")
  flags.DEFINE_integer("seed", 0, "Seed of the timed steps' gate draws; with --processes, "
                       "process i uses seed + i, so that each draws other gates.")
  flags.DEFINE_integer("processes", 1, "Measure in this many processes, one after "
                       "another, and report per variant the median over processes of each "
                       "process's median and ratios, with the ratios' range: processes "
                       "disagree by up to 15-20% on ratios near 1 (benchmarks/README.md).",
                       lower_bound=1)
  flags.DEFINE_integer("cores", 0, "Run on this many of the CPUs this process may use "
                       "(0: all of them), pinned before JAX or PyTorch start their "
                       "threads. On one core no thread waits for another: in a quiet "
                       "process a ratio varies ~2-5% between repetitions instead of ~10% "
                       "on two cores (benchmarks/README.md).", lower_bound=0)


def use_cores(cores: int) -> list[int]:
  """Pins this process to the first `cores` of the CPUs it may use (0: leaves them all)
  and returns the CPUs it runs on. Threads started afterwards inherit the pinning, so
  call it before JAX initialises its backend (XLA:CPU sizes its thread pool by the CPUs
  it may use) and before PyTorch's first operation."""
  allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
  if not cores:
    return allowed
  if not hasattr(os, "sched_setaffinity"):
    raise SystemExit(f"--cores={cores}: this platform cannot pin a process to CPUs; "
                     "leave --cores at 0.")
  if cores > len(allowed):
    raise SystemExit(f"--cores={cores}: this process may use only {len(allowed)} CPUs "
                     f"{allowed}; ask for at most {len(allowed)}, or 0 for all of them.")
  os.sched_setaffinity(0, allowed[:cores])
  return sorted(os.sched_getaffinity(0))


def prepare_host(cores: int) -> list[int]:
  """What every benchmark does first, before JAX or PyTorch start their threads: pins
  the process to `cores` CPUs (`use_cores`) and keeps the host memory a step frees for
  the next (`sdnet.backend.keep_freed_host_memory`); prints both and returns the CPUs."""
  from sdnet import backend  # pylint: disable=g-import-not-at-top
  cpus = use_cores(cores)
  print(f"host memory kept between steps: {backend.keep_freed_host_memory()}")
  print(f"CPUs {cpus}")
  return cpus


def cases(specs, small=False, family="cifar"):
  """(depth, batch) pairs from "depth:batch" `specs` (if `small`, ResNet-8 at batch 8, or
  the ImageNet family's ResNet-14)."""
  if small:
    return [(14 if family == "imagenet" else 8, 8)]
  return [tuple(int(v) for v in spec.split(":")) for spec in specs]


def interleave(runs: dict, repeats: int) -> dict[str, list[float]]:
  """{name: seconds per step of each repetition} from `runs` ({name: a function timing
  one step of that variant}): every repetition times each variant once, in turn, and
  starts one variant later than the one before (repetition r runs variants r, r + 1,
  ... mod n), so that drifting clocks hit all of them alike and no variant always runs
  first (the first of a repetition measured up to ~2% slower: benchmarks/README.md)."""
  names = list(runs)
  times = {name: [] for name in names}
  for repetition in range(repeats):
    start = repetition % len(names)
    for name in names[start:] + names[:start]:
      times[name].append(runs[name]())
  return times


def row(depth, batch, variant, seconds_per_step, constant_median_s, compile_s, memory_gib,
        family="cifar", blocks_computed=None):
  """One result row from a variant's per-repetition step times (seconds);
  `blocks_computed`: the mean fraction of blocks its timed steps computed."""
  timed = {"median_ms": None, "min_ms": None, "max_ms": None, "ratio_to_constant": None,
           "images_per_s": None}
  if len(seconds_per_step):
    ms = np.asarray(seconds_per_step) * 1e3
    median = float(np.median(ms))
    timed = {"median_ms": median, "min_ms": float(ms.min()), "max_ms": float(ms.max()),
             "ratio_to_constant": median / 1e3 / float(constant_median_s),
             "images_per_s": batch / (median / 1e3)}
  return {"depth": depth, "batch": batch, "variant": variant, **timed,
          "compile_s": compile_s, "memory_gib": memory_gib, "family": family,
          "blocks_computed": blocks_computed}


def with_ratio_to(rows: list[dict], variant: str) -> list[dict]:
  """`rows` of one case, each with "ratio_to_open": its median over `variant`'s (the
  network with every gate open computes what the plain one does, plus conditionals: a
  plain step slower than it is a slow baseline, which ratios to it would flatter)."""
  [reference] = [r for r in rows if r["variant"] == variant] or [None]
  median = reference["median_ms"] if reference else None
  return [{**r, "ratio_to_open": (r["median_ms"] / median
                                  if median and r["median_ms"] is not None else None)}
          for r in rows]


def network(r) -> str:
  """"ResNet-110" (CIFAR) or "ImageNet-152" of a row."""
  return f"{'ImageNet' if r.get('family') == 'imagenet' else 'ResNet'}-{r['depth']}"


def format_table(rows, setting_width=0):
  """The rows as an aligned text table (with a "setting" column when rows carry one):
  "ratio" to constant depth, "/open" to every gate open, "blocks" the fraction of blocks
  the timed steps computed; rows merged over processes (`merge_processes`) also show each
  ratio's range over processes, and their "spread" is the range of the processes'
  medians."""
  setting = lambda r: f"{r.get('setting', ''):<{setting_width}} " if setting_width else ""
  ranges = any(r.get("processes", 1) > 1 for r in rows)
  lines = [f"{'setting':<{setting_width}} " * bool(setting_width) +
           f"{'network':>12} {'batch':>5} {'variant':>15} {'median ms':>9} {'spread ms':>13} "
           f"{'ratio':>6} {'/open':>6} {'blocks':>6} {'img/s':>8} {'compile s':>9} {'GiB':>6}" +
           f" {'ratio range':>13} {'/open range':>13}" * ranges]
  def number(value, spec, width):
    return f"{'-' if value is None else format(value, spec):>{width}}"
  def interval(values):
    return f"{'-' if not values else f'{values[0]:.3f}-{values[1]:.3f}':>13}"
  for r in rows:
    spread = ("-" if r["min_ms"] is None else f"{r['min_ms']:6.2f}-{r['max_ms']:6.2f}")
    lines.append(
        f"{setting(r)}{network(r):>12} {r['batch']:>5} {r['variant']:>15} "
        f"{number(r['median_ms'], '.2f', 9)} {spread:>13} "
        f"{number(r['ratio_to_constant'], '.3f', 6)} "
        f"{number(r.get('ratio_to_open'), '.3f', 6)} "
        f"{number(r.get('blocks_computed'), '.3f', 6)} {number(r['images_per_s'], '.0f', 8)} "
        f"{number(r['compile_s'], '.1f', 9)} {number(r['memory_gib'], '.2f', 6)}" +
        (f" {interval(r.get('ratio_to_constant_range'))} "
         f"{interval(r.get('ratio_to_open_range'))}" if ranges else ""))
  return "\n".join(lines)


def across_processes(module: str, processes: int, out: str = "", seed: int = 0) -> dict:
  """Runs this program (`python -m module` with this process's arguments) `processes`
  times, one after another, each writing its rows to a file of its own; prints the merged
  table and returns (and writes to `out`, if given) the first run's JSON with the rows
  merged (`merge_processes`) and every run's rows under "processes". Process i draws
  its steps' gates with seed + i: the same few draws in every process would bias every
  process's stochastic step alike. A run that fails stops it."""
  argv = [a for a in sys.argv[1:] if not a.startswith(("--processes", "--out", "--seed"))]
  runs = []
  with tempfile.TemporaryDirectory() as tmp:
    for index in range(processes):
      run_out = os.path.join(tmp, f"{index}.json")
      print(f"[process {index + 1} of {processes}]", flush=True)
      done = subprocess.run([sys.executable, "-m", module, *argv, "--processes=1",
                             f"--seed={seed + index}", f"--out={run_out}"], check=False)
      if done.returncode != 0:
        raise SystemExit(f"process {index + 1} of {processes} failed with exit code "
                         f"{done.returncode} (its output is above); nothing was merged.")
      with open(run_out) as f:
        runs.append(json.load(f))
  result = {**runs[0], "rows": merge_processes([run["rows"] for run in runs]),
            "processes": [run["rows"] for run in runs]}
  print(f"\nmedians over {processes} processes, each ratio taken within its process:")
  print(format_table(result["rows"]))
  if out:
    write_json(out, result)
  return result


def merge_processes(runs: list[list[dict]]) -> list[dict]:
  """One row per variant from several processes' rows of the same variants: median over
  processes of "median_ms", of each ratio and of "compile_s", mean of "blocks_computed"
  (each process timed other draws); "min_ms"/"max_ms" the range of the processes'
  medians; "<ratio>_range" [min, max] of each ratio; "processes" their count. Ratios are
  taken within each process, so one process's clock cannot bias them."""
  key = lambda r: (r.get("family"), r["depth"], r["batch"], r["variant"])
  if len({tuple(map(key, rows)) for rows in runs}) != 1:
    raise ValueError("the processes measured different variants: "
                     f"{[[key(r) for r in rows] for rows in runs]}")
  merged = []
  for same in zip(*runs):
    first = same[0]
    value = lambda name: [r[name] for r in same if r.get(name) is not None]
    median = lambda name: float(np.median(value(name))) if value(name) else None
    row = {**first, "processes": len(runs), "median_ms": median("median_ms"),
           "compile_s": median("compile_s"),
           "blocks_computed": (float(np.mean(value("blocks_computed")))
                               if value("blocks_computed") else None)}
    if value("median_ms"):
      row.update(min_ms=min(value("median_ms")), max_ms=max(value("median_ms")),
                 images_per_s=first["batch"] / (row["median_ms"] / 1e3))
    for ratio in ("ratio_to_constant", "ratio_to_open"):
      if ratio in first:
        row[ratio] = median(ratio)
        row[f"{ratio}_range"] = ([min(value(ratio)), max(value(ratio))]
                                 if value(ratio) else None)
    merged.append(row)
  return merged


def write_json(path: str, value) -> None:
  """`value` as JSON in `path`, written atomically (readers never see half of it)."""
  workdir_lib.write_text_atomic(path, json.dumps(value, indent=2))

"""What the benchmarks share: their common flags, one row schema, one text table."""

import json

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
        family="cifar"):
  """One result row from a variant's per-repetition step times (seconds)."""
  timed = {"median_ms": None, "min_ms": None, "max_ms": None, "ratio_to_constant": None,
           "images_per_s": None}
  if len(seconds_per_step):
    ms = np.asarray(seconds_per_step) * 1e3
    median = float(np.median(ms))
    timed = {"median_ms": median, "min_ms": float(ms.min()), "max_ms": float(ms.max()),
             "ratio_to_constant": median / 1e3 / float(constant_median_s),
             "images_per_s": batch / (median / 1e3)}
  return {"depth": depth, "batch": batch, "variant": variant, **timed,
          "compile_s": compile_s, "memory_gib": memory_gib, "family": family}


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
  "ratio" to constant depth, "/open" to every gate open."""
  setting = lambda r: f"{r.get('setting', ''):<{setting_width}} " if setting_width else ""
  lines = [f"{'setting':<{setting_width}} " * bool(setting_width) +
           f"{'network':>12} {'batch':>5} {'variant':>15} {'median ms':>9} {'spread ms':>13} "
           f"{'ratio':>6} {'/open':>6} {'img/s':>8} {'compile s':>9} {'GiB':>6}"]
  def number(value, spec, width):
    return f"{'-' if value is None else format(value, spec):>{width}}"
  for r in rows:
    spread = ("-" if r["min_ms"] is None else f"{r['min_ms']:6.2f}-{r['max_ms']:6.2f}")
    lines.append(
        f"{setting(r)}{network(r):>12} {r['batch']:>5} {r['variant']:>15} "
        f"{number(r['median_ms'], '.2f', 9)} {spread:>13} "
        f"{number(r['ratio_to_constant'], '.3f', 6)} "
        f"{number(r.get('ratio_to_open'), '.3f', 6)} {number(r['images_per_s'], '.0f', 8)} "
        f"{number(r['compile_s'], '.1f', 9)} {number(r['memory_gib'], '.2f', 6)}")
  return "\n".join(lines)


def write_json(path: str, value) -> None:
  """`value` as JSON in `path`, written atomically (readers never see half of it)."""
  workdir_lib.write_text_atomic(path, json.dumps(value, indent=2))

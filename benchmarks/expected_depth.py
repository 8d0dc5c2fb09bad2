r"""What stochastic depth's step can cost on this machine, from what dropping each block
saves, beside what it costs: the floor of the SD / plain ratio.

  python -m benchmarks.expected_depth --cases=110:128 --repeats=9 --calls=1

A step of stochastic depth computes block l with probability p_l (Huang et al., 2016,
Eq. 4: p_l = 1 - l / L (1 - p_L)). If dropping a block saved the same time whatever the
other gates, the expected step would be

    E[t_SD] = t_open - sum_l (1 - p_l) s_l,    s_l = t_open - t_(block l closed)

A CIFAR ResNet's blocks differ by stage (same FLOPs, other shapes and kernels), so s_l is
measured per stage: s_stage = (t_open - t_(that stage closed, the others open)) / n for
its n blocks. Variants, each the experiments' compiled step (`benchmarks.timing`), timed
interleaved (`common.interleave`): "constant" (p_L = 1), "SD" (p_L = --p_last,
`skip="auto"`), "open" / "closed" (every gate forced, `timing.ForcedGates`) and "stage k
closed". The summary puts the expected step beside the measured SD step, each as a ratio
to the open and the constant-depth step. CIFAR networks only. benchmarks/README.md
keeps the figures.
"""

from __future__ import annotations

from absl import app
from absl import flags
import jax
import numpy as np

from benchmarks import common
from benchmarks import timing
from experiments.training import recipe

FLAGS = flags.FLAGS


def stage_blocks(depth: int, p_last: float) -> tuple[tuple[int, ...], np.ndarray]:
  """(blocks per stage, p_1..p_L) of the SD network the experiments build at `depth`."""
  model = recipe.build_model(timing.step_config("cifar", depth, 128, p_last, "auto"), 10)
  return tuple(model.stage_sizes), model.survival_probs()


def expected_step(medians: dict[str, float], sizes, probs) -> dict[str, float]:
  """{"saving_stage<k>": s per block of stage k, "expected SD": E[t_SD]} in the units of
  `medians` ({"open": t_open, "stage<k> closed": ...}), by the module doc's equation;
  `probs` p_1..p_L, or the fraction of timed steps that computed each block."""
  out, expected, start = {}, medians["open"], 0
  for stage, size in enumerate(sizes, 1):
    saving = (medians["open"] - medians[f"stage{stage} closed"]) / size
    out[f"saving_stage{stage}"] = saving
    expected -= float(np.sum(1.0 - probs[start:start + size])) * saving
    start += size
  return {**out, "expected SD": expected}


def measure(depth: int, batch: int, p_last: float, repeats: int, calls: int, seed: int = 0):
  """(rows, summary) of one case: a `common.row` per variant and the module doc's
  expected step beside the measured ones: by the p_l, and by the gates the timed SD steps
  drew (`seed`), which a few steps make differ from the p_l."""
  sizes, probs = stage_blocks(depth, p_last)
  made = {"constant": timing.make_variant(depth, batch, 1.0, "auto", 1),
          "SD": timing.make_variant(depth, batch, p_last, "auto", 1, seed=seed),
          "open": timing.make_variant(depth, batch, p_last, "auto", 1, forced_gates=True),
          "closed": timing.make_variant(depth, batch, p_last, "auto", 1,
                                        forced_gates=False)}
  start = 0
  for stage, size in enumerate(sizes, 1):
    open_blocks = np.ones(sum(sizes), bool)
    open_blocks[start:start + size] = False
    made[f"stage{stage} closed"] = timing.make_variant(depth, batch, p_last, "auto", 1,
                                                       forced_gates=open_blocks)
    start += size
  times = common.interleave({name: (lambda v=v: timing.run_variant(v, calls, 1))
                             for name, v in made.items()}, repeats)
  medians = {name: float(np.median(t)) * 1e3 for name, t in times.items()}
  rows = common.with_ratio_to(
      [common.row(depth, batch, name, times[name], medians["constant"] / 1e3,
                  v["compile_s"], v["memory_gib"],
                  blocks_computed=timing.blocks_computed(v)) for name, v in made.items()],
      "open")
  drawn = timing.drawn_gates(made["SD"]).mean(axis=0)
  summary = {"depth": depth, "batch": batch, "p_last": p_last,
             **expected_step(medians, sizes, probs),
             "expected SD, drawn gates": expected_step(medians, sizes, drawn)["expected SD"],
             "SD blocks computed": float(drawn.mean()), "expected blocks": float(probs.mean()),
             "measured SD": medians["SD"], "open": medians["open"],
             "constant": medians["constant"]}
  return rows, summary


def format_summary(s: dict) -> str:
  savings = ", ".join(f"{v:.1f}" for k, v in s.items() if k.startswith("saving_stage"))
  ratio = lambda t: f"{t / s['open']:.3f} of open, {t / s['constant']:.3f} of constant"
  return (f"ResNet-{s['depth']}, batch {s['batch']}, p_L = {s['p_last']}: a dropped "
          f"block saves {savings} ms (stages 1..)\n"
          f"  expected SD step {s['expected SD']:.1f} ms ({ratio(s['expected SD'])}), "
          f"{s['expected blocks']:.3f} of the blocks\n"
          f"  expected for the timed steps' gates {s['expected SD, drawn gates']:.1f} ms "
          f"({ratio(s['expected SD, drawn gates'])}), {s['SD blocks computed']:.3f} of the "
          f"blocks\n"
          f"  measured SD step {s['measured SD']:.1f} ms ({ratio(s['measured SD'])})")


def main(argv):
  del argv
  common.prepare_host(FLAGS.cores)
  print(f"JAX {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind}")
  rows, summaries = [], []
  for depth, batch in common.cases(FLAGS.cases, FLAGS.small):
    case_rows, summary = measure(depth, batch, FLAGS.p_last, FLAGS.repeats, FLAGS.calls,
                                 FLAGS.seed)
    rows += case_rows
    summaries.append(summary)
  print(common.format_table(rows))
  for summary in summaries:
    print(format_summary(summary))
  if FLAGS.out:
    common.write_json(FLAGS.out, {"jax": jax.__version__, "rows": rows,
                                  "summaries": summaries})


if __name__ == "__main__":
  common.define_flags()
  app.run(main)

r"""Times the real training step: constant depth vs stochastic depth, per skip method.

  python -m benchmarks.train_step --out=bench.json              # the GPU/TPU table
  python -m benchmarks.train_step --small                       # a CPU smoke run

Each row is the experiments' own pmapped step (`sdnet.train.train_steps`: augmentation,
forward, backward, Nesterov update) with `--steps_per_call` steps per call, on random
uint8 images. Variants are compiled first, then timed interleaved: every repetition runs
each variant once in turn, so drifting clocks hit all of them alike. Reported: median ms
per step, spread (min-max over repetitions), ratio to constant depth of the same network
and batch, images/s, compile seconds (the first call, one step included) and peak device
memory.

On CPU the figures mean nothing for accelerator speed (XLA:CPU handles conditionals and
loops very differently); use --small there only to check the script.
"""

import functools
import json
import time

from absl import app
from absl import flags
from flax import jax_utils
import jax
import jax.numpy as jnp
import numpy as np

from experiments.configs import default
from sdnet import train

FLAGS = flags.FLAGS
flags.DEFINE_bool("small", False, "ResNet-8 at batch 8 (a CPU check of the script).")
flags.DEFINE_integer("repeats", 7, "Interleaved repetitions per variant.")
flags.DEFINE_integer("calls", 5, "Timed calls per repetition.")
flags.DEFINE_integer("steps_per_call", 1, "Steps per compiled call.")
flags.DEFINE_list("skips", ["cond", "mask", "compact"], "Skip implementations to time for SD.")
flags.DEFINE_list("cases", ["110:128", "110:512", "1202:128"], "depth:batch pairs.")
flags.DEFINE_string("dtype", "float32", "Compute dtype.")
flags.DEFINE_string("out", "", "Write the rows as JSON here.")


def make_variant(depth, batch, p_last, skip, dtype, steps_per_call):
  """A compiled step function and its donated state, as the experiments build them."""
  config = default.get_config()
  config.model.depth, config.batch_size = depth, batch
  config.survival.p_last, config.skip, config.dtype = p_last, skip, dtype
  devices = jax.local_device_count()
  model = train.build_model(config, 10)
  tx = train.make_optimizer(config, train.learning_rate_schedule(config, 390))
  state = jax_utils.replicate(jax.device_get(train.create_train_state(model, tx, (32, 32, 3), 0)))
  kwargs = dict(model=model, tx=tx, seed_key=jax.random.key(0),
                mean_image=jnp.full((32, 32, 3), 120.0), std=64.0, augment=True)
  step = jax.pmap(functools.partial(train.train_steps, **kwargs), axis_name=train.AXIS,
                  donate_argnums=(0, 2))
  rng = np.random.default_rng(0)
  shape = (devices, steps_per_call, batch // devices)
  host = {"images": rng.integers(0, 256, shape + (32, 32, 3), dtype=np.uint8),
          "labels": rng.integers(0, 10, shape, dtype=np.int32)}
  data = jax.tree.map(jax.device_put, host)
  metrics = jax_utils.replicate(train.empty_metrics())
  variant = {"fn": step, "state": state, "metrics": metrics, "data": data, "times": []}
  # The first call compiles (and runs one call): timing it avoids compiling twice.
  variant["compile_s"] = run_variant(variant, 1, 1)
  return variant


def peak_memory_gib():
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**30


def run_variant(variant, calls, steps_per_call):
  state, metrics = variant["state"], variant["metrics"]
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(calls):
    state, metrics = variant["fn"](state, variant["data"], metrics)
  jax.block_until_ready(state)
  variant["state"], variant["metrics"] = state, metrics
  return (time.perf_counter() - start) / (calls * steps_per_call)


def main(argv):
  del argv
  cases = [(8, 8)] if FLAGS.small else [tuple(map(int, c.split(":"))) for c in FLAGS.cases]
  repeats, calls = FLAGS.repeats, FLAGS.calls
  rows = []
  print(f"JAX {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind} "
        f"({jax.default_backend()})")
  if jax.default_backend() == "cpu":
    print("CPU: these figures say nothing about accelerator speed.")
  for depth, batch in cases:
    variants = {"constant": make_variant(depth, batch, 1.0, "cond", FLAGS.dtype,
                                         FLAGS.steps_per_call)}
    for skip in FLAGS.skips:
      variants[f"SD {skip}"] = make_variant(depth, batch, 0.5, skip, FLAGS.dtype,
                                            FLAGS.steps_per_call)
    for variant in variants.values():  # warm-up: pmap compiles again once the state
      run_variant(variant, 1, FLAGS.steps_per_call)  # comes back donated and sharded
    for _ in range(repeats):
      for variant in variants.values():
        variant["times"].append(run_variant(variant, calls, FLAGS.steps_per_call))
    base = np.median(variants["constant"]["times"])
    for name, variant in variants.items():
      times = np.asarray(variant["times"]) * 1e3
      rows.append({"depth": depth, "batch": batch, "variant": name,
                   "median_ms": float(np.median(times)), "min_ms": float(times.min()),
                   "max_ms": float(times.max()),
                   "ratio_to_constant": float(np.median(times) / 1e3 / base),
                   "images_per_s": float(batch / (np.median(times) / 1e3)),
                   "compile_s": variant["compile_s"], "peak_gib": peak_memory_gib()})
    del variants
  print(f"{'network':>12} {'batch':>5} {'variant':>10} {'median ms':>9} {'spread':>13} "
        f"{'ratio':>6} {'img/s':>8} {'compile s':>9} {'peak GiB':>8}")
  for r in rows:
    peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
    print(f"{'ResNet-%d' % r['depth']:>12} {r['batch']:>5} {r['variant']:>10} "
          f"{r['median_ms']:9.2f} {r['min_ms']:6.2f}-{r['max_ms']:6.2f} "
          f"{r['ratio_to_constant']:6.3f} {r['images_per_s']:8.0f} {r['compile_s']:9.1f} "
          f"{peak:>8}")
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump({"jax": jax.__version__, "device": jax.devices()[0].device_kind,
                 "backend": jax.default_backend(), "date": time.strftime("%Y-%m-%d"),
                 "rows": rows}, f, indent=2)


if __name__ == "__main__":
  app.run(main)

r"""Times the real training step: constant depth vs stochastic depth, per skip method.

  python -m benchmarks.train_step --out=bench.json              # ResNet-110/1202 table
  python -m benchmarks.train_step --cases=20:128,56:128,110:128 # the README's CPU table
  python -m benchmarks.train_step --small                       # a check of the script
  python -m benchmarks.suite --out_dir=bench                    # every setting (GPU)

Each row is the experiments' own compiled step, built by the one builder the training
loop uses (`experiments.lib.steps.make_train_step`: augmentation, forward, backward,
Nesterov update) with `--steps_per_call` steps per call, on random
uint8 images. Variants are compiled ahead of time, then timed interleaved: every
repetition runs each variant once in turn, so drifting clocks hit all of them alike.
Reported: median ms per step, spread (min-max over repetitions), ratio to constant depth
of the same network and batch, images/s, compile seconds, and the device memory the
compiled step needs (XLA's buffer assignment: arguments + temporaries + outputs that do
not alias a donated argument), which is the step's peak. --compile_only reports the last
two alone, without allocating or running anything.

Variants: "constant" is the plain network (p_L = 1: no gate, no conditional); "SD <skip>"
trains with stochastic depth (p_L = --p_last, linear decay) skipped by <skip> ("auto" is
the backend's choice, `sdnet.backend`); "SD open" and "SD closed" are `skip="auto"` with
every gate forced open or closed (gates still drawn from the step's key, so the program
is the stochastic one): what a block costs when it runs, and what remains when none does.
On a CPU the ratios say what skipping saves on that CPU; they do not predict a GPU's or a
TPU's, whose costs of conditionals and loops differ (the README's tables keep each).
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

from benchmarks import common
from experiments.configs import default
from experiments.lib import steps

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps_per_call", 1, "Steps per compiled call.")
flags.DEFINE_list("skips", ["auto", "cond", "mask", "compact"],
                  "Skip implementations to time for stochastic depth.")
flags.DEFINE_bool("forced_gates", True, "Also time skip='auto' with every gate forced "
                  "open, and forced closed.")
flags.DEFINE_string("dtype", "float32", "Compute dtype.")
flags.DEFINE_bool("remat", False, "Rematerialise each block in the backward pass.")
flags.DEFINE_bool("compile_only", False, "Only compile: compile time and memory, no timing "
                  "(meaningful on CPU too, as proportions).")


class ForcedGates:
  """`model` whose training gates are all open (or all closed), drawn from the step's key
  as Bernoulli(1) (or Bernoulli(0)) draws: traced values, so the compiled program keeps
  every conditional of a stochastic network and XLA cannot fold them away."""

  def __init__(self, model, is_open: bool):
    self.model, self.is_open = model, is_open

  def init(self, *args, **kwargs):
    return self.model.init(*args, **kwargs)

  def apply(self, variables, x, train=False, *, key=None, **kwargs):
    if not train:
      return self.model.apply(variables, x, **kwargs)
    gates = jax.random.bernoulli(key, float(self.is_open), (self.model.num_blocks,))
    return self.model.apply(variables, x, train=True, gates=gates, **kwargs)


def make_variant(depth, batch, p_last, skip, steps_per_call, *, dtype="float32",
                 remat=False, forced_gates=None, compile_only=False):
  """A compiled step function and its donated state, as the experiments build them
  (`forced_gates`: True/False forces every gate open/closed, see ForcedGates)."""
  config = default.get_config()
  config.model.depth, config.batch_size = depth, batch
  config.survival.p_last, config.skip = p_last, skip
  config.dtype, config.remat = dtype, remat
  devices = jax.local_device_count()
  model = steps.build_model(config, 10)
  if forced_gates is not None:
    model = ForcedGates(model, forced_gates)
  tx = steps.make_optimizer(config, steps.learning_rate_schedule(config, 390))
  make_state = lambda: jax_utils.replicate(jax.device_get(
      steps.create_train_state(model, tx, (32, 32, 3), 0)))
  pmapped = steps.make_train_step(model, tx, seed=0, mean_image=jnp.full((32, 32, 3), 120.0),
                                  std=64.0, augment=True)
  shape = (devices, steps_per_call, batch // devices)
  data = {"images": jax.ShapeDtypeStruct(shape + (32, 32, 3), jnp.uint8),
          "labels": jax.ShapeDtypeStruct(shape, jnp.int32)}
  metrics = jax.eval_shape(lambda: jax_utils.replicate(steps.empty_metrics()))
  state = jax.eval_shape(make_state)
  step, compile_s = steps.compile_ahead(pmapped, state, data, metrics)
  variant = {"fn": step, "times": [], "compile_s": compile_s,
             "memory_gib": program_memory_gib(step)}
  if compile_only:
    return variant
  rng = np.random.default_rng(0)
  variant["data"] = jax.tree.map(jax.device_put, {
      "images": rng.integers(0, 256, data["images"].shape, dtype=np.uint8),
      "labels": rng.integers(0, 10, data["labels"].shape, dtype=np.int32)})
  variant["state"] = make_state()
  variant["metrics"] = jax_utils.replicate(steps.empty_metrics())
  run_variant(variant, 1, 1)  # warm-up
  return variant


def program_memory_gib(compiled):
  """Device memory one call of `compiled` needs, per device (None if XLA won't say)."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  total = (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes -
           m.alias_size_in_bytes)
  return total / 2**30


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
  repeats, calls = FLAGS.repeats, FLAGS.calls
  rows = []
  print(f"JAX {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind} "
        f"({jax.default_backend()})")
  if jax.default_backend() == "cpu":
    print("CPU: ratios show what skipping saves on this CPU, not on a GPU or TPU.")
  make = functools.partial(make_variant, steps_per_call=FLAGS.steps_per_call,
                           dtype=FLAGS.dtype, remat=FLAGS.remat,
                           compile_only=FLAGS.compile_only)
  for depth, batch in common.cases():
    variants = {"constant": make(depth, batch, 1.0, "auto")}
    for skip in FLAGS.skips:
      variants[f"SD {skip}"] = make(depth, batch, FLAGS.p_last, skip)
    if FLAGS.forced_gates:
      for name, is_open in (("SD open", True), ("SD closed", False)):
        variants[name] = make(depth, batch, FLAGS.p_last, "auto", forced_gates=is_open)
    for _ in range(0 if FLAGS.compile_only else repeats):
      for variant in variants.values():
        variant["times"].append(run_variant(variant, calls, FLAGS.steps_per_call))
    base = np.median(variants["constant"]["times"] or [np.nan])
    for name, variant in variants.items():
      rows.append(common.row(depth, batch, name, variant["times"], base,
                            variant["compile_s"], variant["memory_gib"]))
    del variants
  print(common.format_table(rows))
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump({"jax": jax.__version__, "device": jax.devices()[0].device_kind,
                 "backend": jax.default_backend(), "date": time.strftime("%Y-%m-%d"),
                 "rows": rows}, f, indent=2)


if __name__ == "__main__":
  app.run(main)

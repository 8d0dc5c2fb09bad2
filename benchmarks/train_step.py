r"""Times the real training step: constant depth vs stochastic depth, per skip method.

  python -m benchmarks.train_step --out=bench.json              # ResNet-110/1202 table
  python -m benchmarks.train_step --cases=20:128,56:128,110:128 # the README's CPU table
  python -m benchmarks.train_step --small                       # a check of the script
  python -m benchmarks.train_step --cases=110:128 --processes=5 # ratios over 5 processes
  python -m benchmarks.train_step --family=imagenet --cases=50:8,152:8  # ImageNet, 224 px
  python -m benchmarks.suite --out_dir=bench                    # every setting (GPU)

Each row is the experiments' own compiled step, built by the one builder the training
loop uses (`experiments.training.steps.make_train_step`: augmentation, forward, backward,
Nesterov update) with `--steps_per_call` steps per call, on random uint8 images
(`benchmarks.timing`). Variants are compiled ahead of time, then timed interleaved: every
repetition runs each variant once in turn, so drifting clocks hit all of them alike.
Reported: median ms per step, spread (min-max over repetitions), ratio to constant depth
of the same network and batch, images/s, compile seconds, and the device memory the
compiled step needs (XLA's buffer assignment: arguments + temporaries + outputs that do
not alias a donated argument), which is the step's peak. --compile_only reports the last
two alone, without allocating or running anything. --processes=N measures N times, one
process after another, and reports the median over processes of each one's ratios, with
their range (`common.merge_processes`): ratios near 1 differ by up to 15-20% between
processes on a 2-core CPU, so a claim that one variant is at least as fast as another
needs several.

Variants: "constant" is the plain network (p_L = 1: no gate, no conditional); "SD <skip>"
trains with stochastic depth (p_L = --p_last, linear decay) skipped by <skip> ("auto" is
the backend's choice, `sdnet.backend`); "SD open" and "SD closed" are `skip="auto"` with
every gate forced open or closed (gates still drawn from the step's key, so the program
is the stochastic one): what a block costs when it runs, and what remains when none does.
On a CPU the ratios say what skipping saves on that CPU; they do not predict a GPU's or a
TPU's, whose costs of conditionals and loops differ (the README's tables keep each).
"""


import time

from absl import app
from absl import flags
import jax

from benchmarks import common
from benchmarks import timing

FLAGS = flags.FLAGS
common.define_flags()
flags.DEFINE_integer("steps_per_call", 1, "Steps per compiled call.")
flags.DEFINE_list("skips", ["auto", "cond", "mask", "compact"],
                  "Skip implementations to time for stochastic depth.")
flags.DEFINE_bool("forced_gates", True, "Also time skip='auto' with every gate forced "
                  "open, and forced closed.")
flags.DEFINE_string("dtype", "float32", "Compute dtype.")
flags.DEFINE_bool("remat", False, "Rematerialise each block in the backward pass.")
flags.DEFINE_bool("compile_only", False, "Only compile: compile time and memory, no timing "
                  "(meaningful on CPU too, as proportions).")
flags.DEFINE_enum("family", "cifar", ["cifar", "imagenet"], "The networks of --cases: "
                  "CIFAR's (6n+2, 32 px) or ImageNet's bottleneck ResNets (50/101/152).")
flags.DEFINE_integer("image_size", 224, "ImageNet: the crop size the step trains on.")


def main(argv):
  del argv
  if FLAGS.processes > 1:
    common.across_processes("benchmarks.train_step", FLAGS.processes, FLAGS.out,
                            FLAGS.seed)
    return
  common.prepare_host(FLAGS.cores)
  print(f"JAX {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind} "
        f"({jax.default_backend()})")
  if jax.default_backend() == "cpu":
    print("CPU: ratios show what skipping saves on this CPU, not on a GPU or TPU.")
  rows = timing.measure(
      common.cases(FLAGS.cases, FLAGS.small, FLAGS.family), skips=FLAGS.skips,
      p_last=FLAGS.p_last, forced_gates=FLAGS.forced_gates, repeats=FLAGS.repeats,
      calls=FLAGS.calls,
      steps_per_call=FLAGS.steps_per_call, dtype=FLAGS.dtype, remat=FLAGS.remat,
      compile_only=FLAGS.compile_only, family=FLAGS.family, image_size=FLAGS.image_size,
      seed=FLAGS.seed)
  print(common.format_table(rows))
  if FLAGS.out:
    common.write_json(FLAGS.out, {"jax": jax.__version__,
                                  "device": jax.devices()[0].device_kind,
                                  "backend": jax.default_backend(),
                                  "date": time.strftime("%Y-%m-%d"), "rows": rows})


if __name__ == "__main__":
  app.run(main)

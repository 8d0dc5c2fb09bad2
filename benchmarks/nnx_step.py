r"""Times the same ResNet's train step in Linen (`sdnet.models`) and NNX (`sdnet.nnx`).

  python -m benchmarks.nnx_step                        # ResNet-110, batch 128, CPU table
  python -m benchmarks.nnx_step --cases=20:32 --skips=mask --repeats=3   # quicker
  python -m benchmarks.nnx_step --small                # a check of the script

Both steps are forward, backward and an optax SGD update with Nesterov momentum (the
paper's optimiser) on random images and labels, gates drawn from the step's key folded
with the step count, BatchNorm statistics updated; Linen's is a `jax.jit` of a pure
function of (params, batch_stats, opt_state), NNX's an `nnx.jit` of
(model, optimizer) with `nnx.Optimizer`. Both networks hold the same variables
(`sdnet.nnx.load_linen`) and are compiled with `sdnet.backend.compiler_options()`
before timing; variants are timed interleaved (`common.interleave`), median over
--repeats of --calls steps. Printed: median ms per step, spread, the NNX step's ratio to
Linen's at the same skip method, and compile seconds. The NNX ResNet skips per block
("cond" or "mask"; "auto" as for a lone block), so compare methods both run.
"""

import time

from absl import app
from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
from sdnet import backend
from sdnet import models
from sdnet import nnx as sdnnx

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_list("cases", ["110:128"], "DEPTH:BATCH of CIFAR ResNets (6n + 2).")
  flags.DEFINE_list("skips", ["cond", "mask"], "Skip methods both APIs run.")
  flags.DEFINE_float("p_last", 0.5, "p_L of the linear decay.")
  flags.DEFINE_integer("repeats", 7, "Interleaved repetitions per variant.")
  flags.DEFINE_integer("calls", 3, "Timed steps per repetition.")
  flags.DEFINE_integer("cores", 0, "Pin to this many CPUs (0: all), as every benchmark.")
  flags.DEFINE_bool("small", False, "ResNet-8 at batch 8: a check of the script.")
  flags.DEFINE_string("out", "", "Write the rows as JSON here.")


TX = optax.sgd(0.1, momentum=0.9, nesterov=True)


def _loss(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def linen_variant(linen, variables, images, labels, key):
  """(run, compile_s): the Linen step, compiled, and a function timing one call."""
  def step(state, images, labels, key):
    params, stats, opt_state, count = state

    def loss_fn(params):
      logits, new = linen.apply({"params": params, "batch_stats": stats}, images,
                                train=True, key=jax.random.fold_in(key, count),
                                mutable=["batch_stats"])
      return _loss(logits, labels), new["batch_stats"]
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = TX.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), stats, opt_state, count + 1), loss

  state = jax.tree.map(jnp.array, (variables["params"], variables["batch_stats"],
                                   TX.init(variables["params"]), jnp.zeros((), jnp.int32)))
  return _compiled_runner(step, state, images, labels, key)


def nnx_variant(model, images, labels, key):
  """(run, compile_s): the NNX step, compiled, and a function timing one call."""
  optimizer = nnx.Optimizer(model, TX, wrt=nnx.Param)
  count = nnx.Variable(jnp.zeros((), jnp.int32))

  def step(model, optimizer, count, images, labels, key):
    def loss_fn(model):
      return _loss(model(images, key=jax.random.fold_in(key, count[...])), labels)
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    count[...] = count[...] + 1
    return loss

  # Compiled as nnx.jit would (split, a jitted pure function, merge), ahead of time so
  # that the compiler options apply.
  graphdef, state = nnx.split((model, optimizer, count))

  def pure(state, images, labels, key):
    model, optimizer, count = nnx.merge(graphdef, state)
    loss = step(model, optimizer, count, images, labels, key)
    return nnx.state((model, optimizer, count)), loss

  return _compiled_runner(pure, state, images, labels, key)


def _compiled_runner(step, state, images, labels, key):
  """(run, compile_s): `step(state, images, labels, key) -> (state, loss)` compiled ahead
  of time with its state donated and the backend's options, run once, and run(calls)
  running it `calls` times more on its own state."""
  start = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=0).lower(state, images, labels, key).compile(
      compiler_options=backend.compiler_options())
  compile_s = time.perf_counter() - start
  holder = {"state": compiled(state, images, labels, key)[0]}

  def run(calls):
    for _ in range(calls):
      holder["state"], loss = compiled(holder["state"], images, labels, key)
    loss.block_until_ready()
  return run, compile_s


def measure(cases, skips, p_last, repeats, calls, seed=0):
  """One row per (case, skip, API)."""
  table = []
  for depth, batch in cases:
    images = jax.random.normal(jax.random.key(1), (batch, 32, 32, 3))
    labels = jnp.arange(batch) % 10
    key = jax.random.key(seed)
    runs, compile_s = {}, {}
    for skip in skips:
      linen = models.CifarResNet(depth, p_last=p_last, skip=skip)
      variables = jax.jit(lambda x, linen=linen: linen.init(
          jax.random.key(0), x, train=False))(images[:1])
      model = sdnnx.load_linen(
          sdnnx.CifarResNet(depth, p_last=p_last, skip=skip, rngs=nnx.Rngs(0)), variables)
      for api, (run, seconds) in (
          ("linen", linen_variant(linen, variables, images, labels, key)),
          ("nnx", nnx_variant(model, images, labels, key))):
        name = f"{api} {skip}"
        compile_s[name] = seconds

        def timed(run=run):
          start = time.perf_counter()
          run(calls)
          return (time.perf_counter() - start) / calls
        runs[name] = timed
    times = common.interleave(runs, repeats)
    for name, seconds in times.items():
      api, skip = name.split(" ")
      ms = np.asarray(seconds) * 1e3
      linen_ms = np.median(times[f"linen {skip}"]) * 1e3
      table.append({"depth": depth, "batch": batch, "api": api, "skip": skip,
                    "median_ms": float(np.median(ms)), "min_ms": float(ms.min()),
                    "max_ms": float(ms.max()),
                    "ratio_to_linen": float(np.median(ms) / linen_ms),
                    "compile_s": compile_s[name]})
  return table


def format_table(table):
  lines = [f"{'network':>14} {'batch':>5} {'api':>6} {'skip':>6} {'median ms':>9} "
           f"{'spread ms':>17} {'/linen':>7} {'compile s':>9}"]
  for r in table:
    lines.append(f"{'ResNet-' + str(r['depth']):>14} {r['batch']:>5} {r['api']:>6} "
                 f"{r['skip']:>6} {r['median_ms']:9.1f} {r['min_ms']:8.1f}-"
                 f"{r['max_ms']:8.1f} {r['ratio_to_linen']:7.3f} {r['compile_s']:9.1f}")
  return "\n".join(lines)


def main(argv):
  del argv
  common.prepare_host(FLAGS.cores)
  print(f"JAX {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind} "
        f"({jax.default_backend()})")
  cases = [(8, 8)] if FLAGS.small else [
      tuple(int(v) for v in spec.split(":")) for spec in FLAGS.cases]
  table = measure(cases, FLAGS.skips, FLAGS.p_last, FLAGS.repeats, FLAGS.calls)
  print(format_table(table))
  if FLAGS.out:
    common.write_json(FLAGS.out, {"jax": jax.__version__, "backend": jax.default_backend(),
                                  "date": time.strftime("%Y-%m-%d"), "rows": table})


if __name__ == "__main__":
  define_flags()
  app.run(main)

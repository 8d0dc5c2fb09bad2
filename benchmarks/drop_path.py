r"""Times a drop-path train step per method: no drop path, masking, gathering the kept rows,
DINOv2's fixed subset.

  python -m benchmarks.drop_path                                  # the CPU table
  python -m benchmarks.drop_path --models=vit_s16:224:128,convnext_t:224:128  # GPU / TPU
  python -m benchmarks.drop_path --small                          # a check of the script

Each case is MODEL:IMAGE_SIZE:BATCH (models: vit_ti16, vit_s16, vit_b16, convnext_t,
convnext_s, convnext_b at 1000 classes). The step is forward, backward and an AdamW update
(weight decay 0.05, label smoothing 0.1: the DeiT / ConvNeXt recipe's arithmetic), jitted
with its state donated and `sdnet.backend.compiler_options()`, on random images; gates
come from the step's key folded with the step, so every timed step draws new gates.
Variants, per `--rates` (timm's linear schedule: block i drops with rate * i / (L - 1)):

  none           drop_path_rate 0: the plain network, nothing drawn
  mask R         per-example Bernoulli gates, every row computed and multiplied (timm)
  gather R       the same gates, the branch run on the kept rows only (`sdnet.rows`)
  subset R       exactly round(p_l * B) rows per block, gathered (DINOv2), no conditional
  subset-mask R  the same subset draw, masked: what the subset's gather saves
  ...-rolled R   with --rolled: the method with its stacks of blocks a loop
                 (`scan_unroll=1`) where the others take `scan_unroll="auto"`
                 (`sdnet.backend.unroll_blocks`; `sdnet.stacks`)

Every variant is compiled ahead of time, then timed interleaved (`common.interleave`),
median over --repeats of --calls steps each. Printed beside each time: its ratio to
masking at the same rate ("/mask") and to no drop path ("/none"), and "rows": the mean
fraction of block rows the timed steps computed (padding included; 1 for masking).
With PyTorch installed, --torch adds timm's masking and DINOv2's subset in PyTorch eager
("torch ..." rows, their ratios to PyTorch's own "none" and "mask"), timed interleaved
with JAX's variants in this process (`benchmarks.torch_drop_path`).
"""

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
from sdnet import backend
from sdnet import gates as gates_lib
from sdnet import models
from sdnet import rows

FLAGS = flags.FLAGS

MODELS = {"vit_ti16": models.ViT_Ti16, "vit_s16": models.ViT_S16, "vit_b16": models.ViT_B16,
          "convnext_t": models.ConvNeXt_T, "convnext_s": models.ConvNeXt_S,
          "convnext_b": models.ConvNeXt_B, "vit_test": models.ViT_Test,
          "convnext_test": models.ConvNeXt_Test}
METHODS = ("mask", "gather", "subset", "subset-mask")


def define_flags():
  flags.DEFINE_list("models", ["vit_s16:112:64", "convnext_t:64:32"],
                    "MODEL:IMAGE_SIZE:BATCH cases.")
  flags.DEFINE_list("rates", ["0.1", "0.2", "0.4", "0.5"], "drop_path_rate values.")
  flags.DEFINE_list("methods", list(METHODS), f"Methods of {METHODS} to time.")
  flags.DEFINE_integer("repeats", 7, "Interleaved repetitions per variant.")
  flags.DEFINE_integer("calls", 2, "Timed steps per repetition.")
  flags.DEFINE_integer("seed", 0, "Seed of the steps' gate draws.")
  flags.DEFINE_integer("cores", 0, "Pin to this many CPUs (0: all), as every benchmark.")
  flags.DEFINE_bool("small", False, "Tiny models at batch 8: a CPU check of the script.")
  flags.DEFINE_bool("torch", False, "Also time PyTorch eager peers (needs torch).")
  flags.DEFINE_bool("rolled", False, "Also time every method with its stacks of blocks "
                    "a loop (scan_unroll=1): '-rolled' variants.")
  flags.DEFINE_string("out", "", "Write the rows as JSON here.")


def parse_cases(specs, small=False):
  if small:
    return [("vit_test", 32, 8), ("convnext_test", 32, 8)]
  cases = []
  for spec in specs:
    name, size, batch = spec.split(":")
    if name not in MODELS:
      raise app.UsageError(f"unknown model {name!r} in --models; choose of {sorted(MODELS)}.")
    cases.append((name, int(size), int(batch)))
  return cases


def build(name: str, rate: float, method: str, num_classes: int = 1000):
  """The model of a variant: `method` "none", or one of METHODS at `rate`; a suffix
  "-rolled" runs its stacks of blocks as loops (scan_unroll=1), not as "auto" chooses."""
  base = method.removesuffix(ROLLED)
  unroll = dict(scan_unroll=1) if method != base else {}
  if base == "none":
    return MODELS[name](num_classes=num_classes, **unroll)
  mode = "subset" if base.startswith("subset") else "row"
  skip = "mask" if base.endswith("mask") else "gather"
  return MODELS[name](num_classes=num_classes, drop_path_rate=rate, mode=mode, skip=skip,
                      **unroll)


ROLLED = "-rolled"


def make_step(model, tx, smoothing: float = 0.1):
  """The jitted train step (state, images, labels, key) -> (state, loss); state donated."""
  def step(state, images, labels, key):
    params, opt_state, count = state
    step_key = jax.random.fold_in(key, count)

    def loss_fn(params):
      logits = model.apply({"params": params}, images, train=True, key=step_key)
      targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
      return jnp.mean(optax.softmax_cross_entropy(logits, targets))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state, count + 1), loss
  return jax.jit(step, donate_argnums=0)


def rows_of_steps(model, batch: int, key, steps) -> float:
  """The mean fraction of block rows `steps` steps from `key` compute (padding included)."""
  probs = model.survival_probs()
  if model.drop_path_rate == 0 or model.skip == "mask":
    return 1.0
  fractions = []
  for count in steps:
    drawn = gates_lib.draw(jax.random.fold_in(key, count), probs, model.mode, batch)
    for p, gate in zip(probs, drawn):
      if p == 1:
        fractions.append(1.0)
      elif model.mode == "subset":
        fractions.append(gates_lib.subset_size(p, batch) / batch)
      else:
        fractions.append(float(rows.rows_computed(gate)))
  return float(np.mean(fractions))


def jax_variants(name, size, batch, rates, methods, calls, seed, tx,
                 rolled=False) -> dict:
  """{variant: (run, rows)}: `run()` times `calls` steps of the compiled variant (seconds
  per step); `rows()` the mean fraction of block rows its timed steps computed."""
  images = jax.random.normal(jax.random.key(1), (batch, size, size, 3))
  labels = jnp.arange(batch) % 1000
  key = jax.random.key(seed)
  models_ = {"none": build(name, 0.0, "none")}
  methods = [m + suffix for m in methods for suffix in ("", ROLLED)[:1 + rolled]]
  for rate in rates:
    for method in methods:
      models_[f"{method} {rate:g}"] = build(name, rate, method)
  init = models_["none"].init(jax.random.key(0), images[:1])["params"]
  out = {}
  for variant, model in models_.items():
    state = jax.tree.map(jnp.array, (init, tx.init(init), jnp.zeros((), jnp.int32)))
    start = time.perf_counter()
    compiled = make_step(model, tx).lower(state, images, labels, key).compile(
        compiler_options=backend.compiler_options())
    compile_s = time.perf_counter() - start
    state, loss = compiled(state, images, labels, key)  # warm-up
    loss.block_until_ready()
    holder, counts = {"state": state}, []

    def run(compiled=compiled, holder=holder, counts=counts):
      start = time.perf_counter()
      for _ in range(calls):
        counts.append(int(holder["state"][2]))
        holder["state"], loss = compiled(holder["state"], images, labels, key)
      loss.block_until_ready()
      return (time.perf_counter() - start) / calls

    rows_fn = lambda model=model, counts=counts: rows_of_steps(model, batch, key, counts)
    out[variant] = (run, rows_fn, compile_s)
  return out


def measure(cases, rates, methods, repeats, calls, seed, with_torch=False, rolled=False):
  """One row per variant of every case (the module docstring); with `with_torch`, the
  PyTorch peers' variants are timed interleaved with JAX's; with `rolled`, every
  method with its stacks of blocks as loops as well."""
  table = []
  tx = optax.adamw(1e-3, weight_decay=0.05)
  for name, size, batch in cases:
    variants = jax_variants(name, size, batch, rates, methods, calls, seed, tx, rolled)
    if with_torch:
      from benchmarks import torch_drop_path  # pylint: disable=g-import-not-at-top
      for variant, (run, rows_) in torch_drop_path.variants(
          name, size, batch, rates, calls, seed).items():
        variants[variant] = (run, lambda rows_=rows_: rows_, None)
    times = common.interleave({v: run for v, (run, _, _) in variants.items()}, repeats)
    medians = {v: float(np.median(t)) for v, t in times.items()}
    for variant, (_, rows_fn, compile_s) in variants.items():
      prefix = "torch " if variant.startswith("torch ") else ""
      method, _, rate = variant.removeprefix(prefix).partition(" ")
      ms = np.asarray(times[variant]) * 1e3
      mask = medians.get(f"{prefix}mask {rate}")
      table.append({
          "model": name, "image_size": size, "batch": batch, "variant": variant,
          "library": "torch" if prefix else "jax", "rate": float(rate or 0),
          "method": method, "median_ms": float(np.median(ms)), "min_ms": float(ms.min()),
          "max_ms": float(ms.max()), "ratio_to_mask": medians[variant] / mask if mask else None,
          "ratio_to_none": medians[variant] / medians[f"{prefix}none"], "rows": rows_fn(),
          "compile_s": compile_s})
  return table


def format_table(table):
  lines = [f"{'model':>14} {'px':>4} {'batch':>5} {'variant':>18} {'median ms':>9} "
           f"{'spread ms':>17} {'/mask':>6} {'/none':>6} {'rows':>6} {'compile s':>9}"]
  number = lambda v, spec, w: f"{'-' if v is None else format(v, spec):>{w}}"
  for r in table:
    lines.append(
        f"{r['model']:>14} {r['image_size']:>4} {r['batch']:>5} {r['variant']:>18} "
        f"{r['median_ms']:9.1f} {r['min_ms']:8.1f}-{r['max_ms']:8.1f} "
        f"{number(r['ratio_to_mask'], '.3f', 6)} {number(r['ratio_to_none'], '.3f', 6)} "
        f"{number(r['rows'], '.3f', 6)} {number(r.get('compile_s'), '.1f', 9)}")
  return "\n".join(lines)


def main(argv):
  del argv
  common.prepare_host(FLAGS.cores)
  print(f"JAX {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind} "
        f"({jax.default_backend()})")
  unknown = set(FLAGS.methods) - set(METHODS)
  if unknown:
    raise app.UsageError(f"unknown --methods {sorted(unknown)}; choose of {METHODS}.")
  cases = parse_cases(FLAGS.models, FLAGS.small)
  rates = [float(r) for r in FLAGS.rates]
  table = measure(cases, rates, FLAGS.methods, FLAGS.repeats, FLAGS.calls, FLAGS.seed,
                  with_torch=FLAGS.torch, rolled=FLAGS.rolled)
  print(format_table(table))
  if FLAGS.out:
    common.write_json(FLAGS.out, {"jax": jax.__version__,
                                  "device": jax.devices()[0].device_kind,
                                  "backend": jax.default_backend(),
                                  "date": time.strftime("%Y-%m-%d"), "rows": table})


if __name__ == "__main__":
  define_flags()
  app.run(main)

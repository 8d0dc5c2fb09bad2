"""The experiments' compiled train step as the benchmarks time it (`benchmarks.train_step`).

`measure` builds, for each (depth, batch), constant depth and stochastic depth per skip
method with the one builder the training loop uses (`experiments.training.steps`), compiles
them ahead of time, times them interleaved (`common.interleave`: every repetition runs
each variant once in turn, from a rotating start) and returns one `common.row` per variant.
`input_images_per_s` times the input pipeline alone (`benchmarks.input_pipeline`).
"""

import functools
import time

from flax import jax_utils
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from experiments import data
from experiments.configs import default
from experiments.data import on_device
from experiments.training import recipe
from experiments.training import steps
from sdnet import gates as gates_lib


class ForcedGates:
  """`model` whose training gates are forced: every gate open (`open_blocks=True`),
  every gate closed (False), or open where a sequence of one bool per block says, drawn
  from the step's key as Bernoulli(1) and Bernoulli(0) draws: traced values, so the
  compiled program keeps every conditional of a stochastic network and XLA cannot fold
  them away."""

  def __init__(self, model, open_blocks):
    self.model = model
    self.probs = np.broadcast_to(np.asarray(open_blocks, np.float32), (model.num_blocks,))

  def init(self, *args, **kwargs):
    return self.model.init(*args, **kwargs)

  def apply(self, variables, x, train=False, *, key=None, **kwargs):
    if not train:
      return self.model.apply(variables, x, **kwargs)
    gates = jax.random.bernoulli(key, jnp.asarray(self.probs))
    return self.model.apply(variables, x, train=True, gates=gates, **kwargs)


def step_config(family: str, depth: int, batch: int, p_last: float, skip: str, *,
                dtype: str = "float32", remat: bool = False):
  """The config of the family's paper run (CIFAR's default, ImageNet's resnet152),
  with the network and step settings given."""
  if family == "imagenet":
    from experiments.configs import imagenet  # pylint: disable=g-import-not-at-top
    config = imagenet.get_config("resnet152")
  else:
    config = default.get_config()
  config.model.depth, config.batch_size = depth, batch
  config.survival.p_last, config.skip = p_last, skip
  config.dtype, config.remat = dtype, remat
  return config


def step_inputs(family: str, image_size: int, shape: tuple[int, ...], rng=None) -> tuple:
  """(preprocess, num_classes, batch) of a benchmarked step as the family's data source
  feeds it: uint8 images and the device preprocessing (CIFAR: normalise, shift and flip;
  ImageNet: its host-drawn augmentation parameters, jitter, lighting, normalise). The
  batch is abstract (`jax.ShapeDtypeStruct`s) without `rng`, random arrays with it."""
  from experiments.data import imagenet_preprocessing as fb  # pylint: disable=g-import-not-at-top
  if family == "imagenet":
    preprocess, classes, side = on_device.JitterLightingNormalise(), 1000, image_size
  else:
    preprocess = on_device.NormaliseAndShift(np.full((32, 32, 3), 120.0, np.float32),
                                             64.0, augment=True)
    classes, side = 10, 32
  spec = {"images": jax.ShapeDtypeStruct(shape + (side, side, 3), jnp.uint8),
          "labels": jax.ShapeDtypeStruct(shape, jnp.int32)}
  if family == "imagenet":
    spec["augment"] = jax.ShapeDtypeStruct(shape + (fb.AUGMENT_SIZE,), jnp.float32)
  if rng is None:
    return preprocess, classes, spec
  batch = {"images": rng.integers(0, 256, spec["images"].shape, dtype=np.uint8),
           "labels": rng.integers(0, classes, shape, dtype=np.int32)}
  if family == "imagenet":
    batch["augment"] = np.stack([fb.augment_parameters(rng) for _ in range(
        int(np.prod(shape)))]).reshape(spec["augment"].shape)
  return preprocess, classes, batch


def make_variant(depth, batch, p_last, skip, steps_per_call, *, dtype="float32",
                 remat=False, forced_gates=None, compile_only=False, family="cifar",
                 image_size=224, seed=0):
  """A compiled step function and its donated state, as the experiments build them
  (`forced_gates`: True/False forces every gate open/closed, a sequence of one bool per
  block each gate, see ForcedGates; `seed`: the run's seed, which with the step number
  draws each step's gates)."""
  config = step_config(family, depth, batch, p_last, skip, dtype=dtype, remat=remat)
  devices = jax.local_device_count()
  shape = (devices, steps_per_call, batch // devices)
  preprocess, classes, spec = step_inputs(family, image_size, shape)
  model = recipe.build_model(config, classes)
  if forced_gates is not None:
    model = ForcedGates(model, forced_gates)
  tx = recipe.make_optimizer(config, recipe.learning_rate_schedule(config, 390))
  make_state = lambda: jax_utils.replicate(jax.device_get(
      steps.create_train_state(model, tx, spec["images"].shape[-3:], 0)))
  pmapped = steps.make_train_step(model, tx, seed=seed, preprocess=preprocess)
  metrics = jax.eval_shape(lambda: jax_utils.replicate(steps.empty_metrics()))
  state = jax.eval_shape(make_state)
  step, compile_s = steps.compile_ahead(pmapped, state, spec, metrics)
  gate_probs = model.probs if forced_gates is not None else model.survival_probs()
  variant = {"fn": step, "times": [], "compile_s": compile_s,
             "memory_gib": program_memory_gib(step), "gate_probs": gate_probs,
             "seed": seed, "untimed_steps": steps_per_call}
  if compile_only:
    return variant
  variant["data"] = jax.tree.map(jax.device_put, step_inputs(
      family, image_size, shape, np.random.default_rng(0))[2])
  variant["state"] = make_state()
  variant["metrics"] = jax_utils.replicate(steps.empty_metrics())
  run_variant(variant, 1, 1)  # warm-up
  return variant


def drawn_gates(variant) -> np.ndarray | None:
  """The gates of `variant`'s timed steps, (steps, blocks) bools (None before any ran):
  each step's gates are a function of (seed, step) (`steps.gate_key`), drawn again here
  for every step after the warm-up."""
  if "state" not in variant:
    return None
  ran = int(jax.device_get(variant["state"].step)[0])
  timed = jnp.arange(variant["untimed_steps"], ran)
  if not timed.size:
    return None
  seed_key = jax.random.key(variant["seed"])
  return np.asarray(jax.vmap(lambda step: gates_lib.draw(
      steps.gate_key(seed_key, step), variant["gate_probs"]))(timed))


def blocks_computed(variant) -> float | None:
  """The mean fraction of its blocks that `variant`'s timed steps computed. A stochastic
  step's time depends on its draws: a few steps can compute more or fewer blocks than the
  expected depth, and steps of one seed are the same in every process."""
  gates = drawn_gates(variant)
  return None if gates is None else float(gates.mean())


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


def measure(cases, *, skips=("auto", "cond", "mask", "compact"), p_last=0.5,
            forced_gates=True, repeats=7, calls=5, steps_per_call=1, dtype="float32",
            remat=False, compile_only=False, family="cifar", image_size=224, seed=0):
  """The rows of every variant of every (depth, batch) in `cases` (module doc): "constant"
  (p_L = 1), "SD <skip>" for each of `skips`, and with `forced_gates` "SD open" and
  "SD closed" (skip "auto", every gate forced, `ForcedGates`); ImageNet's networks at
  `image_size` with `family="imagenet"`; `seed` draws the steps' gates."""
  rows = []
  for depth, batch in cases:
    make = lambda p, skip, **kw: make_variant(
        depth, batch, p, skip, steps_per_call, dtype=dtype, remat=remat,
        compile_only=compile_only, family=family, image_size=image_size, seed=seed, **kw)
    variants = {"constant": make(1.0, "auto")}
    for skip in skips:
      variants[f"SD {skip}"] = make(p_last, skip)
    if forced_gates:
      for name, is_open in (("SD open", True), ("SD closed", False)):
        variants[name] = make(p_last, "auto", forced_gates=is_open)
    times = common.interleave(
        {name: functools.partial(run_variant, variant, calls, steps_per_call)
         for name, variant in variants.items()}, 0 if compile_only else repeats)
    for name, variant in variants.items():
      variant["times"] = times[name]
    base = np.median(variants["constant"]["times"] or [np.nan])
    case_rows = [common.row(depth, batch, name, variant["times"], base,
                            variant["compile_s"], variant["memory_gib"], family,
                            blocks_computed=blocks_computed(variant))
                 for name, variant in variants.items()]
    rows += common.with_ratio_to(case_rows, "SD open")
  return rows


def input_images_per_s(source: data.Source, config, calls: int, clock=time.perf_counter):
  """Images per second of `calls` calls' batches of `source`, made and on the devices."""
  chunks = [max(1, config.steps_per_call)] * calls
  batches = source.train_batches(config.seed, config.batch_size, 0, chunks,
                                 data.Shard.of_this_process())
  images, start = 0, clock()
  for batch in jax_utils.prefetch_to_device(batches, 2):
    jax.block_until_ready(batch)
    images += batch["labels"].size
  return images * jax.process_count() / (clock() - start)

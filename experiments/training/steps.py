"""The training and evaluation steps: pure functions, pmapped over the local devices.

One SGD step on every local device: the data source's preprocessing on the device,
cross-replica BatchNorm, gradients averaged with `pmean`, one gate key per step that is
the same on every device (the replicated seed key folded with the step: one mask per
global mini-batch, the paper's), augmentation keys that differ per device. Several steps
can run in one compiled call ("iterations per loop"); their metrics accumulate on the
devices and are read only when the loop needs them.

`make_train_step` is the one builder of the compiled training step: the training loop
and the benchmarks both call it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import functools
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.training.recipe import AXIS
from sdnet import backend
from sdnet import options

GATE_STREAM, AUGMENT_STREAM = 0, 1

# preprocess(batch, key) -> float images: the data source's preprocessing on the device
# (`experiments.data.Source.preprocess`); key is None at evaluation.
Preprocess = Callable[[dict, jax.Array | None], jax.Array]


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


# ------------------------------------------------------------------------- state


def create_train_state(model, tx, image_shape, seed: int) -> TrainState:
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(seed), jnp.zeros((1,) + tuple(image_shape), jnp.float32))
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))


# -------------------------------------------------------------------------- metrics

# Every metric the train step accumulates, with how two partial values combine. The
# loop reads them only at its events, so checking them costs no extra host sync.
TRAIN_METRICS: Mapping[str, Callable] = {
    "loss_sum": jnp.add,        # summed softmax cross-entropy
    "correct": jnp.add,         # examples classified right
    "count": jnp.add,           # examples seen
    "steps": jnp.add,           # train steps taken
    "first_block_grad_abs": jnp.add,  # sum over steps of mean |dL/dW| (paper, Fig. 7)
    "first_nonfinite_step": jnp.minimum,  # first step with a non-finite loss or gradient
}
NO_NONFINITE_STEP = np.iinfo(np.int32).max


def empty_metrics() -> dict:
  metrics = {name: jnp.zeros((), jnp.float32) for name in TRAIN_METRICS}
  metrics["first_nonfinite_step"] = jnp.asarray(NO_NONFINITE_STEP, jnp.int32)
  return metrics


def accumulate(metrics: dict, step_metrics: dict) -> dict:
  return {name: combine(metrics[name], step_metrics[name])
          for name, combine in TRAIN_METRICS.items()}


def summarize(totals: Mapping[str, Any]) -> dict:
  """Mean loss and error (and, for training, mean first-block |gradient|) of summed
  metrics; the same summary for training windows and evaluation."""
  totals = {k: np.asarray(v) for k, v in totals.items()}
  count = float(totals["count"])
  summary = {"loss": float(totals["loss_sum"]) / count,
             "error": 1.0 - float(totals["correct"]) / count, "count": count}
  if "steps" in totals:
    summary["first_block_grad_abs"] = float(totals["first_block_grad_abs"]) / float(
        totals["steps"])
  if "correct_top5" in totals:
    summary["top5_error"] = 1.0 - float(totals["correct_top5"]) / count
  return summary


def first_block_kernel(params) -> jax.Array:
  """The first kernel of the first residual block (the paper's Fig. 7 layer): in key
  order, of the first block's parameters ("stage1_first", or block 0 of the stacked
  "stage1_blocks" of a ResNet or ConvNeXt or "blocks" of a ViT); of any other model, its
  first kernel (or leaf)."""
  name = next((k for k in ("stage1_first", "stage1_blocks", "blocks") if k in params), None)
  leaves = jax.tree_util.tree_leaves_with_path(params if name is None else params[name])
  kernel = next((leaf for path, leaf in leaves
                 if getattr(path[-1], "key", None) == "kernel"), leaves[0][1])
  return kernel if name in (None, "stage1_first") else kernel[0]


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
  """Softmax cross-entropy per example, against labels smoothed by `label_smoothing`
  (Szegedy et al., 2016: (1 - a) one_hot + a / classes)."""
  if not label_smoothing:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


# ------------------------------------------------------------------------ pure steps


def gate_key(seed_key, step):
  """The key a training step draws its block gates from: a function of (seed, step) alone,
  the same on every device."""
  return jax.random.fold_in(jax.random.fold_in(seed_key, GATE_STREAM), step)


def train_step(state: TrainState, batch: dict, metrics: dict, *, model, tx, seed_key,
               preprocess: Preprocess, axis_name: str | None = AXIS,
               label_smoothing: float = 0.0):
  """One optimiser step on this device's share of the global batch.

  In batch mode the gate key depends only on (seed, step): identical on every device, as
  the paper's one-mask-per-mini-batch and cross-replica BatchNorm require. Per-example
  gates (row and subset modes) are drawn per device too, (seed, step, device), as
  dropout's: the same key would give the i-th example of every device the same gates.
  The augmentation key depends on (seed, step, device).
  """
  step_gate_key = gate_key(seed_key, state.step)
  device = jax.lax.axis_index(axis_name) if axis_name else 0
  if getattr(model, "mode", "batch") in options.ROW_MODES:
    step_gate_key = jax.random.fold_in(step_gate_key, device)
  augment_key = jax.random.fold_in(
      jax.random.fold_in(jax.random.fold_in(seed_key, AUGMENT_STREAM), state.step), device)
  images = preprocess(batch, augment_key)

  def loss_fn(params):
    logits, new_state = model.apply(
        {"params": params, "batch_stats": state.batch_stats}, images, train=True,
        key=step_gate_key, mutable=["batch_stats"])
    losses = cross_entropy(logits, batch["labels"], label_smoothing)
    return jnp.mean(losses), (logits, losses, new_state.get("batch_stats", {}))

  grads, (logits, losses, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
  with jax.named_scope("update"):  # names the optimizer's work in profiles
    if axis_name:
      grads = jax.lax.pmean(grads, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
  new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                         opt_state=opt_state)
  sums = {"loss_sum": jnp.sum(losses),
          "correct": jnp.sum(jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32),
          "count": jnp.asarray(losses.shape[0], jnp.float32)}
  if axis_name:
    sums = jax.lax.psum(sums, axis_name)
  finite = jnp.isfinite(sums["loss_sum"]) & jnp.isfinite(optax.tree.norm(grads))
  step_metrics = {
      **sums, "steps": jnp.ones((), jnp.float32),
      "first_block_grad_abs": jnp.mean(jnp.abs(first_block_kernel(grads))),
      "first_nonfinite_step": jnp.where(finite, NO_NONFINITE_STEP, state.step + 1)}
  return new_state, accumulate(metrics, step_metrics)


def train_steps(state, batches, metrics, **kwargs):
  """`train_step` over the leading (steps) axis of `batches`, in one compiled call."""
  def body(carry, batch):
    return train_step(carry[0], batch, carry[1], **kwargs), None
  (state, metrics), _ = jax.lax.scan(body, (state, metrics), batches)
  return state, metrics


def eval_step(state: TrainState, batch: dict, *, model, preprocess: Preprocess,
              top5: bool = False):
  """Summed loss, correct predictions (top-1, and top-5 if asked) and count of one padded
  evaluation batch, on this device (the devices' sums are added once per evaluation, by
  `sum_over_devices`)."""
  images = preprocess(batch, None)
  logits = model.apply({"params": state.params, "batch_stats": state.batch_stats}, images,
                       train=False)
  mask, labels = batch["mask"], batch["labels"]
  sums = {"loss_sum": jnp.sum(cross_entropy(logits, labels) * mask),
          "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
          "count": jnp.sum(mask)}
  if top5:  # (of at most 5 classes, every label is among the top 5)
    best5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    sums["correct_top5"] = jnp.sum(jnp.any(best5 == labels[:, None], -1) * mask)
  return sums


# -------------------------------------------------------------- the compiled steps


def make_train_step(model, tx, *, seed: int, preprocess: Preprocess,
                    label_smoothing: float = 0.0):
  """The training step as every caller runs it: `train_steps` pmapped over the local
  devices, state and metrics donated. Called as (state, batches, metrics)."""
  step = functools.partial(train_steps, model=model, tx=tx, seed_key=jax.random.key(seed),
                           preprocess=preprocess, label_smoothing=label_smoothing)
  return jax.pmap(step, axis_name=AXIS, donate_argnums=(0, 2))


def make_eval_step(model, *, preprocess: Preprocess, top5: bool = False):
  """`eval_step` pmapped over the local devices; `model` without a BatchNorm axis. The
  compiled program has no collective: see `sum_over_devices`."""
  return jax.pmap(functools.partial(eval_step, model=model, preprocess=preprocess,
                                    top5=top5), axis_name=AXIS)


@functools.partial(jax.pmap, axis_name=AXIS)
def sum_over_devices(tree):
  """Each leaf summed over every device of every process, replicated.

  A program of its own, called once per evaluation after the eval steps, rather than the
  eval step's last instruction. PjRt's CPU client launches a program with a collective
  from its worker threads, one without (the evaluation's additions) from the caller, and
  lets 32 programs per device be in flight. With the all-reduce in the eval step, the
  threads' stacks of a hung run showed three devices waiting in the all-reduce and the
  fourth device's launch waiting for its in-flight places (taken, as it reads, by the
  additions waiting for that very step); after 40 s XLA aborted the process ("Termination
  timeout for all reduce"). On jax 0.10.2, 4 host devices and 2 cores, that hung 3 of 3
  runs of 60 evaluations and 8 of 110 runs of a test that evaluates twice; with the sum
  apart, 8 runs of 100 evaluations did not hang. `tests/experiments/test_training.py`
  guards that the eval step keeps no collective.
  """
  return jax.lax.psum(tree, AXIS)


def compile_ahead(pmapped, *args) -> tuple[Any, float]:
  """(compiled, seconds): `pmapped` compiled for the shapes of `args` (arrays or
  `jax.ShapeDtypeStruct`s), so compile time is measured apart from run time; with the
  backend's compiler options (`sdnet.backend.compiler_options`)."""
  start = time.perf_counter()
  compiled = pmapped.lower(*args).compile(compiler_options=backend.compiler_options())
  return compiled, time.perf_counter() - start

"""What a dropped block costs: nothing, and a block that cannot drop costs no machinery.

Guards that need no clock: the traced program of a constant-depth network holds no gate
and no conditional, and a host-callback count of the convolutions that really run shows
that a closed gate's block is not computed, forward or backward.
"""
import collections
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdnet import backend
from sdnet import gates as gates_lib
from sdnet import models
from tests import helpers

X = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))


def primitive_counts(jaxpr, counts=None):
  """How many equations of each primitive a jaxpr holds, nested jaxprs included."""
  counts = collections.Counter() if counts is None else counts
  for eqn in jaxpr.eqns:
    counts[eqn.primitive.name] += 1
    for sub in helpers.subjaxprs(eqn):
      primitive_counts(sub, counts)
  return counts


def train_gradient_jaxpr(model, **call):
  """The jaxpr of a training gradient of `model`, called with `call` (key=, gates=)."""
  v = jax.eval_shape(lambda: model.init(jax.random.key(0), X))

  def loss(params, stats, *args):
    logits, _ = model.apply({"params": params, "batch_stats": stats}, X, train=True,
                            mutable=["batch_stats"], **dict(zip(call, args)))
    return logits.sum()
  return jax.make_jaxpr(jax.grad(loss))(v["params"], v["batch_stats"],
                                        *call.values()).jaxpr


@pytest.mark.parametrize("skip", ["auto", "cond", "mask", "compact"])
def test_constant_depth_with_a_key_is_the_plain_network(skip):
  model = models.CifarResNet20(p_last=1.0, skip=skip)
  with_key = primitive_counts(train_gradient_jaxpr(model, key=jax.random.key(0)))
  without_key = primitive_counts(train_gradient_jaxpr(model))
  assert with_key == without_key
  assert with_key["cond"] == 0 and with_key["random_bits"] == 0


# ResNet-20's blocks: stage 1 = 1-3 (scanned), stage 2 = 4 (transition) + 5-6 (scanned),
# stage 3 = 7 + 8-9. p_l = 1 for a whole stage, a transition block, and one block inside
# a scanned stage.
MIXED = (1.0, 1.0, 1.0, 1.0, 0.6, 1.0, 0.7, 0.6, 0.5)
DROPPABLE = sum(p < 1 for p in MIXED)


def test_a_mixed_network_gates_only_its_droppable_blocks():
  key = jax.random.key(0)
  cond = train_gradient_jaxpr(
      models.CifarResNet20(survival=MIXED, skip="cond", scan_unroll=1), key=key)
  assert helpers.count_executed(cond, "cond") == 2 * DROPPABLE  # forward and backward

  def selects(survival):
    model = models.CifarResNet20(survival=survival, skip="mask", scan_unroll=1)
    return helpers.count_executed(train_gradient_jaxpr(model, key=key), "select_n")
  plain, every_block = selects((1.0,) * 9), selects((0.5,) * 9)
  per_block = (every_block - plain) / 9
  assert per_block > 0
  assert selects(MIXED) - plain == DROPPABLE * per_block


def gradient_step(model):
  """One jitted gradient of `model`: variables and the call's key= or gates= are
  arguments, so a test compiles it once and runs it for many gates."""
  @jax.jit
  def step(variables, **call):
    def loss(params):
      logits, state = model.apply(
          {"params": params, "batch_stats": variables["batch_stats"]}, X, train=True,
          mutable=["batch_stats"], **call)
      return jnp.sum(jnp.sin(logits)), (logits, state["batch_stats"])
    return jax.grad(loss, has_aux=True)(variables["params"])
  return step


@pytest.mark.parametrize("skip", ["cond", "compact", "mask"])
def test_a_mixed_network_computes_what_its_drawn_gates_say(skip):
  """Static p_l = 1 blocks and gated ones, split into runs inside a stage, give the
  results of the same gates passed explicitly to the masking reference."""
  variables = models.CifarResNet20().init(jax.random.key(0), X)
  drawing = gradient_step(models.CifarResNet20(survival=MIXED, skip=skip))
  reference = gradient_step(models.CifarResNet20(survival=MIXED, skip="mask"))
  for seed in range(3):
    key = jax.random.key(seed)
    drawn = gates_lib.draw(key, np.asarray(MIXED))
    helpers.assert_trees_close(drawing(variables, key=key),
                               reference(variables, gates=drawn), rtol=2e-5, atol=2e-5)


def counting_conv():
  """A convolution module that counts, with host callbacks, how often its forward and
  its backward computation really run (inside a closed cond branch they do not)."""
  counts = collections.Counter()
  base = backend.conv_general_dilated()

  def count(name, operand):
    # The operand ties each callback to its convolution: XLA must not merge two of them.
    jax.debug.callback(lambda _: counts.update([name]), operand.ravel()[0])

  def conv_general_dilated(lhs, rhs, *args, **kwargs):
    f = lambda lhs, rhs: base(lhs, rhs, *args, **kwargs)

    @jax.custom_vjp
    def counted(lhs, rhs):
      count("forward", lhs)
      return f(lhs, rhs)

    def forward(lhs, rhs):
      count("forward", lhs)
      return f(lhs, rhs), (lhs, rhs)

    def backward(residuals, dy):
      count("backward", dy)
      return jax.vjp(f, *residuals)[1](dy)
    counted.defvjp(forward, backward)
    return counted(lhs, rhs)

  return functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated), counts


def convolutions_run(skip, patterns):
  """Forward and backward convolutions one train step of ResNet-20 runs, for each
  pattern of gates ("1" open, "0" closed): one compiled step, the gates its argument."""
  conv, counts = counting_conv()
  step = gradient_step(models.CifarResNet20(skip=skip, conv=conv))
  # The same variables as the counting model's (callbacks cannot run in nn.scan's init).
  variables = models.CifarResNet20(skip=skip).init(jax.random.key(0), X)
  runs = []
  for pattern in patterns:
    counts.clear()
    jax.block_until_ready(step(variables, gates=jnp.asarray([c == "1" for c in pattern])))
    jax.effects_barrier()
    runs.append((counts["forward"], counts["backward"]))
  return runs


@pytest.mark.parametrize("skip", ["auto", "cond", "compact"])
def test_a_closed_gate_computes_nothing_forward_or_backward(skip):
  patterns = ["111111111", "101001101", "000100000", "000000000"]
  # The stem, and per surviving block its two convolutions backward and forward: twice
  # forward where the branch is rematerialised in the backward pass (the callbacks run
  # again; XLA drops the recomputed convolutions themselves, whose outputs are saved).
  # Compaction runs the stage's other blocks without a cond: only the transition blocks
  # 4 and 7 sit in one there.
  in_cond = range(9) if skip != "compact" else (3, 6)
  policy = {kind: backend.branch_policy("any", gated=kind) is not None
            for kind in (True, False)}
  rematerialised = lambda p: sum(p[i] == "1" and policy[i in in_cond] for i in range(9))
  expected = [(1 + 2 * p.count("1") + 2 * rematerialised(p), 1 + 2 * p.count("1"))
              for p in patterns]
  assert convolutions_run(skip, patterns) == expected, skip


def test_the_guard_catches_a_method_that_computes_dropped_blocks():
  assert convolutions_run("mask", ["000000000"]) == [(19, 19)]

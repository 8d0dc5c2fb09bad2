import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdnet import compaction
from sdnet import models
from tests import helpers


def random_gates(n, seed):
  rng = np.random.default_rng(seed)
  return rng.random(n) < rng.uniform(0.0, 1.0)


@pytest.mark.parametrize("n", [1, 2, 5, 18, 200])
def test_slots_hold_the_survivors_in_order_in_the_segments_of_k_in_binary(n):
  lengths = compaction.segment_lengths(n)
  assert sum(lengths) == n and len(lengths) == n.bit_length()
  for k in range(n + 1):  # every survivor count is a sum of open segments
    is_open = np.array(compaction.open_segments(jnp.int32(k), n))
    assert int(np.dot(is_open, lengths)) == k, k
  for seed in range(40):
    gates = random_gates(n, seed)
    if seed == 0:
      gates[:] = True
    if seed == 1:
      gates[:] = False
    slots = np.asarray(compaction.slot_blocks(jnp.asarray(gates)))
    k = int(gates.sum())
    assert slots.shape == (sum(lengths),)
    np.testing.assert_array_equal(slots[slots < n], np.flatnonzero(gates))
    start = 0
    for length, is_open in zip(lengths, compaction.open_segments(jnp.int32(k), n)):
      segment = slots[start:start + length]
      assert np.all(segment < n) if is_open else np.all(segment == n), (k, length)
      start += length


def counting_block():
  """A block h -> 10 h + id that also counts its runs (a host callback) and bumps a
  statistic, so the output spells which blocks ran, in which order."""
  runs = []

  def apply_block(variables, h, prob):
    jax.debug.callback(lambda i: runs.append(int(i)), variables["params"]["id"])
    h = 10 * h + variables["params"]["id"] + 1 + 0 * prob
    return h, {"count": variables["batch_stats"]["count"] + 1}
  return apply_block, runs


@pytest.mark.parametrize("pattern", ["111111", "101101", "000000", "010000", "110111"])
def test_run_stage_computes_exactly_the_surviving_blocks_in_order(pattern):
  gates = jnp.array([c == "1" for c in pattern])
  n = len(pattern)
  variables = {"params": {"id": jnp.arange(n, dtype=jnp.float32)},
               "batch_stats": {"count": jnp.zeros(n)}}
  apply_block, runs = counting_block()
  out, stats = jax.jit(lambda v, g: compaction.run_stage(
      apply_block, v, jnp.float32(0), g, jnp.full(n, 0.5)))(variables, gates)
  jax.effects_barrier()
  survivors = [i for i, c in enumerate(pattern) if c == "1"]
  assert sorted(runs) == survivors  # dropped blocks were never computed
  expected = 0
  for i in survivors:
    expected = 10 * expected + i + 1
  assert float(out) == expected
  np.testing.assert_array_equal(stats["count"], gates.astype(np.float32))


def test_gradient_reaches_survivors_only():
  n = 7
  gates = jnp.array([1, 0, 1, 1, 0, 0, 1], bool)
  def apply_block(variables, h, prob):
    return jnp.tanh(h * variables["params"]["w"] + prob), {}
  def loss(w):
    y, _ = compaction.run_stage(apply_block, {"params": {"w": w}}, jnp.ones(3), gates,
                                jnp.linspace(1.0, 0.5, n))
    return jnp.sum(y)
  w = jnp.linspace(0.5, 1.5, n)
  def reference(w):
    h = jnp.ones(3)
    for l in range(n):
      if gates[l]:
        h = jnp.tanh(h * w[l] + jnp.linspace(1.0, 0.5, n)[l])
    return jnp.sum(h)
  np.testing.assert_allclose(jax.grad(loss)(w), jax.grad(reference)(w), rtol=1e-5)
  assert np.all(np.asarray(jax.grad(loss)(w))[~np.asarray(gates)] == 0)


def conditionals_run_per_step(model):
  """Conditionals one train step (forward and backward) runs, stage scans counted per
  iteration."""
  loss, args = helpers.abstract_train_loss(model)
  jaxpr = jax.make_jaxpr(jax.value_and_grad(loss))(*args)
  return helpers.count_executed(jaxpr.jaxpr, "cond")


def test_resnet110_runs_a_few_conditionals_per_stage_instead_of_one_per_block():
  # Stage 1: 18 scanned blocks -> segments 16, 8, 4, 2, 1. Stages 2-3: the transition
  # block's own cond + 17 scanned blocks -> 5 segments. Forward and backward each.
  compact = conditionals_run_per_step(models.CifarResNet110(skip="compact"))
  per_block = conditionals_run_per_step(models.CifarResNet110(skip="cond"))
  assert compact == 2 * (5 + 6 + 6)
  assert per_block == 2 * 54


def test_auto_picks_per_backend(monkeypatch):
  from sdnet import backend, residual
  for platform, stage, block in [("cpu", "cond", "cond"), ("gpu", "compact", "cond"),
                                 ("tpu", "cond", "cond")]:
    monkeypatch.setattr(jax, "default_backend", lambda: platform)
    assert models.CifarResNet20().stage_skip() == stage
    assert residual.resolve_skip("auto") == block
    # Per example: the CPU masks Bernoulli rows (measured); a fixed subset, and on
    # accelerators Bernoulli rows too, gather the kept rows above a drop rate of 0.1; a
    # ResNet masks everywhere (BatchNorm in its branches).
    assert residual.resolve_skip("auto", "row") == ("mask" if platform == "cpu" else "gather")
    assert residual.resolve_skip("auto", "subset", drop_rate=0.3) == "gather"
    assert residual.resolve_skip("auto", "subset", drop_rate=0.05) == "mask"
    assert residual.resolve_skip("auto", "row", drop_rate=0.05) == "mask"
    assert models.CifarResNet20(mode="row").stage_skip() == "mask"
    assert backend.auto_skip("batch", stage=True) == stage

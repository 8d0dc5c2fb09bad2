import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdnet import StochasticResidual
from tests import helpers


class DenseBN(nn.Module):
  """A small branch with BatchNorm, so statistics matter."""
  train: bool

  @nn.compact
  def __call__(self, x):
    return nn.BatchNorm(use_running_average=not self.train)(nn.Dense(x.shape[-1])(x))


class Net(nn.Module):
  """A user model that builds the residual inside its own compact method."""
  train: bool
  skip: str = "cond"
  scaling: str = "paper"
  mode: str = "batch"

  @nn.compact
  def __call__(self, x, p, gate=None, key=None):
    block = StochasticResidual(DenseBN(self.train), activation=nn.relu, skip=self.skip,
                               scaling=self.scaling, mode=self.mode)
    return block(x, train=self.train, survival_prob=p, gate=gate, key=key)


X = jax.random.normal(jax.random.key(1), (8, 5))


def init(train=False):
  return Net(train).init(jax.random.key(0), X, 1.0)


def branch_output(variables, train):
  return DenseBN(train).apply(
      {"params": variables["params"]["DenseBN_0"],
       "batch_stats": variables["batch_stats"]["DenseBN_0"]}, X,
      mutable=["batch_stats"] if train else False)


@pytest.mark.parametrize("scaling,s_train,s_eval", [
    ("paper", 1.0, 0.7), ("inverted", 1 / 0.7, 1.0), ("none", 1.0, 1.0)])
def test_scaling_rules(scaling, s_train, s_eval):
  v = init()
  f_eval = branch_output(v, False)
  got = Net(False, scaling=scaling).apply(v, X, 0.7)
  np.testing.assert_allclose(got, jax.nn.relu(X + s_eval * f_eval), rtol=1e-6)
  f_train, _ = branch_output(v, True)
  got, _ = Net(True, scaling=scaling).apply(v, X, 0.7, gate=True,
                                            mutable=["batch_stats"])
  np.testing.assert_allclose(got, jax.nn.relu(X + s_train * f_train), rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize("skip", ["cond", "mask"])
def test_closed_gate_gives_shortcut_zero_gradient_and_old_statistics(skip):
  v = init()

  def loss(params, gate):
    out, state = Net(True, skip=skip).apply(
        {"params": params, "batch_stats": v["batch_stats"]}, X, 0.5, gate=gate,
        mutable=["batch_stats"])
    return jnp.sum(out ** 2), state

  (value, state), grads = jax.value_and_grad(loss, has_aux=True)(v["params"],
                                                                  jnp.array(False))
  np.testing.assert_array_equal(value, jnp.sum(jax.nn.relu(X) ** 2))
  assert all(np.all(g == 0) for g in jax.tree.leaves(grads))
  helpers.assert_trees_close(state["batch_stats"], v["batch_stats"], rtol=0, atol=0)
  # An open gate does change them.
  (_, state), grads = jax.value_and_grad(loss, has_aux=True)(v["params"], jnp.array(True))
  assert any(np.any(g != 0) for g in jax.tree.leaves(grads))
  assert not np.allclose(state["batch_stats"]["DenseBN_0"]["BatchNorm_0"]["mean"], 0)


def test_cond_and_mask_agree_on_outputs_gradients_and_statistics():
  v = init()

  def run(skip, gate):
    def loss(params):
      out, state = Net(True, skip=skip).apply(
          {"params": params, "batch_stats": v["batch_stats"]}, X, 0.6, gate=gate,
          mutable=["batch_stats"])
      return jnp.sum(jnp.sin(out)), (out, state)
    return jax.grad(loss, has_aux=True)(v["params"])

  for gate in (jnp.array(True), jnp.array(False)):
    helpers.assert_trees_close(run("cond", gate), run("mask", gate))


@pytest.mark.parametrize("skip", ["cond", "mask"])
def test_a_python_bool_gate_is_static_and_builds_no_conditional(skip):
  v = init()
  def run(gate):
    return Net(True, skip=skip).apply(v, X, 0.5, gate=gate, mutable=["batch_stats"])
  for gate in (True, False):
    jaxpr = jax.make_jaxpr(lambda: run(gate))()
    assert helpers.count_primitives(jaxpr.jaxpr, "cond") == 0
    assert helpers.count_primitives(jaxpr.jaxpr, "select_n") == 0
    helpers.assert_trees_close(run(gate), run(jnp.array(gate)))


def test_key_draws_the_gate_with_probability_p():
  v = init()
  apply = jax.jit(lambda k: Net(True, skip="mask").apply(
      v, X, 0.3, key=k, mutable=["batch_stats"])[0])
  shortcut_only = jax.nn.relu(X)
  kept = [not np.allclose(apply(k), shortcut_only)
          for k in jax.random.split(jax.random.key(3), 400)]
  assert abs(np.mean(kept) - 0.3) < 5 * np.sqrt(0.3 * 0.7 / 400)


def test_row_mode_drops_examples_independently():
  v = init()
  gate = jnp.array([True, False] * 4)
  out, _ = Net(True, skip="auto", mode="row").apply(v, X, 0.5, gate=gate,
                                                    mutable=["batch_stats"])
  f, _ = branch_output(v, True)
  expected = jnp.where(gate[:, None], jax.nn.relu(X + f), jax.nn.relu(X))
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_mask_works_under_vmap_over_gates():
  v = init()
  outs = jax.vmap(lambda g: Net(True, skip="mask").apply(
      v, X, 0.5, gate=g, mutable=["batch_stats"])[0])(jnp.array([True, False]))
  np.testing.assert_allclose(outs[1], jax.nn.relu(X))
  assert not np.allclose(outs[0], outs[1])


def test_bad_options_and_missing_gate_fail_clearly():
  with pytest.raises(ValueError, match="cannot skip it whole. Use skip='gather'"):
    StochasticResidual(DenseBN(True), skip="cond", mode="row")
  with pytest.raises(ValueError, match="unknown scaling rule"):
    StochasticResidual(DenseBN(True), scaling="halve")
  with pytest.raises(ValueError, match="unknown skip implementation"):
    StochasticResidual(DenseBN(True), skip="select")
  # Compaction is a method of a whole stage (sdnet.models.ResNet), not of one block.
  with pytest.raises(ValueError, match=r"unknown skip implementation 'compact'; choose one "
                     r"of \('auto', 'cond', 'mask', 'gather'\)"):
    StochasticResidual(DenseBN(True), skip="compact")
  with pytest.raises(ValueError, match="needs gate= or key="):
    Net(True).apply(init(), X, 0.5, mutable=["batch_stats"])


def test_evaluation_refuses_a_key():
  # With a key, evaluation would drop the block at random and also scale it by p_l.
  v = init()
  with pytest.raises(ValueError, match="at evaluation the block runs with its branch"):
    Net(False).apply(v, X, 0.5, key=jax.random.key(3))

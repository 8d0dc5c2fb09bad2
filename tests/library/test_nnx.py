"""sdnet.nnx.StochasticResidual: the Linen residual's math in NNX, carried parameters and
statistics giving the same outputs, gradients and new statistics."""
from flax import linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdnet import nnx as sdnnx
from sdnet import residual
from tests import helpers

ROWS = jax.random.normal(jax.random.key(2), (8, 6))


class LinenBranch(nn.Module):
  """Dense - norm - ReLU: BatchNorm (batch statistics) or LayerNorm."""
  batch_norm: bool
  train: bool = True

  @nn.compact
  def __call__(self, x):
    y = nn.Dense(6)(x)
    y = (nn.BatchNorm(use_running_average=not self.train)(y) if self.batch_norm
         else nn.LayerNorm()(y))
    return nn.relu(y)


class NnxBranch(nnx.Module):
  """LinenBranch's twin."""

  def __init__(self, batch_norm: bool, rngs: nnx.Rngs):
    self.linear = nnx.Linear(6, 6, rngs=rngs)
    self.norm = nnx.BatchNorm(6, rngs=rngs) if batch_norm else nnx.LayerNorm(6, rngs=rngs)

  def __call__(self, x):
    return nnx.relu(self.norm(self.linear(x)))


def twins(batch_norm, **kwargs):
  """A Linen residual with its variables, and the NNX residual holding the same ones."""
  linen = residual.StochasticResidual(LinenBranch(batch_norm), **kwargs)
  variables = jax.jit(lambda x: linen.init(jax.random.key(0), x, train=False))(ROWS)
  model = sdnnx.StochasticResidual(NnxBranch(batch_norm, nnx.Rngs(1)), **kwargs)
  norm = "BatchNorm_0" if batch_norm else "LayerNorm_0"
  carried = {"branch": {"linear": variables["params"]["branch"]["Dense_0"],
                        "norm": dict(variables["params"]["branch"][norm])}}
  if batch_norm:
    carried["branch"]["norm"].update(variables["batch_stats"]["branch"][norm])
  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, carried)
  nnx.update(model, state)
  return linen, variables, model


def linen_grads_as_nnx(grads, batch_norm):
  norm = "BatchNorm_0" if batch_norm else "LayerNorm_0"
  return {"branch": {"linear": grads["branch"]["Dense_0"], "norm": grads["branch"][norm]}}


@pytest.mark.parametrize("mode,skip,batch_norm", [
    ("batch", "cond", True), ("batch", "mask", True), ("row", "mask", True),
    ("row", "gather", False), ("subset", "gather", False), ("subset", "mask", False)])
def test_the_nnx_residual_equals_the_linen_one(mode, skip, batch_norm):
  # The row modes in four groups of 2 rows (as on four devices): 2 capacities, not 8.
  kwargs = dict(mode=mode, skip=skip, scaling="inverted",
                row_groups=1 if mode == "batch" else 4)
  linen, variables, model = twins(batch_norm, **kwargs)
  weights = jax.random.normal(jax.random.key(3), ROWS.shape)

  @jax.jit
  def linen_step(params, stats, key):
    def loss(params):
      y, new = linen.apply({"params": params, "batch_stats": stats}, ROWS, train=True,
                           survival_prob=0.5, key=key, mutable=["batch_stats"])
      return jnp.sum(y * weights), new.get("batch_stats", {})
    return jax.value_and_grad(loss, has_aux=True)(params)

  @nnx.jit
  def nnx_step(model, key):
    def loss(model):
      return jnp.sum(model(ROWS, key=key, survival_prob=0.5) * weights)
    return nnx.value_and_grad(loss)(model)

  for seed in range(3):  # batch mode: some keys drop the block, some keep it
    key = jax.random.key(seed)
    (want, want_stats), want_grads = linen_step(variables["params"],
                                                variables.get("batch_stats", {}), key)
    stats_before = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    got, got_grads = nnx_step(model, key)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    helpers.assert_trees_close(nnx.to_pure_dict(got_grads),
                               linen_grads_as_nnx(want_grads, batch_norm))
    if batch_norm:
      norm = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))["branch"]["norm"]
      helpers.assert_trees_close(norm, want_stats["branch"]["BatchNorm_0"])
      variables = {**variables, "batch_stats": want_stats}
    else:
      assert stats_before == {}


def test_nnx_evaluation_scales_by_p_and_eval_train_switch_it():
  _, variables, model = twins(True, scaling="paper")
  want = residual.StochasticResidual(LinenBranch(True, train=False)).apply(
      variables, ROWS, train=False, survival_prob=0.25)
  model.eval()
  assert model.deterministic and model.branch.norm.use_running_average
  np.testing.assert_allclose(model(ROWS, survival_prob=0.25), want, rtol=1e-5, atol=1e-6)
  model.survival_prob = 0.25  # the module's own p_l, as a call's
  np.testing.assert_allclose(model(ROWS), want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="key= draws a training gate"):
    model(ROWS, key=jax.random.key(0))
  model.train()
  assert not model.deterministic and not model.branch.norm.use_running_average
  with pytest.raises(ValueError, match="needs gate= or key="):
    model(ROWS)  # p_l < 1, no key, no gate, no rngs


def test_an_nnx_rngs_stream_draws_new_gates_each_call_and_a_key_overrides_it():
  model = sdnnx.StochasticResidual(nnx.Linear(6, 6, rngs=nnx.Rngs(0)), survival_prob=0.5,
                                   mode="row", skip="gather", scaling="inverted",
                                   rngs=nnx.Rngs(gates=5))
  step = nnx.jit(lambda m, x: m(x))
  outputs = [step(model, ROWS) for _ in range(3)]
  dropped = [np.all(o == ROWS, axis=-1) for o in outputs]  # shortcut alone
  assert len({d.tobytes() for d in dropped}) > 1  # the stream moved on between calls
  key = jax.random.key(9)
  np.testing.assert_array_equal(model(ROWS, key=key), model(ROWS, key=key))


def test_nnx_gather_refuses_a_branch_with_batch_statistics_in_training():
  model = sdnnx.StochasticResidual(NnxBranch(True, nnx.Rngs(0)), survival_prob=0.5,
                                   mode="row", skip="gather")
  with pytest.raises(ValueError, match="use skip='mask'"):
    model(ROWS, key=jax.random.key(0))
  model.eval()
  assert model(ROWS).shape == ROWS.shape

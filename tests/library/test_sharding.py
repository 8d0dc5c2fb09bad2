"""The library under jax.jit with a sharded batch and under shard_map (4 host CPU devices).

Researchers mostly train with `jax.jit` over a `NamedSharding`-sharded batch (big_vision,
flax's gemma) or with `shard_map`, not `pmap`: one training step of a CifarResNet with
stochastic depth, gates drawn from a key every device holds, must equal the same step on
one device over the whole batch (BatchNorm over the global batch, the same gates).
"""
import functools

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sdnet import models
from tests import helpers

try:
  from jax import shard_map  # pylint: disable=g-import-not-at-top
except ImportError:  # older jax
  from jax.experimental.shard_map import shard_map  # pylint: disable=g-import-not-at-top

X = jax.random.normal(jax.random.key(1), (16, 16, 16, 3))
KEY = jax.random.key(5)


@functools.cache
def one_device(skip):
  model = models.CifarResNet20(skip=skip, p_last=0.5)
  variables = model.init(jax.random.key(0), X)
  return variables, jax.jit(functools.partial(helpers.gradient_step, model))(variables, X, KEY)


def assert_same_step(got, want):
  logits, grads, stats = got
  np.testing.assert_allclose(logits, want[0], rtol=1e-4, atol=1e-5)
  helpers.assert_trees_close(grads, want[1], rtol=1e-4, atol=1e-6)
  helpers.assert_trees_close(stats, want[2], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("skip", ["cond", "compact"])
def test_jit_over_a_sharded_batch_equals_one_device(skip):
  variables, want = one_device(skip)
  mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
  x = jax.device_put(X, NamedSharding(mesh, P("data")))
  replicated = NamedSharding(mesh, P())
  variables, key = jax.device_put((variables, KEY), replicated)
  model = models.CifarResNet20(skip=skip, p_last=0.5)  # no axis_name: XLA's SPMD does it
  got = jax.jit(functools.partial(helpers.gradient_step, model))(variables, x, key)
  assert got[0].sharding.spec == P("data")  # the batch stayed sharded
  assert_same_step(got, want)
  assert helpers.count_primitives(
      jax.make_jaxpr(functools.partial(helpers.gradient_step, model))(variables, x, key).jaxpr, "cond") > 0


@pytest.mark.parametrize("skip", ["cond", "compact"])
def test_shard_map_with_cross_device_batchnorm_equals_one_device(skip):
  variables, want = one_device(skip)
  mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
  model = models.CifarResNet20(skip=skip, p_last=0.5, axis_name="data")
  # Each device's loss is its quarter of the batch's mean; shard_map sums the gradients
  # of the replicated parameters over the devices (JAX's transpose of pvary).
  per_device = functools.partial(helpers.gradient_step, model, scale=1 / 4)
  sharded = jax.jit(shard_map(per_device, mesh=mesh, in_specs=(P(), P("data"), P()),
                              out_specs=(P("data"), P(), P())))
  assert_same_step(sharded(variables, X, KEY), want)

"""Real multi-device pmap (4 host CPU devices, see conftest), not chex.fake_pmap."""
import functools

import jax
import numpy as np
import pytest

from sdnet import models
from tests import helpers


@pytest.mark.parametrize("skip", ["cond", "compact"])
def test_pmap_with_cross_replica_batchnorm_and_a_replicated_gate_key(skip):
  assert jax.local_device_count() == 4
  x = jax.random.normal(jax.random.key(1), (16, 16, 16, 3))
  single = models.CifarResNet20(skip=skip, p_last=0.5)
  parallel = models.CifarResNet20(skip=skip, p_last=0.5, axis_name="batch")
  v = single.init(jax.random.key(0), x)
  key = jax.random.key(5)

  pmapped = jax.pmap(
      functools.partial(helpers.gradient_step, parallel,
                        mean=lambda g: jax.lax.pmean(g, "batch")),
      axis_name="batch", in_axes=(None, 0, None))
  logits, grads, stats = pmapped(v, x.reshape(4, 4, 16, 16, 3), key)
  ref_logits, ref_grads, ref_stats = jax.jit(
      functools.partial(helpers.gradient_step, single))(v, x, key)

  # Same key on every device => same gates => identical to one device on the full batch.
  np.testing.assert_allclose(logits.reshape(16, 10), ref_logits, rtol=1e-4, atol=1e-5)
  helpers.assert_trees_close(jax.tree.map(lambda a: a[0], grads), ref_grads, rtol=1e-4,
                             atol=1e-6)
  for d in range(4):
    helpers.assert_trees_close(jax.tree.map(lambda a: a[d], stats), ref_stats, rtol=1e-4,
                               atol=1e-6)
  # The pmapped program really branches (a cond, not a select).
  jaxpr = jax.make_jaxpr(pmapped, axis_env=None)(v, x.reshape(4, 4, 16, 16, 3), key)
  assert helpers.count_primitives(jaxpr.jaxpr, "cond") > 0

"""sdnet.nnx's ResNets: the Linen ResNets' twins, carried parameters giving the same
logits, gradients and new statistics."""
from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from sdnet import models
from sdnet import nnx as sdnnx
from tests import helpers

def twins(make_linen, make_nnx, x):
  linen = make_linen()
  variables = jax.jit(lambda x: linen.init(jax.random.key(0), x, train=False))(x)
  return linen, variables, sdnnx.load_linen(make_nnx(nnx.Rngs(1)), variables)


def linen_step(linen, x):
  @jax.jit
  def step(variables, key):
    def loss(params):
      logits, new = linen.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                x, train=True, key=key, mutable=["batch_stats"])
      return jnp.mean(jax.nn.log_softmax(logits)[:, 0]), (logits, new["batch_stats"])
    return jax.value_and_grad(loss, has_aux=True)(variables["params"])
  return step


@nnx.jit
def nnx_step(model, x, key):
  def loss(model):
    logits = model(x, key=key)
    return jnp.mean(jax.nn.log_softmax(logits)[:, 0]), logits
  return nnx.value_and_grad(loss, has_aux=True)(model)


@pytest.mark.parametrize("depth,skip,mode,image,sharded", [
    ("cifar8", "cond", "batch", 8, False), ("cifar20", "mask", "batch", 8, False),
    ("cifar20", "mask", "row", 8, True),
    # The ImageNet depth compiles for ~30 s on 2 cores: an end-to-end test.
    pytest.param("imagenet14", "cond", "batch", 32, False, marks=pytest.mark.e2e)])
def test_an_nnx_resnet_equals_its_linen_twin(depth, skip, mode, image, sharded):
  kw = dict(skip=skip, mode=mode, num_classes=10)
  x = jax.random.normal(jax.random.key(1), (4, image, image, 3))
  if sharded:  # the batch over 4 devices under jit: BatchNorm's statistics stay global
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    x = jax.device_put(x, NamedSharding(mesh, P("data")))
  if depth.startswith("cifar"):
    n = int(depth[5:])
    make_linen = lambda: models.CifarResNet(n, **kw)
    make_nnx = lambda rngs: sdnnx.CifarResNet(n, rngs=rngs, **kw)
  else:
    make_linen = lambda: models.ImageNetResNet(14, **kw)
    make_nnx = lambda rngs: sdnnx.ImageNetResNet(14, rngs=rngs, **kw)
  linen, variables, model = twins(make_linen, make_nnx, x)
  assert models.count_params(nnx.to_pure_dict(nnx.state(model, nnx.Param))) == \
      models.count_params(variables["params"])
  step = linen_step(linen, x)
  for seed in range(2):
    key = jax.random.key(seed)
    (want_loss, (want_logits, want_stats)), want_grads = step(variables, key)
    (loss, logits), grads = nnx_step(model, x, key)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
    helpers.assert_trees_close(logits, want_logits, rtol=1e-4, atol=1e-5)
    helpers.assert_trees_close(nnx.to_pure_dict(grads),
                               sdnnx.from_linen({"params": want_grads}), rtol=1e-4, atol=1e-5)
    helpers.assert_trees_close(nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)),
                               sdnnx.from_linen({"batch_stats": want_stats}),
                               rtol=1e-5, atol=1e-6)
    variables = {**variables, "batch_stats": want_stats}
  model.eval()
  helpers.assert_trees_close(model(x), linen.apply(variables, x), rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="at evaluation every block runs"):
    model(x, key=jax.random.key(0))


def test_nnx_resnets_refuse_compaction_and_gather_in_one_line():
  with pytest.raises(ValueError, match="skip='compact' .* is the Linen ResNet's"):
    sdnnx.CifarResNet8(skip="compact", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="use skip='mask'"):
    sdnnx.CifarResNet8(skip="gather", mode="row", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="depth must be 6n"):
    sdnnx.CifarResNet(21, rngs=nnx.Rngs(0))

"""Flax NNX models use sdnet's Linen ResNets through flax's bridge, gate key explicit."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.nnx import bridge

from sdnet import models
from tests import helpers

X = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
LABELS = jnp.arange(4) % 10


class Classifier(nnx.Module):
  """The README's NNX wrapper."""

  def __init__(self, x, rngs):
    self.resnet = bridge.ToNNX(models.CifarResNet8(p_last=0.5), rngs=rngs)
    bridge.lazy_init(self.resnet, x, train=False)

  def __call__(self, x, *, train, key=None):
    return self.resnet(x, train=train, key=key, mutable=["batch_stats"] if train else False)


def linen_variables(model):
  return bridge.variables.nnx_attrs_to_linen_vars(
      {k: v for k, v in vars(model.resnet).items()
       if not k.startswith("to_nnx__") and not k.startswith("_pytree__")})


def test_an_nnx_train_step_draws_its_gates_from_the_explicit_key():
  model = Classifier(X, nnx.Rngs(0))
  before = jax.tree.map(np.asarray, linen_variables(model))
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, key):
    def loss_fn(model):
      logits = model(X, train=True, key=key)
      return optax.softmax_cross_entropy_with_integer_labels(logits, LABELS).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss, grads

  key = jax.random.key(7)
  loss, grads = train_step(model, optimizer, key)

  # The same step in Linen with the same key: same loss, gradients and new statistics.
  linen = models.CifarResNet8(p_last=0.5)
  def linen_loss(params):
    logits, state = linen.apply({"params": params, "batch_stats": before["batch_stats"]}, X,
                                train=True, key=key, mutable=["batch_stats"])
    return (optax.softmax_cross_entropy_with_integer_labels(logits, LABELS).mean(),
            state["batch_stats"])
  (ref_loss, ref_stats), ref_grads = jax.value_and_grad(linen_loss, has_aux=True)(
      before["params"])
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  helpers.assert_trees_close(linen_variables(model)["batch_stats"], ref_stats)
  for path in (("head", "kernel"), ("stem_conv", "kernel"), ("stage3_first", "branch",
                                                             "Conv_1", "kernel")):
    got, want = grads["resnet"], ref_grads
    for name in path:
      got, want = got[name], want[name]
    np.testing.assert_allclose(got[...], want, rtol=1e-4, atol=1e-6)
  # The optimiser moved the parameters by -0.1 * gradient.
  after = linen_variables(model)["params"]
  np.testing.assert_allclose(after["head"]["kernel"], before["params"]["head"]["kernel"]
                             - 0.1 * ref_grads["head"]["kernel"], rtol=1e-5, atol=1e-6)

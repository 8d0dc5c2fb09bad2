"""Shared test helpers: walking jaxprs, comparing trees, abstract train steps."""
import chex
import jax
import jax.numpy as jnp
from jax.extend import core as jax_core


def subjaxprs(eqn):
  """The jaxprs nested in an equation's parameters (scan/cond/pjit/remat bodies)."""
  for value in eqn.params.values():
    for item in value if isinstance(value, (list, tuple)) else (value,):
      if isinstance(item, jax_core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax_core.Jaxpr):
        yield item


def count_primitives(jaxpr, name, inside_cond=None, _in_cond=False):
  """Counts `name` equations; inside_cond=True/False counts only those inside/outside
  a `cond`."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == name and (inside_cond is None or inside_cond == _in_cond):
      total += 1
    for sub in subjaxprs(eqn):
      total += count_primitives(sub, name, inside_cond,
                                _in_cond or eqn.primitive.name == "cond")
  return total


def assert_trees_close(a, b, rtol=1e-5, atol=1e-5):
  chex.assert_trees_all_close(a, b, rtol=rtol, atol=atol)


def count_executed(jaxpr, name):
  """How often `name` runs when the program runs: equations inside a scan count once per
  iteration, inside a cond once per run of its costliest branch."""
  total = 0
  for eqn in jaxpr.eqns:
    total += eqn.primitive.name == name
    inner = [count_executed(sub, name) for sub in subjaxprs(eqn)]
    if not inner:
      continue
    if eqn.primitive.name == "scan":
      total += eqn.params["length"] * sum(inner)
    elif eqn.primitive.name == "cond":
      total += max(inner)
    else:
      total += sum(inner)
  return total


def abstract_train_loss(model, image_size=32, batch=2):
  """(loss, args): a training loss of `model` as loss(params, stats, key) and abstract
  arguments for it, to trace or lower without initialising anything."""
  x = jnp.zeros((batch, image_size, image_size, 3))
  v = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  def loss(params, stats, key):
    logits, _ = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                            key=key, mutable=["batch_stats"])
    return logits.sum()
  return loss, (v["params"], v["batch_stats"], jax.random.key(0))


def gradient_step(model, variables, x, key, mean=lambda grads: grads, scale=1.0):
  """(logits, gradients of scale * mean(logits^2), new BatchNorm statistics) of one
  training call of `model` with gates from `key`; `mean` averages the gradients over
  devices."""
  def loss(params):
    logits, state = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                x, train=True, key=key, mutable=["batch_stats"])
    return scale * jnp.mean(logits ** 2), (logits, state["batch_stats"])
  grads, (logits, stats) = jax.grad(loss, has_aux=True)(variables["params"])
  return logits, mean(grads), stats

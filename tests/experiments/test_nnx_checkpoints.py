"""NNX models and orbax: an NNX ResNet's state saves and restores, and a Linen checkpoint
of the experiments loads into its NNX twin (`sdnet.nnx.load_linen`)."""
import pathlib

from flax import nnx
import jax
import numpy as np
import orbax.checkpoint as ocp

from sdnet import models
from sdnet import nnx as sdnnx
from tests import helpers

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "v1"
X = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))


def test_a_linen_checkpoint_of_the_experiments_loads_into_the_nnx_twin():
  # quick.py:tiny trained 2 steps (tests/fixtures/v1): a CIFAR ResNet-8, p_L = 0.5.
  state = ocp.StandardCheckpointer().restore(
      FIXTURES / "resumable" / "checkpoints" / "2" / "state")
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  model = sdnnx.load_linen(sdnnx.CifarResNet8(p_last=0.5, rngs=nnx.Rngs(0)), variables)
  model.eval()
  helpers.assert_trees_close(model(X), models.CifarResNet8(p_last=0.5).apply(variables, X),
                             rtol=1e-4, atol=1e-5)


def test_an_nnx_resnets_state_saves_and_restores_with_orbax(tmp_path):
  model = sdnnx.CifarResNet8(rngs=nnx.Rngs(0))
  model(X, key=jax.random.key(0))  # training: BatchNorm statistics move off their init
  model.eval()
  expected = model(X)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "state", nnx.state(model))
  checkpointer.wait_until_finished()

  graphdef, abstract = nnx.split(nnx.eval_shape(
      lambda: sdnnx.CifarResNet8(rngs=nnx.Rngs(1))))
  restored = nnx.merge(graphdef, checkpointer.restore(tmp_path / "state", abstract))
  restored.eval()
  np.testing.assert_array_equal(restored(X), expected)

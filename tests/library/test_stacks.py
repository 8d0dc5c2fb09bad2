"""sdnet.stacks: same-shape stochastic blocks on stacked parameters, one scan per run."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdnet import backend, convnext, gates as gates_lib, stacks, survival, vit
from tests import helpers

X = jax.random.normal(jax.random.key(1), (8, 16, 16, 3))


def test_the_first_block_runs_plain_and_auto_splits_at_the_gather_rate(monkeypatch):
  monkeypatch.setattr(backend, "platform", lambda: "gpu")
  probs = survival.drop_path_linear(12, 0.5)  # drop rates 0, 0.045, 0.09, 0.136, ...
  kinds = stacks.block_kinds(probs, probs < 1, train=True, skip="auto", mode="row",
                             rows_per_group=64)
  assert not kinds[0].gated and not kinds[0].scaled
  assert [k.skip for k in kinds[1:]] == ["mask"] * 2 + ["gather"] * 9
  assert stacks.runs(kinds) == [(0, 1), (1, 3), (3, 12)]
  assert all(k.survival_prob is None for k in kinds)  # row mode: p_l is traced


def test_subset_blocks_share_a_scan_where_their_k_is_the_same():
  probs = np.array([1.0, 0.9, 0.88, 0.8, 0.76])
  kinds = stacks.block_kinds(probs, probs < 1, train=True, skip="gather", mode="subset",
                             rows_per_group=10)  # k = 10, 9, 9, 8, 8
  assert [k.run for k in kinds] == [None, 9, 9, 8, 8]
  assert [k.survival_prob for k in kinds] == [None, 0.9, 0.88, 0.8, 0.76]
  assert stacks.runs(kinds) == [(0, 1), (1, 3), (3, 5)]
  # At evaluation the same blocks are one scan with their p_l traced.
  kinds = stacks.block_kinds(probs, np.zeros(5, bool), train=False, skip="gather",
                             mode="subset", rows_per_group=10)
  assert stacks.runs(kinds) == [(0, 1), (1, 5)]
  assert all(k.scaled for k in kinds[1:])


class Stack(nn.Module):
  """A stack of four ViT blocks, as `VisionTransformer` runs them."""
  probs: tuple[float, ...]
  mode: str
  skip: str
  train: bool
  groups: int = 1

  @nn.compact
  def __call__(self, x, gates):
    probs = np.asarray(self.probs)
    kinds = stacks.block_kinds(probs, probs < 1, train=self.train, skip=self.skip,
                               mode=self.mode, rows_per_group=x.shape[0] // self.groups)
    return stacks.run_stack(
        self, "blocks", vit.EncoderBlock,
        dict(num_heads=2, mlp_dim=64, train=self.train, mode=self.mode,
             row_groups=self.groups), x, kinds,
        jnp.asarray(probs, jnp.float32), gates)


@pytest.mark.parametrize("mode,skip", [("row", "gather"), ("row", "mask"),
                                       ("subset", "gather"), ("batch", "cond")])
def test_a_stack_equals_its_blocks_applied_one_by_one(mode, skip):
  # Row modes in four groups of 2 rows (four devices): 2 capacities per switch, not 8.
  groups = 1 if mode == "batch" else 4
  probs = survival.drop_path_linear(4, 0.5)
  tokens = jax.random.normal(jax.random.key(2), (8, 5, 32))
  gates = gates_lib.draw(jax.random.key(3), np.repeat(probs, 2), mode, 8, groups)
  gates = gates.reshape((4, 2) + gates.shape[1:])
  stack = Stack(tuple(probs), mode, skip, train=True, groups=groups)
  params = jax.jit(stack.init)(jax.random.key(0), tokens, gates)["params"]
  assert jax.tree.leaves(params)[0].shape[0] == 4  # stacked: leading axis = block

  def one_by_one(params):
    h = tokens
    for i, p in enumerate(probs):
      block = vit.EncoderBlock(num_heads=2, mlp_dim=64, train=True, mode=mode, skip=skip,
                               row_groups=groups,
                               survival_prob=float(p) if mode == "subset" else None)
      xs = {} if p == 1 else {"gate": gates[i]} | ({} if mode == "subset" else {"prob": p})
      h, _ = block.apply({"params": jax.tree.map(lambda a: a[i], params["blocks"])}, h, xs)
    return jnp.sum(h ** 2)

  def stacked(params):
    return jnp.sum(stack.apply({"params": params}, tokens, gates) ** 2)

  helpers.assert_trees_close(jax.jit(jax.value_and_grad(stacked))(params),
                             jax.jit(jax.value_and_grad(one_by_one))(params),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [
    lambda **kw: vit.ViT_Test(num_classes=5, depth=3, **kw),
    lambda **kw: convnext.ConvNeXt_Test(num_classes=5, depths=(1, 3),
                                        layer_scale_init=0.5, **kw)])
def test_a_rolled_stack_equals_an_unrolled_one_in_logits_and_gradients(make):
  rolled = make(drop_path_rate=0.5, scan_unroll=1)
  unrolled = make(drop_path_rate=0.5, scan_unroll=True)
  v = jax.jit(rolled.init)(jax.random.key(0), X)

  def run(model):
    def loss(params):
      return jnp.sum(model.apply({"params": params}, X, train=True,
                                 key=jax.random.key(4)) ** 2)
    return jax.jit(jax.value_and_grad(loss))(v["params"])
  helpers.assert_trees_close(run(rolled), run(unrolled), rtol=1e-5, atol=1e-5)
  # One block per run of the rolled program: a loop per scan.
  jaxpr = jax.make_jaxpr(lambda p: rolled.apply(p, X, train=True,
                                                key=jax.random.key(4)))(v).jaxpr
  assert helpers.count_primitives(jaxpr, "scan") >= 2


def test_auto_unrolls_cpu_stacks_but_their_switches_and_rolls_elsewhere(monkeypatch):
  assert backend.unroll_blocks("mask", gated=True) is True
  assert backend.unroll_blocks("gather", gated=False) is True  # runs plain
  assert backend.unroll_blocks("gather", gated=True) == 1  # eight branch copies a block
  monkeypatch.setattr(backend, "platform", lambda: "gpu")
  assert backend.unroll_blocks("mask", gated=True) == 1

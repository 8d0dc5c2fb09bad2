"""Per-example skipping (`sdnet.rows`, skip="gather"): exact against masking for every
number of kept rows, under jit, a batch sharded over 4 devices and pmap; subset mode's
draw as DINOv2 defines it."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import optax
import pytest

from sdnet import StochasticResidual, gates, models, rows
from tests import helpers

BATCH = 16


class Mixer(nn.Module):
  """A pre-norm attention + MLP branch: its examples are independent."""

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm()(x)
    h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(h)
    return nn.Dense(x.shape[-1])(nn.gelu(nn.Dense(16)(h)))


class WithBatchNorm(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.BatchNorm(use_running_average=False)(nn.Dense(x.shape[-1])(x))


class Net(nn.Module):
  skip: str
  mode: str = "row"
  groups: int = 1
  p: float = 0.6

  @nn.compact
  def __call__(self, x, gate=None, key=None):
    x = nn.Dense(x.shape[-1])(x)  # a layer before, so that gradients flow through x
    return StochasticResidual(Mixer(), skip=self.skip, mode=self.mode, scaling="inverted",
                              row_groups=self.groups)(
                                  x, train=True, survival_prob=self.p, gate=gate, key=key)


X = jax.random.normal(jax.random.key(1), (BATCH, 5, 8))
VARIABLES = Net("mask").init(jax.random.key(0), X, gate=jnp.ones(BATCH, bool))
# SGD, whose update is linear in the gradient: Adam's would magnify the float noise of
# gradients that are zero in exact arithmetic (attention's key bias) into +-lr.
TX = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9, nesterov=True))


def step(skip, groups, params, opt_state, x, gate):
  """(outputs, gradients, new params) of one SGD step on sum(sin(out))."""
  def loss(params):
    out = Net(skip, groups=groups).apply({"params": params}, x, gate=gate)
    return jnp.sum(jnp.sin(out)), out
  grads, out = jax.grad(loss, has_aux=True)(params)
  updates, _ = TX.update(grads, opt_state, params)
  return out, grads, optax.apply_updates(params, updates)


def gates_with(kept: int, seed: int = 0) -> jax.Array:
  """A (BATCH,) gate with exactly `kept` open rows, at random places."""
  return jax.random.permutation(jax.random.key(seed), jnp.arange(BATCH) < kept)


def assert_same(got, want):
  helpers.assert_trees_close(got, want, rtol=2e-5, atol=2e-6)


def test_capacities_are_multiples_of_an_eighth_and_end_at_the_batch():
  assert rows.capacities(64) == (8, 16, 24, 32, 40, 48, 56, 64)
  assert rows.capacities(20) == (3, 6, 9, 12, 15, 18, 20)
  assert rows.capacities(3) == (1, 2, 3)
  for n in range(1, 70):
    sizes = rows.capacities(n)
    assert sizes[-1] == n and max(np.diff((0,) + sizes)) <= n / 8 + 1


def test_every_number_of_kept_rows_gives_masking_outputs_gradients_and_updates():
  opt_state = TX.init(VARIABLES["params"])
  masked = jax.jit(functools.partial(step, "mask", 1))
  gathered = jax.jit(functools.partial(step, "gather", 1))
  computed = []
  for kept in range(BATCH + 1):
    gate = gates_with(kept, seed=kept)
    want = masked(VARIABLES["params"], opt_state, X, gate)
    assert_same(gathered(VARIABLES["params"], opt_state, X, gate), want)
    # A dropped row is its shortcut alone, with zero gradient through the branch.
    h = nn.Dense(8).apply({"params": VARIABLES["params"]["Dense_0"]}, X)
    np.testing.assert_array_equal(np.asarray(want[0])[~np.asarray(gate)],
                                  np.asarray(h)[~np.asarray(gate)])
    computed.append(float(rows.rows_computed(gate)))
  # At most an eighth of the batch (2 rows) computed for nothing, none when all are kept.
  assert all(0 <= c * BATCH - k < BATCH / 8 for k, c in enumerate(computed[1:], 1))
  assert computed[0] == 2 / BATCH and computed[-1] == 1.0


def test_gather_runs_one_switch_of_eight_capacities_and_subset_none():
  def traced(skip, mode):
    return jax.make_jaxpr(lambda v, k: Net(skip, mode=mode).apply(v, X, key=k))(
        VARIABLES, jax.random.key(0)).jaxpr
  jaxpr = traced("gather", "row")
  assert helpers.count_primitives(jaxpr, "cond") == 1
  [switch] = [e for e in jaxpr.eqns if e.primitive.name == "cond"] or [
      e for sub in map(helpers.subjaxprs, jaxpr.eqns) for j in sub for e in j.eqns
      if e.primitive.name == "cond"]
  assert len(switch.params["branches"]) == len(rows.capacities(BATCH)) == 8
  assert helpers.count_primitives(traced("gather", "subset"), "cond") == 0


def test_a_batch_sharded_over_4_devices_gathers_on_each_device():
  mesh = Mesh(np.array(jax.devices()[:4]), ("batch",))
  rows_sharded = NamedSharding(mesh, P("batch"))
  replicated = NamedSharding(mesh, P())
  opt_state = TX.init(VARIABLES["params"])
  x = jax.device_put(X, rows_sharded)
  shardings = (replicated, replicated, rows_sharded, rows_sharded)
  gathered = jax.jit(functools.partial(step, "gather", 4), in_shardings=shardings)
  masked = jax.jit(functools.partial(step, "mask", 1))
  for kept in (0, 1, 5, 9, 16):
    gate = jax.device_put(gates_with(kept, seed=kept), rows_sharded)
    got = gathered(VARIABLES["params"], opt_state, x, gate)
    assert_same(got, masked(VARIABLES["params"], opt_state, X, gate))
    assert got[0].sharding.is_equivalent_to(rows_sharded, X.ndim)
  hlo = gathered.lower(VARIABLES["params"], opt_state, x, gate).compile().as_text()
  # No device collects another's activations: only reductions (gradients, the capacity).
  assert "all-gather" not in hlo and "all-to-all" not in hlo
  assert "collective-permute" not in hlo


def test_under_pmap_each_device_gathers_its_own_rows_with_its_own_capacity():
  opt_state = TX.init(VARIABLES["params"])

  def device_step(skip, params, x, gate):
    def loss(params):
      out = Net(skip).apply({"params": params}, x, gate=gate)
      return jnp.sum(jnp.sin(out)), out
    grads, out = jax.grad(loss, has_aux=True)(params)
    grads = jax.lax.pmean(grads, "batch")
    updates, _ = TX.update(grads, opt_state, params)
    return out, grads, optax.apply_updates(params, updates)

  # Devices keep 0, 1, 3 and 4 of their 4 rows: four different capacities at once.
  gate = jnp.array([0, 0, 0, 0, 0, 1, 0, 0, 1, 1, 0, 1, 1, 1, 1, 1], bool).reshape(4, 4)
  replicate = lambda t: jax.tree.map(lambda a: jnp.broadcast_to(a, (4,) + a.shape), t)
  args = (replicate(VARIABLES["params"]), X.reshape(4, 4, 5, 8), gate)
  got = jax.pmap(functools.partial(device_step, "gather"), "batch")(*args)
  want = jax.pmap(functools.partial(device_step, "mask"), "batch")(*args)
  assert_same(got, want)


def test_subset_mode_opens_exactly_round_p_n_rows_of_every_group_uniformly():
  probs = np.array([1.0, 0.75, 0.5, 0.3])
  drawn = np.stack([np.asarray(gates.draw(jax.random.key(s), probs, "subset", 16, groups=2))
                    for s in range(400)])
  counts = drawn.reshape(400, 4, 2, 8).sum(-1)
  for block, p in enumerate(probs):
    assert (counts[:, block] == gates.subset_size(p, 8)).all()
  assert gates.subset_size(0.3, 8) == 2 and gates.subset_size(0.01, 8) == 1
  # Every row equally likely: the frequency of each row is k / n (binomial 4-sigma band).
  frequency = drawn[:, 2].mean(0)
  assert np.all(np.abs(frequency - 0.5) < 4 * np.sqrt(0.25 / 400))
  # Different steps, different subsets.
  assert len({tuple(d[2]) for d in drawn}) > 300


def test_subset_mode_scales_by_n_over_k_and_gather_equals_mask():
  key = jax.random.key(5)
  net = lambda skip: Net(skip, mode="subset", p=0.6)
  got = net("gather").apply(VARIABLES, X, key=key)
  assert_same(got, net("mask").apply(VARIABLES, X, key=key))
  # Its definition: shortcut + (n / k) * f on the k drawn rows, the shortcut elsewhere.
  gate = np.asarray(gates.draw(key, np.array([0.6]), "subset", BATCH)[0])
  k = gates.subset_size(0.6, BATCH)
  assert gate.sum() == k == 10
  h = nn.Dense(8).apply({"params": VARIABLES["params"]["Dense_0"]}, X)
  f = Mixer().apply({"params": VARIABLES["params"]["Mixer_0"]}, h)
  want = np.where(gate[:, None, None], h + BATCH / k * f, h)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_row_mode_draws_bernoulli_rows_scaled_by_one_over_p():
  key = jax.random.key(6)
  got = Net("gather", p=0.6).apply(VARIABLES, X, key=key)
  gate = np.asarray(gates.draw(key, jnp.array([0.6]), "row", BATCH)[0])
  h = nn.Dense(8).apply({"params": VARIABLES["params"]["Dense_0"]}, X)
  f = Mixer().apply({"params": VARIABLES["params"]["Mixer_0"]}, h)
  np.testing.assert_allclose(got, np.where(gate[:, None, None], h + f / 0.6, h),
                             rtol=1e-5, atol=1e-6)


def test_a_branch_with_batch_statistics_is_refused_in_one_line_naming_mask():
  block = StochasticResidual(WithBatchNorm(), skip="gather", mode="row")
  x = jnp.ones((8, 4))
  variables = block.init(jax.random.key(0), x, train=True, gate=True)
  with pytest.raises(ValueError, match="use skip='mask'") as error:
    block.apply(variables, x, train=True, survival_prob=0.5, key=jax.random.key(1),
                mutable=["batch_stats"])
  assert "\n" not in str(error.value)
  # Masking is allowed: statistics over the whole batch, as timm's drop path.
  StochasticResidual(WithBatchNorm(), skip="mask", mode="row").apply(
      variables, x, train=True, survival_prob=0.5, key=jax.random.key(1),
      mutable=["batch_stats"])
  with pytest.raises(ValueError, match="BatchNorm"):
    models.CifarResNet8(mode="row", skip="gather")


@pytest.mark.parametrize("skip,mode,message", [
    ("gather", "batch", "per-example method"), ("cond", "row", "cannot skip it whole"),
    ("cond", "subset", "cannot skip it whole")])
def test_a_skip_method_of_the_other_kind_of_gate_is_refused(skip, mode, message):
  with pytest.raises(ValueError, match=message):
    StochasticResidual(Mixer(), skip=skip, mode=mode)


def test_row_groups_must_divide_the_batch():
  with pytest.raises(ValueError, match="row_groups must be a positive divisor"):
    Net("gather", groups=3).apply(VARIABLES, X, key=jax.random.key(0))

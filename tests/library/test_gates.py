import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdnet import gates, survival


def test_gate_frequencies_match_survival_probabilities():
  """Over N keys each block's keep rate is within 5 standard errors of p_l."""
  probs = survival.linear_decay(54, 0.5)
  n = 4000
  keys = jax.random.split(jax.random.key(0), n)
  drawn = np.asarray(jax.vmap(lambda k: gates.draw(k, probs))(keys))
  assert drawn.shape == (n, 54) and drawn.dtype == bool
  rate = drawn.mean(axis=0)
  stderr = np.sqrt(probs * (1 - probs) / n)
  assert np.all(np.abs(rate - probs) <= 5 * stderr + 1e-12), np.max(
      np.abs(rate - probs) / stderr)
  # The depth of a mini-batch averages to sum(p) = 40.25.
  assert abs(drawn.sum(axis=1).mean() - 40.25) < 5 * np.sqrt(
      np.sum(probs * (1 - probs)) / n)
  # Blocks are drawn independently: the correlation of two gates is near zero.
  corr = np.corrcoef(drawn[:, 30], drawn[:, 53])[0, 1]
  assert abs(corr) < 5 / np.sqrt(n)


def test_same_key_same_gates_and_row_mode_shape():
  probs = survival.uniform(6, 0.5)
  key = jax.random.key(7)
  np.testing.assert_array_equal(gates.draw(key, probs), gates.draw(key, probs))
  rows = gates.draw(key, probs, mode="row", batch_size=32)
  assert rows.shape == (6, 32)
  assert 0 < np.asarray(rows).mean() < 1  # examples differ within a block


def test_raw_uint32_keys_are_accepted():
  gates.check_key(jax.random.PRNGKey(0))
  gates.check_key(jax.random.key(0))


@pytest.mark.parametrize("bad,message", [
    (0, "Integers and seeds are not keys"),
    (jnp.zeros((3,), jnp.float32), "dtype float32"),
    (jax.random.split(jax.random.key(0), 4), "array of keys with shape"),
])
def test_bad_keys_are_refused(bad, message):
  with pytest.raises(ValueError, match=message):
    gates.check_key(bad)


def test_gate_vector_checks():
  np.testing.assert_array_equal(gates.check_gates([1, 0, 1], 3), [True, False, True])
  with pytest.raises(ValueError, match=r"shape \(4,\)"):
    gates.check_gates(jnp.ones((3,), bool), 4)
  with pytest.raises(ValueError, match="must be booleans"):
    gates.check_gates(jnp.full((3,), 0.5), 3)


def test_resolve_rules():
  probs = survival.linear_decay(3, 0.5)
  with pytest.raises(ValueError, match="needs the block gates"):
    gates.resolve(None, None, probs)
  with pytest.raises(ValueError, match="not both"):
    gates.resolve(jax.random.key(0), jnp.ones(3, bool), probs)
  assert gates.resolve(None, None, survival.linear_decay(3, 1.0)) is None

"""Survival gates b_l ~ Bernoulli(p_l), drawn from an explicit PRNG key.

Key contract. The gates of a training step are a pure function of the key passed to the
model. The paper draws one gate per block per mini-batch ("batch mode"). In data-parallel
training the global mini-batch is split over devices, so the gate key must be the SAME on
every device (e.g. one replicated key folded with the step number): per-device keys give
every device a different network, so no block is really dropped, and under `pmap` with
cross-replica BatchNorm a block that runs on some devices and not others deadlocks on its
`pmean`. Augmentation and dropout keys, in contrast, should differ per device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sdnet import options


def check_key(key) -> None:
  """Raises ValueError unless `key` is one PRNG key (typed, or a raw uint32[2] key)."""
  dtype = getattr(key, "dtype", None)
  shape = getattr(key, "shape", None)
  if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
    if shape == ():
      return
    raise ValueError(
        f"key must be a single PRNG key, got an array of keys with shape {shape}. "
        "Pass one key (e.g. jax.random.fold_in(key, step)); under pmap, replicate it.")
  if dtype == np.uint32 and shape == (2,):
    return
  raise ValueError(
      "key must be a PRNG key made by jax.random.key(seed) (or a raw "
      f"jax.random.PRNGKey(seed)); got {type(key).__name__} with dtype {dtype} and shape "
      f"{shape}. Integers and seeds are not keys: wrap them with jax.random.key(seed).")


def subset_size(p: float, rows: int) -> int:
  """k = round(p * rows), at least 1: how many of `rows` examples run a block of survival
  probability p in subset mode (DINOv2's `sample_subset_size`, rounded not floored)."""
  return max(1, min(rows, int(np.round(float(p) * rows))))


def draw(key, probs, mode: options.Mode = "batch",
         batch_size: int | None = None, groups: int = 1) -> jax.Array:
  """Draws the gates of one mini-batch.

  batch mode: b_l ~ Bernoulli(p_l), one per block, shape (L,), shared by every example
    (the paper).
  row mode: b_{l,i} ~ Bernoulli(p_l), one per block and example, shape (L, batch_size).
  subset mode: shape (L, batch_size); the batch is split into `groups` equal contiguous
    parts of n rows, and in each exactly k_l = `subset_size(p_l, n)` rows, drawn uniformly
    without replacement, are open (DINOv2's fixed subset). E[b_{l,i}] = k_l / n, which
    differs from p_l by the rounding only. `probs` must be concrete (k_l sets shapes).
  """
  check_key(key)
  options.check("gate mode", mode, options.Mode)
  if mode == "batch":
    return jax.random.bernoulli(key, jnp.asarray(probs, jnp.float32))
  if batch_size is None:
    raise ValueError(f"{mode} mode draws one gate per example: give batch_size.")
  if mode == "row":
    p = jnp.asarray(probs, jnp.float32)
    return jax.random.bernoulli(key, p[:, None], (p.shape[0], batch_size))
  try:
    p = np.asarray(probs, np.float64)
  except jax.errors.TracerArrayConversionError:
    raise ValueError("subset mode needs static survival probabilities (Python floats or "
                     "NumPy arrays): they set how many rows run each block.") from None
  rows = check_groups(batch_size, groups)
  k = np.array([subset_size(pl, rows) for pl in p], np.int32)
  order = jnp.argsort(jax.random.uniform(key, (p.shape[0], groups, rows)), axis=-1)
  rank = jnp.argsort(order, axis=-1)  # a uniformly random permutation of 0..n-1
  return (rank < k[:, None, None]).reshape(p.shape[0], batch_size)


def check_groups(batch_size: int, groups: int) -> int:
  """Rows per group: `groups` must be a positive integer that divides `batch_size`."""
  if not isinstance(groups, (int, np.integer)) or groups < 1 or batch_size % groups:
    raise ValueError(
        f"row_groups must be a positive divisor of the batch size {batch_size}, got "
        f"{groups!r}: set it to the number of devices the batch is sharded over (1 under "
        "pmap or on one device).")
  return batch_size // groups


def check_gates(gates, num_blocks: int, mode: options.Mode = "batch",
                batch_size: int | None = None) -> jax.Array:
  """Validates an explicit gate array and returns it as bool."""
  gates = jnp.asarray(gates)
  if not (gates.dtype == jnp.bool_ or jnp.issubdtype(gates.dtype, jnp.integer)):
    raise ValueError(
        f"gates must be booleans (True = block runs), got dtype {gates.dtype}. Survival "
        "probabilities are model settings, not gates.")
  expected = (num_blocks,) if mode == "batch" else (num_blocks, batch_size)
  if gates.shape != expected:
    raise ValueError(
        f"gates must have shape {expected} (one per residual block"
        f"{'' if mode == 'batch' else ' and example'}) for this network of {num_blocks} "
        f"blocks in {mode} mode, got shape {gates.shape}.")
  return gates.astype(jnp.bool_)


def resolve(key, gates, probs, mode: options.Mode = "batch",
            batch_size: int | None = None, groups: int = 1):
  """The gates of a training step: from explicit `gates` or drawn with `key`.

  Returns None when the network has constant depth and no explicit gates were given:
  nothing to gate, nothing drawn (a key is then accepted and unused). Raises ValueError
  when both or (for a stochastic network) neither is given.
  """
  probs = np.asarray(probs)
  if key is not None and gates is not None:
    raise ValueError("pass either key= (to draw the gates) or gates=, not both.")
  if gates is not None:
    return check_gates(gates, probs.shape[0], mode, batch_size)
  if key is not None:
    check_key(key)
    return None if np.all(probs == 1.0) else draw(key, probs, mode, batch_size, groups)
  if np.all(probs == 1.0):
    return None
  raise ValueError(
      "train=True needs the block gates: pass key=<PRNG key> to draw them (the same key "
      "on every device in data-parallel training), or gates=<bool array of one entry per "
      "block>. For a network without stochastic depth, set p_last=1 (drop_path_rate=0).")

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


def draw(key, probs, mode: options.Mode = "batch",
         batch_size: int | None = None) -> jax.Array:
  """Draws the gates b_l ~ Bernoulli(p_l) of one mini-batch.

  batch mode: one gate per block, shape (L,), shared by every example (the paper).
  row mode: one gate per block and example, shape (L, batch_size).
  """
  check_key(key)
  options.check("gate mode", mode, options.Mode)
  p = jnp.asarray(probs, jnp.float32)
  if mode == "batch":
    return jax.random.bernoulli(key, p)
  if batch_size is None:
    raise ValueError("row mode draws one gate per example: give batch_size.")
  return jax.random.bernoulli(key, p[:, None], (p.shape[0], batch_size))


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
            batch_size: int | None = None):
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
    return None if np.all(probs == 1.0) else draw(key, probs, mode, batch_size)
  if np.all(probs == 1.0):
    return None
  raise ValueError(
      "train=True needs the block gates: pass key=<PRNG key> to draw them (the same key "
      "on every device in data-parallel training), or gates=<bool array of one entry per "
      "block>. For a network without stochastic depth, set p_last=1.")

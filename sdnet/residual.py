"""A residual block with stochastic depth around any Flax branch (Huang et al., 2016).

    train:  H_l = act( shortcut(H_{l-1}) + b_l * s_train * f_l(H_{l-1}) ),  b_l ~ Bern(p_l)
    eval:   H_l = act( shortcut(H_{l-1}) + s_eval * f_l(H_{l-1}) )

Scaling rules (`scaling=`):
  "paper"    s_train = 1,       s_eval = p_l   (the paper, Eq. 5; default)
  "inverted" s_train = 1 / p_l, s_eval = 1     (timm / torchvision style)
  "none"     s_train = 1,       s_eval = 1

Skipping (`skip=`): how a dropped branch is handled in training, both exact:
  "cond" the branch sits in `lax.cond`: a dropped branch is not computed, its BatchNorm
         statistics stay as they were, its parameters get zero loss-gradient.
  "mask" the branch is always computed and multiplied by its gate; BatchNorm statistics
         are reset to their old values where the gate is closed, so the math (outputs,
         gradients, new statistics) equals "cond". For `vmap` users, and faster where
         conditionals are expensive (XLA:CPU).
  "compact" a stage-level method (`sdnet.compaction`, used by `sdnet.models.ResNet`): the
         surviving blocks of a stage are gathered and run in a few fixed-length scans, one
         conditional per power of two instead of one per block. A lone block is its own
         stage, so here it means "cond".
  "auto" the choice for the current backend (`resolve_skip`).

A gate that is a Python bool is static: True runs the branch, False skips it, with no
conditional in the program.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdnet import gates as gates_lib

SKIPS = ("auto", "cond", "mask", "compact")
SCALINGS = ("paper", "inverted", "none")


def resolve_skip(skip: str, mode: str = "batch") -> str:
  """The skipping implementation used for `skip` on the default JAX backend.

  Row mode cannot skip (some examples keep the block), so it always masks. "auto" picks:
    CPU  "mask": XLA:CPU runs a conditional around convolutions at ~10x a plain step.
    GPU  "compact": XLA:GPU copies every conditional's predicate to the host and waits,
         so the fewest conditionals should win: bit_length(n) per stage of n blocks.
         (`benchmarks/train_step.py` measures every method; see the README.)
    TPU  "cond": predicates are evaluated on the device; a per-block cond is cheap.
  """
  if skip not in SKIPS:
    raise ValueError(f"unknown skip implementation {skip!r}; choose one of {SKIPS}.")
  if mode == "row":
    if skip in ("cond", "compact"):
      raise ValueError(
          "row mode drops blocks per example, so the branch always runs for some rows: "
          f"it cannot be skipped (skip={skip!r}). Use skip='mask' or 'auto'.")
    return "mask"
  if skip == "auto":
    return {"cpu": "mask", "gpu": "compact"}.get(jax.default_backend(), "cond")
  return skip


def check_options(skip: str, scaling: str, mode: str) -> None:
  """ValueError naming the choices for a bad option, at module construction."""
  if mode not in gates_lib.MODES:
    raise ValueError(f"unknown mode {mode!r}; choose one of {gates_lib.MODES}.")
  if scaling not in SCALINGS:
    raise ValueError(f"unknown scaling rule {scaling!r}; choose one of {SCALINGS}.")
  resolve_skip(skip if skip != "auto" else "mask", mode)


def _is_static_one(p) -> bool:
  return isinstance(p, (int, float)) and p == 1


def branch_scale(survival_prob, train: bool, scaling: str):
  """s_train or s_eval of the module docstring (None when it is the constant 1)."""
  if _is_static_one(survival_prob) or scaling == "none":
    return None
  if scaling == "paper":
    return None if train else survival_prob
  return 1.0 / survival_prob if train else None


class StochasticResidual(nn.Module):
  """act(shortcut(x) + gate * scale * branch(x)) with the paper's stochastic depth.

  Attributes:
    branch: the residual function f_l, any Flax module called as branch(x). Build it
      with its training flag bound (e.g. BatchNorm(use_running_average=not train)).
    shortcut: callable (function or module) giving the shortcut path; identity if None.
    activation: applied after the addition (post-activation ResNets); none if None.
    skip, scaling: see the module docstring.
    mode: "batch" (one gate per mini-batch, the paper) or "row" (one per example).

  Call with `train`, the block's `survival_prob` p_l (a Python float or a scalar array,
  e.g. inside `nn.scan`), and in training either `gate` (bool scalar, or (batch,) in row
  mode) or `key` (a PRNG key to draw it). With neither, training requires p_l == 1.
  At evaluation a closed `gate` drops the block too, to run a chosen sub-network.
  """
  branch: nn.Module
  shortcut: Optional[Callable[[jax.Array], jax.Array]] = None
  activation: Optional[Callable[[jax.Array], jax.Array]] = None
  skip: str = "auto"
  scaling: str = "paper"
  mode: str = "batch"

  def __post_init__(self):
    check_options(self.skip, self.scaling, self.mode)
    super().__post_init__()

  @nn.compact
  def __call__(self, x, *, train: bool, survival_prob: Any = 1.0,
               gate: Optional[jax.Array] = None, key: Optional[jax.Array] = None):
    residual = self.shortcut(x) if self.shortcut is not None else x
    scale = branch_scale(survival_prob, train, self.scaling)
    if key is not None:
      if gate is not None:
        raise ValueError("pass either key= or gate=, not both.")
      gate = gates_lib.draw(key, jnp.reshape(survival_prob, (1,)), self.mode,
                            x.shape[0])[0]
    elif gate is None and train and not _is_static_one(survival_prob):
      raise ValueError(
          "train=True with survival_prob < 1 needs gate= or key=; the block cannot "
          "decide by itself whether it survives this mini-batch.")

    def finish(delta):
      out = residual if delta is None else residual + delta.astype(residual.dtype)
      return self.activation(out) if self.activation is not None else out

    def scaled(y):
      return y if scale is None else y * jnp.asarray(scale, y.dtype)

    if gate is None or gate is True or self.is_initializing():
      return finish(scaled(self.branch(x)))
    if gate is False:
      return finish(None)

    gate = jnp.asarray(gate, jnp.bool_)
    skip = resolve_skip(self.skip, self.mode)
    if skip in ("cond", "compact"):
      return nn.cond(gate,
                     lambda branch, h: finish(scaled(branch(h))),
                     lambda branch, h: finish(None),
                     self.branch, x)

    y = _run_keeping_statistics(self.branch, x, gate) if self.mode == "batch" else (
        self.branch(x))
    open_ = jnp.reshape(gate, gate.shape + (1,) * (y.ndim - gate.ndim))
    return finish(jnp.where(open_, scaled(y), jnp.zeros((), y.dtype)))


def _run_keeping_statistics(branch: nn.Module, x, gate):
  """branch(x), with its new batch statistics kept only where `gate` is open.

  new_stats = where(gate, stats_after_branch, stats_before): what a skipped branch leaves.
  """
  if not branch.is_mutable_collection("batch_stats"):
    return branch(x)
  before = {}

  def remember(stats):
    before["stats"] = stats
    return stats

  def keep_where_open(stats):
    return jax.tree.map(lambda new, old: jnp.where(gate, new, old), stats,
                        before["stats"])

  mapped = nn.map_variables(lambda mdl, h: mdl(h), "batch_stats",
                            trans_in_fn=remember, trans_out_fn=keep_where_open,
                            mutable=True)
  return mapped(branch, x)

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
         gradients, new statistics) equals "cond", but the dropped work is still done.
         For `vmap` users, per-example gates, and backends where conditionals cost more
         than the branch (XLA:CPU).
  "auto" the choice for the current backend (`sdnet.backend.auto_skip`).
Skipping a whole stage of same-shape blocks at once ("compact") is a method of the
ResNet (`sdnet.models`, `sdnet.compaction`), not of a lone block.

A gate that is a Python bool is static: True runs the branch, False skips it, with no
conditional in the program.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdnet import backend
from sdnet import gates as gates_lib
from sdnet import options


def resolve_skip(skip: options.Skip, mode: options.Mode = "batch") -> str:
  """"cond" or "mask": the implementation `skip` stands for on this backend and mode."""
  options.check("skip implementation", skip, options.Skip)
  options.check("mode", mode, options.Mode)
  options.check_skip_for_mode(skip, mode)
  return backend.resolve_skip(skip, mode, stage=False)


def _is_static_one(p) -> bool:
  return isinstance(p, (int, float)) and p == 1


def branch_scale(survival_prob, train: bool, scaling: options.Scaling):
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
    skip: "cond", "mask" or "auto" (see the module docstring).
    scaling: "paper", "inverted" or "none" (see the module docstring).
    mode: "batch" (one gate per mini-batch, the paper) or "row" (one per example).

  Call with `train`, the block's `survival_prob` p_l (a Python float or a scalar array,
  e.g. inside `nn.scan`), and in training either `gate` (bool scalar, or (batch,) in row
  mode) or `key` (a PRNG key to draw it). With neither, training requires p_l == 1.
  At evaluation a closed `gate` drops the block too, to run a chosen sub-network; a `key`
  is refused there (it would drop at random and scale).
  """
  branch: nn.Module
  shortcut: Callable[[jax.Array], jax.Array] | None = None
  activation: Callable[[jax.Array], jax.Array] | None = None
  skip: options.Skip = "auto"
  scaling: options.Scaling = "paper"
  mode: options.Mode = "batch"

  def __post_init__(self):
    resolve_skip(self.skip, self.mode)
    options.check("scaling rule", self.scaling, options.Scaling)
    super().__post_init__()

  @nn.compact
  def __call__(self, x, *, train: bool, survival_prob: Any = 1.0,
               gate: jax.Array | bool | None = None, key: jax.Array | None = None):
    residual = self.shortcut(x) if self.shortcut is not None else x
    scale = branch_scale(survival_prob, train, self.scaling)
    if key is not None:
      if not train:
        raise ValueError("key= draws a training gate; at evaluation the block runs with "
                         "its branch scaled by p_l. Pass gate=False to evaluate without it.")
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
    if resolve_skip(self.skip, self.mode) == "cond":
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

"""A residual block with stochastic depth around any Flax branch (Huang et al., 2016).

    train:  H_l = act( shortcut(H_{l-1}) + b_l * s_train * f_l(H_{l-1}) ),  b_l ~ Bern(p_l)
    eval:   H_l = act( shortcut(H_{l-1}) + s_eval * f_l(H_{l-1}) )

Scaling rules (`scaling=`):
  "paper"    s_train = 1,       s_eval = p_l   (the paper, Eq. 5; default)
  "inverted" s_train = 1 / p_l, s_eval = 1     (timm / torchvision style)
  "none"     s_train = 1,       s_eval = 1

Gates (`mode=`): one per mini-batch (the paper), one per example ("row", drop path), or
exactly round(p_l * n) examples of every n ("subset", DINOv2's); see `sdnet.options.Mode`.

Skipping (`skip=`): how a dropped branch is handled in training, all exact:
  "cond"   batch mode: the branch sits in `lax.cond`: a dropped branch is not computed, its
           BatchNorm statistics stay as they were, its parameters get zero loss-gradient.
  "gather" row and subset modes: the branch runs on the kept examples only, gathered into
           a smaller batch and scattered back (`sdnet.rows`); a dropped example gets its
           shortcut alone. Refused for a branch with batch statistics in training: they
           would be computed over other examples than masking's.
  "mask"   every mode: the branch is always computed and multiplied by its gate; in batch
           mode BatchNorm statistics are reset to their old values where the gate is
           closed, so the math equals "cond"; in the row modes a BatchNorm in the branch
           sees the whole batch (as timm's drop path). The dropped work is still done.
  "auto"   the choice for the current backend and drop rate (`sdnet.backend.auto_skip`).

In subset mode the "inverted" rule scales by n / k (DINOv2's B / k), the kept fraction
actually drawn, instead of 1 / p_l.
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

import numpy as np

from sdnet import backend
from sdnet import gates as gates_lib
from sdnet import options
from sdnet import rows


def resolve_skip(skip: options.Skip, mode: options.Mode = "batch",
                 drop_rate: float | None = None) -> str:
  """"cond", "gather" or "mask": what `skip` stands for on this backend, in this mode and
  at this drop rate 1 - p_l (None: not known statically)."""
  options.check("skip implementation", skip, options.Skip)
  options.check("mode", mode, options.Mode)
  options.check_skip_for_mode(skip, mode)
  return backend.resolve_skip(skip, mode, stage=False, drop_rate=drop_rate)


def _is_static_one(p) -> bool:
  return isinstance(p, (int, float)) and p == 1


def branch_scale(survival_prob, train: bool, scaling: options.Scaling,
                 kept_fraction=None):
  """s_train or s_eval of the module docstring (None when it is the constant 1);
  `kept_fraction` replaces p_l in s_train = 1 / p_l (subset mode's k / n)."""
  if _is_static_one(survival_prob) or scaling == "none":
    return None
  if scaling == "paper":
    return None if train else survival_prob
  if not train:
    return None
  return 1.0 / (survival_prob if kept_fraction is None else kept_fraction)


def static_drop_rate(survival_prob) -> float | None:
  """1 - p_l where p_l is a Python number, None where it is traced."""
  if isinstance(survival_prob, (int, float, np.floating, np.integer)):
    return 1.0 - float(survival_prob)
  return None


def subset_rows(mode: options.Mode, train: bool, survival_prob, batch: int,
                row_groups: int) -> int | None:
  """k = round(p_l n) rows per group of n in subset-mode training (a static shape);
  None in the other modes, at evaluation and for p_l = 1."""
  if mode != "subset" or not train or _is_static_one(survival_prob):
    return None
  if static_drop_rate(survival_prob) is None:
    raise ValueError("subset mode needs survival_prob as a Python float: it sets how "
                     "many rows run the branch (a static shape).")
  return gates_lib.subset_size(survival_prob, gates_lib.check_groups(batch, row_groups))


def training_gate(gate, key, *, train: bool, survival_prob, mode: options.Mode,
                  batch: int, row_groups: int, subset: int | None):
  """The gate a block runs with: `gate` as given, or drawn from `key` (`sdnet.gates`);
  ValueError for a key at evaluation, both at once, or neither where p_l < 1 in training.
  """
  if key is not None:
    if not train:
      raise ValueError("key= draws a training gate; at evaluation the block runs with "
                       "its branch scaled by p_l. Pass gate=False to evaluate without it.")
    if gate is not None:
      raise ValueError("pass either key= or gate=, not both.")
    probs = (np.reshape(survival_prob, (1,)) if subset is not None
             else jnp.reshape(survival_prob, (1,)))
    return gates_lib.draw(key, probs, mode, batch, row_groups)[0]
  if gate is None and train and not _is_static_one(survival_prob):
    raise ValueError(
        "train=True with survival_prob < 1 needs gate= or key=; the block cannot "
        "decide by itself whether it survives this mini-batch.")
  return gate


def scaled(y, scale):
  """y * scale, or y where scale is None (the constant 1)."""
  return y if scale is None else y * jnp.asarray(scale, y.dtype)


def masked(y, gate, scale):
  """b * s * f(x) computed on every row: `gate` a scalar (batch mode) or (B,) per row."""
  open_ = jnp.reshape(gate, gate.shape + (1,) * (y.ndim - gate.ndim))
  return jnp.where(open_, scaled(y, scale), jnp.zeros((), y.dtype))


def keep_where_open(gate, new_stats, old_stats):
  """new_stats = where(gate, stats after the branch, stats before): what a skipped
  branch leaves (batch mode, "mask")."""
  return jax.tree.map(lambda new, old: jnp.where(gate, new, old), new_stats, old_stats)


def refuse_gather_with_batch_statistics() -> None:
  raise ValueError(
      "skip='gather' runs the branch on the kept examples only, so its BatchNorm "
      "would compute batch statistics over other examples than masking does: use "
      "skip='mask' (statistics over the whole batch, as timm's drop path) for a "
      "branch with batch statistics.")


class StochasticResidual(nn.Module):
  """act(shortcut(x) + gate * scale * branch(x)) with the paper's stochastic depth.

  Attributes:
    branch: the residual function f_l, any Flax module called as branch(x). Build it
      with its training flag bound (e.g. BatchNorm(use_running_average=not train)).
    shortcut: callable (function or module) giving the shortcut path; identity if None.
    activation: applied after the addition (post-activation ResNets); none if None.
    skip: "cond", "mask" or "auto" (see the module docstring).
    scaling: "paper", "inverted" or "none" (see the module docstring).
    mode: "batch" (one gate per mini-batch, the paper), "row" (one per example) or
      "subset" (exactly round(p_l * n) examples of every n).
    row_groups: in the row modes, the number of contiguous equal parts of the batch that
      gather their kept rows apart: the number of devices the batch is sharded over under
      `jit` (so no device gathers another's rows); 1 under `pmap` or on one device.

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
  row_groups: int = 1

  def __post_init__(self):
    resolve_skip(self.skip, self.mode)
    options.check("scaling rule", self.scaling, options.Scaling)
    super().__post_init__()

  @nn.compact
  def __call__(self, x, *, train: bool, survival_prob: Any = 1.0,
               gate: jax.Array | bool | None = None, key: jax.Array | None = None):
    residual = self.shortcut(x) if self.shortcut is not None else x
    batch = x.shape[0]
    subset = subset_rows(self.mode, train, survival_prob, batch, self.row_groups)
    scale = branch_scale(survival_prob, train, self.scaling,
                         None if subset is None else subset / (batch // self.row_groups))
    gate = training_gate(gate, key, train=train, survival_prob=survival_prob,
                         mode=self.mode, batch=batch, row_groups=self.row_groups,
                         subset=subset)

    def finish(delta):
      out = residual if delta is None else residual + delta.astype(residual.dtype)
      return self.activation(out) if self.activation is not None else out

    if gate is None or gate is True or self.is_initializing():
      return finish(scaled(self.branch(x), scale))
    if gate is False:
      return finish(None)

    gate = jnp.asarray(gate, jnp.bool_)
    how = resolve_skip(self.skip, self.mode, static_drop_rate(survival_prob))
    if how == "cond":
      return nn.cond(gate,
                     lambda branch, h: finish(scaled(branch(h), scale)),
                     lambda branch, h: finish(None),
                     self.branch, x)
    if how == "gather" and gate.ndim == 1:
      if self.is_mutable_collection("batch_stats") and _has_batch_stats(self.branch):
        refuse_gather_with_batch_statistics()
      return finish(rows.run_kept(
          lambda branch, h: scaled(branch(h), scale), self.branch, x, gate,
          groups=self.row_groups, subset=subset,
          switch=lambda i, fns, branch, h: nn.switch(i, fns, branch, h),
          remat=nn.checkpoint))
    y = (_run_keeping_statistics(self.branch, x, gate)
         if self.mode not in options.ROW_MODES else self.branch(x))
    return finish(masked(y, gate, scale))


def _has_batch_stats(module: nn.Module) -> bool:
  """Whether a bound module (a branch) holds batch statistics."""
  return bool(module.variables.get("batch_stats"))


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

  mapped = nn.map_variables(lambda mdl, h: mdl(h), "batch_stats", trans_in_fn=remember,
                            trans_out_fn=lambda new: keep_where_open(gate, new,
                                                                     before["stats"]),
                            mutable=True)
  return mapped(branch, x)

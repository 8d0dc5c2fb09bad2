"""The stochastic residual in Flax NNX: `sdnet.residual`'s, native to NNX.

    train:  H_l = act( shortcut(H_{l-1}) + b_l * s_train * f_l(H_{l-1}) ),  b_l ~ Bern(p_l)
    eval:   H_l = act( shortcut(H_{l-1}) + s_eval * f_l(H_{l-1}) )

The modes (`mode=`: one gate per mini-batch, per example, or a fixed subset), skip methods
(`skip=`: "cond", "gather", "mask", "auto") and scaling rules (`scaling=`) are those of the
Linen `sdnet.residual.StochasticResidual`, computed by the same functions (`sdnet.gates`,
`sdnet.residual`'s `subset_rows`, `training_gate`, `branch_scale`, `masked`,
`keep_where_open`, `sdnet.rows.run_kept`); only the transforms are NNX's (`nnx.cond`,
`nnx.switch`, `nnx.remat`). The tests carry parameters and statistics between the two
and compare outputs, gradients and new statistics.

NNX conventions: the branch and shortcut are NNX modules (or functions) given at
construction; parameters are `nnx.Param`, BatchNorm statistics `nnx.BatchStat`;
`model.train()` / `model.eval()` switch every residual (its `deterministic` attribute, as
`nnx.Dropout`'s) together with the BatchNorms; the gate comes from `key=` at the call or,
without one, from the module's `rngs` stream ("gates" of an `nnx.Rngs`).

    block = StochasticResidual(nnx.Sequential(nnx.Linear(32, 32, rngs=rngs), nnx.gelu),
                               survival_prob=0.8, mode="row", skip="gather",
                               scaling="inverted", rngs=rngs)
    y = block(x)                        # training: gates drawn from rngs.gates()
    y = block(x, key=jax.random.key(1))  # or from an explicit key
    block.eval(); y = block(x)          # evaluation: every branch runs
"""

from __future__ import annotations

from typing import Any, Callable

from flax import nnx
import jax
import jax.numpy as jnp

from sdnet import options
from sdnet import residual as residual_lib
from sdnet import rows


class StochasticResidual(nnx.Module):
  """act(shortcut(x) + gate * scale * branch(x)) with the paper's stochastic depth.

  Args:
    branch: the residual function f_l, an NNX module (or function) called as branch(x).
    shortcut: the shortcut path (a module or function); identity if None.
    activation: applied after the addition (post-activation ResNets); none if None.
    survival_prob: p_l (a Python float; a call's `survival_prob=` overrides it, e.g. a
      traced p_l inside `nnx.scan`).
    skip, scaling, mode, row_groups: as `sdnet.residual.StochasticResidual`'s.
    branch_policy: a remat policy for the branch where it runs inside the conditional
      (skip="cond"), e.g. `sdnet.backend.branch_policy`'s; None keeps every residual.
    deterministic: True evaluates (every branch runs, scaled by s_eval); `model.train()`
      and `model.eval()` set it.
    rngs: an `nnx.Rngs` (or stream) whose `rng_collection` stream, forked for this
      module as `nnx.Dropout` does, draws the gates when a training call gives neither
      `key=` nor `gate=`.
  """

  def __init__(self, branch: Callable[[jax.Array], jax.Array], *,
               shortcut: Callable[[jax.Array], jax.Array] | None = None,
               activation: Callable[[jax.Array], jax.Array] | None = None,
               survival_prob: float = 1.0, skip: options.Skip = "auto",
               scaling: options.Scaling = "paper", mode: options.Mode = "batch",
               row_groups: int = 1, branch_policy: Callable | None = None,
               deterministic: bool = False,
               rngs: nnx.Rngs | nnx.RngStream | None = None,
               rng_collection: str = "gates"):
    residual_lib.resolve_skip(skip, mode)
    options.check("scaling rule", scaling, options.Scaling)
    self.branch = branch
    self.shortcut = shortcut
    self.activation = activation
    self.survival_prob = survival_prob
    self.skip, self.scaling, self.mode, self.row_groups = skip, scaling, mode, row_groups
    self.branch_policy = branch_policy
    self.deterministic = deterministic
    if isinstance(rngs, nnx.Rngs):  # as nnx.Dropout: a stream of its own
      self.rngs = rngs[rng_collection].fork()
    elif isinstance(rngs, nnx.RngStream):
      self.rngs = rngs.fork()
    else:
      self.rngs = nnx.data(None)

  def __call__(self, x, *, gate: jax.Array | bool | None = None,
               key: jax.Array | None = None, survival_prob: Any = None,
               deterministic: bool | None = None):
    """The block's output; `gate` (bool scalar, or (batch,) in the row modes) or `key`
    decide a training call (else the `rngs` stream draws the key); a closed `gate` at
    evaluation drops the block too (a chosen sub-network)."""
    train = not (self.deterministic if deterministic is None else deterministic)
    prob = self.survival_prob if survival_prob is None else survival_prob
    residual = self.shortcut(x) if self.shortcut is not None else x
    batch = x.shape[0]
    if (train and key is None and gate is None and self.rngs is not None
        and residual_lib.static_drop_rate(prob) != 0):
      key = self.rngs()
    subset = residual_lib.subset_rows(self.mode, train, prob, batch, self.row_groups)
    scale = residual_lib.branch_scale(
        prob, train, self.scaling,
        None if subset is None else subset / (batch // self.row_groups))
    gate = residual_lib.training_gate(gate, key, train=train, survival_prob=prob,
                                      mode=self.mode, batch=batch,
                                      row_groups=self.row_groups, subset=subset)

    def finish(delta):
      out = residual if delta is None else residual + delta.astype(residual.dtype)
      return self.activation(out) if self.activation is not None else out

    if gate is None or gate is True:
      return finish(residual_lib.scaled(self.branch(x), scale))
    if gate is False:
      return finish(None)

    gate = jnp.asarray(gate, jnp.bool_)
    how = residual_lib.resolve_skip(self.skip, self.mode,
                                    residual_lib.static_drop_rate(prob))
    if how == "cond":
      run = (lambda branch, h: branch(h)) if self.branch_policy is None else nnx.remat(
          lambda branch, h: branch(h), policy=self.branch_policy)
      return nnx.cond(gate,
                      lambda branch, h: finish(residual_lib.scaled(run(branch, h), scale)),
                      lambda branch, h: finish(None),
                      self.branch, x)
    if how == "gather" and gate.ndim == 1:
      if train and _batch_statistics(self.branch):
        residual_lib.refuse_gather_with_batch_statistics()
      return finish(rows.run_kept(
          lambda branch, h: residual_lib.scaled(branch(h), scale), self.branch, x, gate,
          groups=self.row_groups, subset=subset,
          switch=lambda i, fns, branch, h: nnx.switch(i, fns, branch, h),
          remat=nnx.remat))
    if self.mode in options.ROW_MODES or not _batch_statistics(self.branch):
      y = self.branch(x)
    else:
      y = _run_keeping_statistics(self.branch, x, gate)
    return finish(residual_lib.masked(y, gate, scale))


def _batch_statistics(branch) -> dict:
  """The branch's BatchNorm statistics as a pure dict (empty for a function or none)."""
  if not isinstance(branch, nnx.Module):
    return {}
  return nnx.to_pure_dict(nnx.state(branch, nnx.BatchStat))


def _run_keeping_statistics(branch: nnx.Module, x, gate):
  """branch(x), its new statistics kept only where `gate` is open
  (`sdnet.residual.keep_where_open`)."""
  before = _batch_statistics(branch)
  y = branch(x)
  state = nnx.state(branch, nnx.BatchStat)
  nnx.replace_by_pure_dict(state, residual_lib.keep_where_open(
      gate, nnx.to_pure_dict(state), before))
  nnx.update(branch, state)
  return y

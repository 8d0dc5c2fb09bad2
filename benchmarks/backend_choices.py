r"""The plain network's step under each candidate choice of `sdnet.backend`, beside the
network with every gate open, timed interleaved in one process.

  python -m benchmarks.backend_choices --cases=56:128,110:128 --repeats=7 --calls=1

The plain network (p_L = 1: no gate, no conditional) computes what the network with every
gate open computes, without the conditionals; it must not be slower. Variants:
  plain             today's choices (`backend.branch_policy`, `backend.unroll_stages`)
  plain keeps all   its branches keep every residual for the backward pass (no remat
                    policy; on CPU today they keep only their convolutions' outputs)
  plain rolled      its stages run as loops (`lax.scan`, one block per iteration)
  plain unrolled    its stages' scans fully unrolled, as a gated stage's
  plain without reduce_precision
                    today's choices, traced with JAX's remat not marking its saved
                    residuals with `reduce_precision` (jax PR 22244; an identity on
                    float32 that XLA:CPU runs as a copy): what those copies cost. It
                    patches a private JAX function while the variant is traced; a
                    measurement, not a choice the library can make
  open without reduce_precision
                    the open network traced the same way: whether the copies cost the
                    open step as much
  open              the stochastic network with every gate forced open (`ForcedGates`)
Each is the experiments' own compiled step (`benchmarks.timing.make_variant`); the
table's "/open" column is the ratio to "open". benchmarks/README.md keeps the figures.
"""

from __future__ import annotations

import contextlib
import functools

from absl import app
from absl import flags
import jax
from jax._src import ad_checkpoint  # for the variant without remat's reduce_precision
import numpy as np

from benchmarks import common
from benchmarks import timing
from sdnet import backend

FLAGS = flags.FLAGS


@contextlib.contextmanager
def choices(keeps_all: bool, unrolled: bool | None, reduce_precision: bool = True):
  """Today's `sdnet.backend` choices for plain branches and stages, with a plain branch
  keeping every residual (no remat policy) and/or a plain stage's scan fully unrolled
  (True) or rolled (False) instead of as `backend.unroll_stages` says (None), and
  without remat's `reduce_precision` on saved residuals (`reduce_precision=False`),
  while a variant is traced and compiled."""
  policy, unroll = backend.branch_policy, backend.unroll_stages
  marks_residuals = getattr(ad_checkpoint, "_insert_reduce_precision", None)
  if not reduce_precision:
    if marks_residuals is None:
      raise SystemExit(f"JAX {jax.__version__} has no jax._src.ad_checkpoint."
                       "_insert_reduce_precision to leave out; drop the variants "
                       "'... without reduce_precision'.")
    ad_checkpoint._insert_reduce_precision = lambda jaxpr, num_res: jaxpr
  if keeps_all:
    backend.branch_policy = lambda name, gated: policy(name, gated) if gated else None
  if unrolled is not None:
    backend.unroll_stages = lambda length, remat, gated=False: (
        unroll(length, remat, gated) if gated else unroll(length, remat, True) if unrolled
        else 1)
  try:
    yield
  finally:
    backend.branch_policy, backend.unroll_stages = policy, unroll
    if marks_residuals is not None:
      ad_checkpoint._insert_reduce_precision = marks_residuals


# name: (arguments of `choices`, whether it is the open network rather than the plain one)
VARIANTS = {"plain": ((False, None), False), "plain keeps all": ((True, None), False),
            "plain rolled": ((False, False), False), "plain unrolled": ((False, True), False),
            "plain without reduce_precision": ((False, None, False), False),
            "open without reduce_precision": ((False, None, False), True)}


def measure(cases, repeats: int, calls: int, variants=tuple(VARIANTS)) -> list[dict]:
  rows = []
  for depth, batch in cases:
    made = {}
    for name in variants:
      choice, is_open = VARIANTS[name]
      with choices(*choice):
        made[name] = timing.make_variant(depth, batch, 0.5 if is_open else 1.0, "auto", 1,
                                         forced_gates=True if is_open else None)
    made["open"] = timing.make_variant(depth, batch, 0.5, "auto", 1, forced_gates=True)
    times = common.interleave({name: functools.partial(timing.run_variant, v, calls, 1)
                               for name, v in made.items()}, repeats)
    for name, variant in made.items():
      variant["times"] = times[name]
    base = np.median(made["plain" if "plain" in made else "open"]["times"])
    case_rows = [common.row(depth, batch, name, v["times"], base, v["compile_s"],
                            v["memory_gib"]) for name, v in made.items()]
    rows += common.with_ratio_to(case_rows, "open")
  return rows


def main(argv):
  del argv
  common.prepare_host(FLAGS.cores)
  print(f"JAX {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind}")
  rows = measure(common.cases(FLAGS.cases, FLAGS.small), FLAGS.repeats, FLAGS.calls,
                 tuple(FLAGS.variants))
  print(common.format_table(rows))
  if FLAGS.out:
    common.write_json(FLAGS.out, {"jax": jax.__version__, "rows": rows})


if __name__ == "__main__":
  common.define_flags()
  flags.DEFINE_list("variants", list(VARIANTS), f"Variants to time beside the open "
                    f"network, of {list(VARIANTS)}.")
  flags.register_validator("variants", lambda names: set(names) <= set(VARIANTS),
                           f"--variants takes names of {list(VARIANTS)}, comma-separated.")
  app.run(main)

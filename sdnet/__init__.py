"""sdnet: Deep Networks with Stochastic Depth (Huang et al., ECCV 2016) in JAX/Flax.

The library: survival schedules (`survival`), key-drawn gates (`gates`), a stochastic
residual around any Flax branch (`StochasticResidual`), per-example skipping (`rows`),
stage compaction (`compaction`), stacks of blocks as scans (`stacks`), ResNets (`models`,
which re-exports the others), Vision Transformers (`vit`), ConvNeXts (`convnext`), and
the per-backend policy (`backend`). It needs jax, flax and numpy only; the paper's
training protocol lives in the repository's `experiments/`. The same residual and ResNets
in Flax NNX are `sdnet.nnx`, imported on its own (`from sdnet import nnx as sdnnx`:
`flax.nnx` imports optax, which flax installs).
"""

from sdnet import (backend, compaction, convnext, gates, models, options, residual, rows,
                   stacks, survival, vit)
from sdnet.residual import StochasticResidual

__version__ = "0.2.0"

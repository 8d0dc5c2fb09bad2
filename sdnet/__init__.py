"""sdnet: Deep Networks with Stochastic Depth (Huang et al., ECCV 2016) in JAX/Flax."""

from sdnet import compaction, gates, models, residual, survival
from sdnet.residual import StochasticResidual

__version__ = "0.1.0"

"""sdnet in Flax NNX: the stochastic residual and the ResNets, native NNX modules with the
Linen modules' math (`sdnet.residual`, `sdnet.gates`, `sdnet.survival`, `sdnet.rows`).

    from flax import nnx
    from sdnet import nnx as sdnnx

    model = sdnnx.CifarResNet110(num_classes=10, rngs=nnx.Rngs(0))

One namespace beside `sdnet.models` (Linen), as flax keeps `flax.nnx` beside
`flax.linen`: the same names for the same networks in both.
"""

from sdnet.nnx.residual import StochasticResidual
from sdnet.nnx.resnet import (
    BasicBranch, Block, BottleneckBranch, CifarResNet, CifarResNet8, CifarResNet20,
    CifarResNet32, CifarResNet44, CifarResNet56, CifarResNet110, CifarResNet152,
    CifarResNet1202, ImageNetResNet, ImageNetResNet50, ImageNetResNet101,
    ImageNetResNet152, ProjectionShortcut, ResNet, from_linen, load_linen)

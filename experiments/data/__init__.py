"""The data sources of the paper's protocol, registered by name (`config.dataset`).

`build(config)` makes the source a config names; `register(name)` adds one (see
`source`). Built in: cifar10, cifar100, svhn_cropped (TFDS), folder (an image folder
in memory) and synthetic; imagenet_folder and imagenet2012 (TFDS), streamed.
"""

from experiments.data import folder  # noqa: F401  (registers its source)
from experiments.data import imagenet  # noqa: F401  (registers its sources)
from experiments.data import synthetic  # noqa: F401  (registers its source)
from experiments.data import tfds_sources  # noqa: F401  (registers its sources)
from experiments.data.source import Shard
from experiments.data.source import Source
from experiments.data.source import build
from experiments.data.source import register
from experiments.data.source import registered


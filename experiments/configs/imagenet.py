r"""The paper's ImageNet runs (Huang et al., 2016, Sec. 4), on fb.resnet.torch's protocol.

  python -m experiments.imagenet --config=experiments/configs/imagenet.py:resnet152 \
      --workdir=runs/imagenet152_sd [--config.data_dir=TFDS_DATA_DIR]
  python -m experiments.imagenet --config=experiments/configs/imagenet.py:resnet152,constant \
      --workdir=runs/imagenet152
  python -m experiments.imagenet --config=experiments/configs/imagenet.py:quick \
      --workdir=runs/imagenet_quick --config.data_dir=ROOT   # ROOT/train, ROOT/val

Argument: a network, then optionally ",constant" (p_L = 1) and ",epochs120":
  resnet152     the paper's: 152-layer bottleneck ResNet, projection shortcuts, linear
                decay to p_L = 0.5 over its 50 blocks. 90 epochs: 23.38% top-1
                validation error (constant depth 23.06%); ",epochs120" (learning rate
                lowered once more at epoch 90): 21.98% (21.78%).
  resnet50, resnet101   the same recipe on the smaller networks (no paper number).
  quick         a one-minute CPU run on a small image folder (e.g. a generated one,
                `python -m benchmarks.imagenet_like`): ResNet-14, 64 px crops, 2 epochs.
Recipe (fb.resnet.torch): SGD, Nesterov momentum 0.9, weight decay 1e-4, batch 256,
learning rate 0.1 x batch / 256 divided by 10 every 30 epochs; top-1 and top-5 error on
the 50,000 validation images after every epoch. On TPU add --config.dtype=bfloat16.
"""
from experiments.configs import default

NETWORKS = {"resnet50": 50, "resnet101": 101, "resnet152": 152, "quick": 14}


def get_config(arg: str = "resnet152"):
  network, *variants = (part.strip() for part in arg.split(","))
  if network not in NETWORKS or any(v not in ("constant", "epochs120") for v in variants):
    raise ValueError(f"unknown ImageNet run {arg!r}: give one of {', '.join(NETWORKS)}, "
                     "optionally followed by ',constant' and ',epochs120'.")
  config = default.get_config()
  config.dataset = "imagenet2012"
  config.model.family, config.model.depth = "imagenet", NETWORKS[network]
  config.batch_size = 256
  # 0.1 x batch / 256, following --config.batch_size.
  config.learning_rate = config.get_ref("batch_size").to_float() * (0.1 / 256)
  config.epochs = 120 if "epochs120" in variants else 90
  config.lr_drop_fractions = tuple(e / config.epochs for e in range(30, config.epochs, 30))
  config.eval_batch_size = 512
  config.log_every_steps = 100
  config.image_size, config.eval_resize = 224, 256
  if network == "quick":
    config.dataset = "imagenet_folder"
    config.batch_size, config.eval_batch_size = 32, 64
    config.epochs, config.lr_drop_fractions = 2, (0.5,)
    config.image_size, config.eval_resize = 64, 73  # 73 / 64 ~ 256 / 224
    config.log_every_steps = 5
  if "constant" in variants:
    config.survival.p_last = 1.0
  return config

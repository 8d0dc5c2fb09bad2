r"""Drop path as the field trains it: a ViT or a ConvNeXt on CIFAR-10 (or an image folder).

  python -m experiments.cifar --config=experiments/configs/drop_path.py:vit --workdir=runs/vit
  python -m experiments.cifar --config=experiments/configs/drop_path.py:convnext,subset \
      --workdir=runs/convnext_subset
  python -m experiments.cifar --config=experiments/configs/drop_path.py:vit,quick \
      --workdir=runs/vit_quick

Argument: a model, then optionally a method and ",quick":
  vit        ViT-S with 4 x 4 patches (64 tokens at 32 px; DeiT-S's width, depth and heads),
             drop_path_rate 0.1 (DeiT-S's).
  convnext   ConvNeXt-T, drop_path_rate 0.1 (ConvNeXt-T's); at 32 px its stages run at
             8, 4, 2 and 1 px.
  method     how the per-example gates are drawn and dropped (the same math for the first
             two; `sdnet.options`): "auto" (the default: `sdnet.backend.auto_skip`),
             "gather" (the branch runs on the kept examples only), "mask" (timm's), or
             "subset" (DINOv2's fixed subset of round(p_l * B) examples, gathered).
  quick      the tests' run: the tiny model of the family, batch 8, one epoch of the
             generated images (`synthetic`).
The recipe of DeiT (Touvron et al., 2021) and ConvNeXt (Liu et al., 2022) where the data
layer can express it: AdamW (beta 0.9, 0.999), weight decay 0.05 on the kernels, batch
128 at learning rate 1e-3, 5 epochs of linear warm-up from 1e-6, then a cosine decay to
1e-5 over 200 epochs, label smoothing 0.1, per-example drop path with timm's linear
schedule and inverted scaling. Augmentation: the CIFAR crop and flip of the paper's runs
(no RandAugment, Mixup, CutMix or random erasing), so expect lower accuracy than those
papers' CIFAR fine-tuning figures.
"""
from experiments.configs import default

MODELS = {"vit": {"model.family": "vit", "model.size": "s", "model.patch_size": 4},
          "convnext": {"model.family": "convnext", "model.size": "t"}}
METHODS = {"auto": {}, "gather": {"skip": "gather"}, "mask": {"skip": "mask"},
           "subset": {"survival.mode": "subset", "skip": "gather"}}
RECIPE = {
    "survival.mode": "row", "survival.drop_path_rate": 0.1, "survival.scaling": "inverted",
    "optimizer": "adamw", "schedule": "cosine", "learning_rate": 1e-3,
    "warmup_epochs": 5.0, "warmup_learning_rate": 1e-6, "min_learning_rate": 1e-5,
    "weight_decay": 0.05, "label_smoothing": 0.1, "epochs": 200, "batch_size": 128,
}
QUICK = {"dataset": "synthetic", "model.size": "test", "validation_size": 8,
         "batch_size": 8, "eval_batch_size": 16, "epochs": 1, "warmup_epochs": 0.5,
         "log_every_steps": 2}


def get_config(arg: str = "vit"):
  name, *rest = (part.strip() for part in arg.split(","))
  quick = "quick" in rest
  methods = [part for part in rest if part != "quick"]
  if name not in MODELS or len(methods) > 1 or any(m not in METHODS for m in methods):
    raise ValueError(f"unknown drop-path run {arg!r}: give one of {', '.join(MODELS)}, "
                     f"optionally followed by one of ,{' ,'.join(METHODS)} and ',quick'.")
  values = {**RECIPE, **MODELS[name], **METHODS[methods[0] if methods else "auto"],
            **(QUICK if quick else {})}
  return default.override(default.get_config(), values)

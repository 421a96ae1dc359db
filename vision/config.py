"""Configuration of the vision track (``python vision/train.py``): defaults for the embedded
Fashion-MNIST subset; configs/vision_*.yaml hold the paper's ImageNet recipes.
"""

from __future__ import annotations

from dataclasses import dataclass

from strlowrank.training.config import option
from strlowrank.training.controller_config import ControllerConfig
from strlowrank.training.train_config import TrainConfig
from vision.models import MODELS

METHODS = ("dense", "str", "gmp", "uniform", "transfer", "group_norm", "group_reg")
GRANULARITIES = ("layer", "channel", "global", "structured")


@dataclass
class VisionDataConfig:
    name: str = option(
        "fashion_mnist",
        "fashion_mnist | imagenet | cifar10 | imagefolder",
        choices=("fashion_mnist", "imagenet", "cifar10", "imagefolder"),
    )
    root: str | None = option(None, "dataset root (default: the shipped Fashion-MNIST subset)")
    image_size: int | None = option(
        None, "input side in pixels (default: 28 Fashion-MNIST, 32 CIFAR, 224 others)", min=8
    )
    augment: bool = option(True, "crop + flip training augmentation (small-image datasets)")
    skip_bad_images: bool = option(False, "drop unreadable images (with a count), don't fail")


@dataclass
class VisionModelConfig:
    name: str = option("resnet20", "network (the vision.models registry)", choices=MODELS)
    width: float = option(1.0, "width multiplier (MobileNetV1, CIFAR ResNets)", min=0.05)
    init_from: str | None = option(
        None,
        "initial weights: a dense run's checkpoint.pt or a torchvision state_dict file; a "
        "structured STR run's checkpoint.pt starts from the smaller network it learned",
    )


@dataclass
class MethodConfig:
    """How the network is sparsified."""

    name: str = option(
        "str", "dense | str | gmp | uniform | transfer | group_norm | group_reg", choices=METHODS
    )
    s_init: float = option(-10.0, "STR: initial threshold parameter; g(s_init) is the threshold")
    granularity: str = option(
        "layer",
        "STR threshold: layer | channel | global (on weights) | structured (on each conv "
        "output channel, its BatchNorm's gamma or filter norm: removes channels)",
        choices=GRANULARITIES,
    )
    gate: str = option(
        "soft",
        "structured STR: soft (kept channels shrink by the threshold, as in STR) | hard (kept "
        "channels pass whole; the threshold trains with the soft threshold's gradient)",
        choices=("soft", "hard"),
    )
    streams: str = option(
        "learn",
        "structured STR: learn (threshold every conv) | keep (no threshold on convs that write a "
        "residual stream with others: only the blocks' inner widths are learned)",
        choices=("learn", "keep"),
    )
    keep_first_dense: bool = option(False, "leave the stem conv unsparsified")
    dense_layers: list[str] = option(
        help="layers left unsparsified, as name patterns (fnmatch over qualified module names), "
        'e.g. ["fc"] or, on a ResNet-20, ["conv1", "*.conv2", "*.downsample.*"] (the convs that '
        "--method.streams keep leaves unthresholded)",
        factory=list,
    )
    keep_last_dense: bool = option(False, "leave the classifier unsparsified")
    final_sparsity: float = option(0.9, "gmp/uniform: final overall sparsity", min=0.0, max=0.999)
    gmp_scope: str = option(
        "global", "gmp: global | layer magnitude ranking", choices=("global", "layer")
    )
    start_epoch: float = option(0.0, "gmp/uniform/transfer: epoch where pruning starts", min=0.0)
    end_epoch: float | None = option(
        None, "... and where it ends (default 75% of training)", min=0.0
    )
    update_every: int = option(20, "gmp/uniform/transfer: steps between mask updates", min=1)
    budget: str | None = option(None, "transfer: budget.csv of an STR run (per-layer densities)")
    final_macs: float = option(
        0.5, "group_norm: MACs kept by the one-shot channel pruning, a fraction", min=0.001, max=1.0
    )
    group_reg: float = option(
        5e-4,
        "group_reg: coefficient of torch-pruning's group regularization (sparse training of the "
        "dense network before a group_norm prune)",
        min=0.0,
    )


@dataclass
class VisionConfig:
    out: str = option("runs/vision", "run folder")
    data: VisionDataConfig = option(factory=VisionDataConfig)
    model: VisionModelConfig = option(factory=VisionModelConfig)
    method: MethodConfig = option(factory=MethodConfig)
    controller: ControllerConfig = option(factory=ControllerConfig)
    train: TrainConfig = option(
        factory=lambda: TrainConfig(
            epochs=15,
            batch_size=128,
            optimizer="sgd",
            lr=0.1,
            momentum=0.9,
            weight_decay=5e-4,
            threshold_decay=0.008,
            warmup_epochs=1.0,
            label_smoothing=0.1,
            # the thresholds move on the run's clock: 60 = 0.1 per step x the default's 600 steps,
            # so a run of any length makes the same threshold trajectory (docs/METHOD.md)
            role_lr_per_run={"threshold": 60.0},
            # BN statistics re-estimated over 50 batches at the end: on short runs the thresholds
            # move faster than BN's running averages follow (docs/METHOD.md)
            bn_recalibration=50,
        )
    )

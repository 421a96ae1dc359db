"""The training config (the ``train.*`` section) and its rules.

:class:`TrainConfig` holds the optimization and run settings both tracks share; the functions
here turn it into what the engine needs: each role's weight decay (:func:`role_decays`), each
role's own peak lr (:func:`role_lrs`, eta / T on the run's clock, docs/METHOD.md), and the
channels_last choice (:func:`use_channels_last`). The tracks' configs import this module, not the
training loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from strlowrank.training.config import ConfigError, option
from strlowrank.training.optim import ALGORITHMS, ROLES


@dataclass
class TrainConfig:
    """Optimization and run settings shared by both tracks (the ``train.*`` config section)."""

    epochs: int = option(10, "number of training epochs", min=1)
    batch_size: int = option(64, "global batch size (split evenly over DDP processes)", min=1)
    optimizer: str = option("sgd", "sgd | adam | adamw", choices=ALGORITHMS)
    lr: float = option(0.1, "peak learning rate (after warm-up)", min=0.0)
    momentum: float = option(0.9, "SGD momentum", min=0.0, max=1.0)
    nesterov: bool = option(False, "Nesterov momentum for SGD")
    weight_decay: float = option(5e-4, "weight decay (lambda) on weights", min=0.0)
    threshold_decay: float | None = option(
        None, "weight decay on STR thresholds s (the sparsity knob); default: weight_decay", min=0.0
    )
    spectrum_decay: float | None = option(
        None,
        "weight decay on singular values of STR low-rank matrices (the rank knob); "
        "default: weight_decay",
        min=0.0,
    )
    norm_decay: float | None = option(
        None, "weight decay on norm weights and biases; default: weight_decay", min=0.0
    )
    role_decay: dict[str, float] = option(
        factory=dict,
        help="weight decay of a role without its own field, e.g. {factor: 0.0} "
        "(weight, threshold, spectrum, norm_bias: train.weight_decay, threshold_decay, "
        "spectrum_decay, norm_decay)",
        min=0.0,
        keys=ROLES,
    )
    role_lr: dict[str, float | None] = option(
        factory=dict,
        help="peak per-step lr of a role (absolute, not a multiple of train.lr; the "
        "same warm-up + cosine shape), e.g. {spectrum: 30.0}; null: train.lr",
        min=0.0,
        keys=ROLES,
    )
    role_lr_per_run: dict[str, float | None] = option(
        factory=dict,
        help="lr of a role in units of the whole run: its peak per-step lr is this "
        "value / the run's optimizer steps (absolute, not a multiple of train.lr), so the role "
        "moves the same way over training progress at any data size, epochs or batch "
        "(docs/METHOD.md, run-length invariance), e.g. {threshold: 60}; null takes a role off "
        "the run's clock",
        min=0.0,
        keys=ROLES,
    )
    role_optimizer: dict[str, str] = option(
        factory=dict,
        help="another optimizer for some roles, e.g. {threshold: sgd}",
        choices=ALGORITHMS,
        keys=ROLES,
    )
    warmup_epochs: float = option(0.0, "linear warm-up epochs before the cosine decay", min=0.0)
    min_lr_ratio: float = option(0.0, "final lr as a fraction of the peak", min=0.0, max=1.0)
    label_smoothing: float = option(0.0, "label smoothing of the training loss", min=0.0, max=1.0)
    clip_grad: float = option(0.0, "clip the gradient norm to this value (0: off)", min=0.0)
    amp: str = option(
        "auto",
        "auto (bf16 on CUDA, off on CPU) | bf16 | fp16 | off",
        choices=("auto", "bf16", "fp16", "off"),
    )
    channels_last: bool | str = option(
        "auto",
        "channels_last memory format: auto (on for image batches on CUDA, off on CPU) | on | off;"
        " true / false mean on / off",
        choices=("auto", "on", "off", True, False),
    )
    seed: int = option(0, "random seed (model init, data order, augmentation)")
    device: str = option("auto", "auto | cpu | cuda", choices=("auto", "cpu", "cuda"))
    workers: int = option(0, "data loader worker processes", min=0)
    progress: bool = option(True, "show a progress bar")
    plots: bool = option(
        True, "write plots/ at the end (a sweep of many short runs can skip them: about 2 s each)"
    )
    bn_recalibration: int = option(
        0,
        "training batches over which BatchNorm running statistics are re-estimated (exact "
        "average, no gradient) before the final evaluation; pruning moves the weights faster than "
        "the running averages follow on short runs (0: off)",
        min=0,
    )

    def __post_init__(self) -> None:
        if isinstance(self.channels_last, bool):  # older configs: channels_last: true / false
            self.channels_last = "on" if self.channels_last else "off"
        check_one_spelling(self)


# roles whose decay has its own train.* field; train.role_decay covers the others
DECAY_FIELDS = {
    "weight": "weight_decay",
    "threshold": "threshold_decay",
    "spectrum": "spectrum_decay",
    "norm_bias": "norm_decay",
}


def check_one_spelling(cfg: TrainConfig) -> None:
    """Each role's decay and lr is set in one place: a role with its own decay field is not in
    ``role_decay``, and no role is in both ``role_lr`` and ``role_lr_per_run`` (a null in either
    does not count). Raises ConfigError naming both fields."""
    for role in cfg.role_decay:
        if role in DECAY_FIELDS:
            raise ConfigError(
                f"train.role_decay.{role}: set train.{DECAY_FIELDS[role]} instead "
                "(one field per decay)"
            )
    per_run = {role for role, eta in cfg.role_lr_per_run.items() if eta is not None}
    both = sorted(per_run & {role for role, lr in cfg.role_lr.items() if lr is not None})
    if both:
        raise ConfigError(
            f"train.role_lr.{both[0]} and train.role_lr_per_run.{both[0]} both set "
            "its lr; give one (null in role_lr_per_run takes it off the run's "
            "clock)"
        )


def role_decays(cfg: TrainConfig) -> dict[str, float]:
    """Weight decay per role: the named fields (None: ``weight_decay``) and ``role_decay``."""
    named = {role: getattr(cfg, name) for role, name in DECAY_FIELDS.items()}
    named = {role: cfg.weight_decay if d is None else d for role, d in named.items()}
    return {**cfg.role_decay, **named}


def role_lrs(cfg: TrainConfig, total_steps: int) -> dict[str, float]:
    """Peak per-step lr of every role that has its own (absolute, independent of ``cfg.lr``):
    ``role_lr`` as given, and eta / total_steps for every role in ``role_lr_per_run``.

    With eta_r = lr_r T fixed, the update of a role's parameter theta over training progress
    p = t / T is d theta / dp = -eta_r f(p) (grad + lambda_r theta) (f: the warm-up + cosine
    factor), which does not contain T: the same trajectory at 150 steps or 500,000.
    """
    check_one_spelling(cfg)
    lrs = {role: lr for role, lr in cfg.role_lr.items() if lr is not None}
    for role, eta in cfg.role_lr_per_run.items():
        if eta is not None:
            lrs[role] = eta / max(total_steps, 1)
    return lrs


def use_channels_last(choice: bool | str, device: torch.device, input_dim: int | None) -> bool:
    """Whether the model and its inputs run in the channels_last memory format.

    ``"on"`` / ``"off"`` (or True / False) as given; ``"auto"``: on for image batches (4-d
    inputs [N, C, H, W]) on CUDA, where cuDNN's NHWC convolutions (and bf16 tensor cores) are
    fastest, off on CPU and for other inputs (sequences [N, T, F]).
    """
    if isinstance(choice, bool) or choice in ("on", "off"):
        return choice in (True, "on")
    if choice != "auto":
        raise ValueError(f"channels_last must be auto | on | off, got {choice!r}")
    return torch.device(device).type == "cuda" and input_dim == 4

"""Optimizer parameter groups by role, and the warm-up + cosine learning-rate schedule.

STR has no sparsity loss: weight decay on the threshold parameters is what raises the thresholds
(PAPER.md section 1), so a "no decay on 1-D parameters" rule would silently switch STR off.
Each parameter therefore gets exactly one role and each role an explicit weight decay:

- ``threshold``: declared by the module that owns it (``param_roles = {"s": "threshold"}``);
- other declared roles (e.g. ``spectrum`` for singular values);
- ``norm_bias``: parameters of normalization layers and module attributes named ``bias``;
- ``weight``: everything else.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.utils.parametrize import ParametrizationList

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def parameter_roles(model: nn.Module) -> list[tuple[str, nn.Parameter, str]]:
    """(qualified name, parameter, role) for every trainable parameter, each listed once."""
    seen: set[int] = set()
    out = []
    for mname, module in model.named_modules():
        declared = getattr(module, "param_roles", {})
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if pname in declared:
                role = declared[pname]
            elif isinstance(module, NORM_TYPES) or pname == "bias":
                role = "norm_bias"
            elif isinstance(module, ParametrizationList) or p.dim() > 1:
                role = "weight"
            else:
                role = "norm_bias"
            out.append((f"{mname}.{pname}" if mname else pname, p, role))
    return out


def param_groups(
    model: nn.Module,
    weight_decay: float,
    role_decay: dict[str, float] | None = None,
    role_lr_scale: dict[str, float] | None = None,
) -> list[dict]:
    """One optimizer group per role present in ``model``.

    ``role_decay`` overrides the decay of a role (default: ``weight_decay`` for every role, as in
    the paper's released configs); ``role_lr_scale`` multiplies the base lr of a role. Each group
    carries ``role``, ``lr_scale`` and ``names`` keys for logging.
    """
    role_decay = role_decay or {}
    role_lr_scale = role_lr_scale or {}
    groups: dict[str, dict] = {}
    for name, p, role in parameter_roles(model):
        g = groups.setdefault(
            role,
            {
                "role": role,
                "params": [],
                "names": [],
                "weight_decay": float(role_decay.get(role, weight_decay)),
                "lr_scale": float(role_lr_scale.get(role, 1.0)),
            },
        )
        g["params"].append(p)
        g["names"].append(name)
    return list(groups.values())


def build_optimizer(
    groups: list[dict], name: str, lr: float, momentum: float = 0.9, nesterov: bool = False
) -> torch.optim.Optimizer:
    """SGD (coupled L2 decay, the paper's choice), Adam (coupled) or AdamW (decoupled)."""
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r} (sgd, adam, adamw)")


def describe_groups(groups: Iterable[dict]) -> str:
    """One line per group: role, tensors, elements, decay, lr scale."""
    lines = []
    for g in groups:
        n = sum(p.numel() for p in g["params"])
        lines.append(
            f"  {g['role']:<10} {len(g['params']):>4} tensors {n:>11,d} params  "
            f"decay {g['weight_decay']:.3g}  lr x{g['lr_scale']:g}"
        )
    return "optimizer groups:\n" + "\n".join(lines)


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """lr factor: linear warm-up to 1 over ``warmup_steps``, then cosine down to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule (call ``scheduler.step()`` after every optimizer step)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine_factor(s, warmup_steps, total_steps, min_ratio)
    )

"""Optimizer parameter groups by role, and the warm-up + cosine learning-rate schedule.

STR has no sparsity loss: weight decay on the threshold parameters is what raises the thresholds
(docs/METHOD.md section 1), so a "no decay on 1-D parameters" rule would silently switch STR off.
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

# normalization layers whose parameters (any shape) get the norm_bias role: torch's batch and
# instance norms (eager and lazy), their synchronized variant, group and layer norm
NORM_TYPES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.LazyBatchNorm1d,
    nn.LazyBatchNorm2d,
    nn.LazyBatchNorm3d,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LazyInstanceNorm1d,
    nn.LazyInstanceNorm2d,
    nn.LazyInstanceNorm3d,
    nn.GroupNorm,
    nn.LayerNorm,
)

# every role a parameter can have (the keys of train.role_decay, role_lr, role_optimizer, ...)
ROLES = ("weight", "norm_bias", "threshold", "spectrum", "factor")


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
    role_lr: dict[str, float] | None = None,
) -> list[dict]:
    """One optimizer group per role present in ``model``.

    ``role_decay`` overrides the decay of a role (default: ``weight_decay`` for every role, as in
    the paper's released configs); ``role_lr`` gives a role its own peak lr, the group's ``lr``
    (absolute; a group without one takes the optimizer's ``lr``, torch's rule for group
    defaults). Each group carries ``role`` and ``names`` keys.
    """
    role_decay = role_decay or {}
    role_lr = role_lr or {}
    groups: dict[str, dict] = {}
    for name, p, role in parameter_roles(model):
        g = groups.setdefault(
            role,
            {
                "role": role,
                "params": [],
                "names": [],
                "weight_decay": float(role_decay.get(role, weight_decay)),
            },
        )
        if role in role_lr:
            g["lr"] = float(role_lr[role])
        g["params"].append(p)
        g["names"].append(name)
    return list(groups.values())


ALGORITHMS = ("sgd", "adam", "adamw")


class RoleOptimizer(torch.optim.Optimizer):
    """One optimizer whose groups follow their own rule, ``group["algo"]`` in sgd | adam | adamw.

    The learned-rank recipe needs Adam for the factors but SGD for the thresholds (Adam's
    normalized step lets the task gradient on s win against any decay, so nothing is pruned).
    SGD: buf = mu buf + (g + lambda p), p -= lr buf (torch's SGD without dampening).
    Adam: torch's Adam; coupled L2 for "adam", decoupled decay p *= 1 - lr lambda for "adamw".
    """

    def __init__(
        self,
        groups: list[dict],
        lr: float,
        momentum: float = 0.9,
        nesterov: bool = False,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            betas=betas,
            eps=eps,
            weight_decay=0.0,
            algo="adam",
        )
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            update = self._sgd if group["algo"] == "sgd" else self._adam
            for p in group["params"]:
                if p.grad is not None:
                    update(p, group)
        return loss

    def _sgd(self, p: torch.Tensor, group: dict) -> None:
        d = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = d.clone()
        else:
            state["momentum_buffer"].mul_(group["momentum"]).add_(d)
        buf = state["momentum_buffer"]
        d = d.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
        p.add_(d, alpha=-group["lr"])

    def _adam(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros(())
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        grad, wd, lr = p.grad, group["weight_decay"], group["lr"]
        if wd and group["algo"] == "adamw":
            p.mul_(1 - lr * wd)
        elif wd:
            grad = grad.add(p, alpha=wd)
        (b1, b2), m, v = group["betas"], state["exp_avg"], state["exp_avg_sq"]
        state["step"] += 1
        t = float(state["step"])
        m.mul_(b1).add_(grad, alpha=1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (v.sqrt() / math.sqrt(1 - b2**t)).add_(group["eps"])
        p.addcdiv_(m, denom, value=-lr / (1 - b1**t))


def build_optimizer(
    groups: list[dict],
    name: str,
    lr: float,
    momentum: float = 0.9,
    nesterov: bool = False,
    role_algorithm: dict[str, str] | None = None,
) -> torch.optim.Optimizer:
    """SGD (coupled L2 decay, the paper's choice), Adam (coupled) or AdamW (decoupled).

    ``lr`` is the lr of every group without its own (:func:`param_groups` gives a role's group
    its ``lr``). A scheduler then multiplies each group's lr by the same factor (one shape).
    ``role_algorithm`` ({"threshold": "sgd"}) gives some roles another rule than ``name``;
    then a :class:`RoleOptimizer` runs every group with its own rule.
    """
    role_algorithm = role_algorithm or {}
    for g in groups:
        g["algo"] = role_algorithm.get(g["role"], name)
        if g["algo"] not in ALGORITHMS:
            raise ValueError(f"unknown optimizer {g['algo']!r} for role {g['role']} {ALGORITHMS}")
    if any(g["algo"] != name for g in groups):
        return RoleOptimizer(groups, lr, momentum, nesterov)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r} (sgd, adam, adamw)")


def describe_groups(groups: Iterable[dict]) -> str:
    """One line per group: role, tensors, elements, rule, decay, peak lr.

    The peak lr is the group's lr before any schedule (``initial_lr`` once one is attached;
    "base" before :func:`build_optimizer` for a group without its own lr).
    """
    lines = []
    for g in groups:
        n = sum(p.numel() for p in g["params"])
        lr = g.get("initial_lr", g.get("lr"))
        lines.append(
            f"  {g['role']:<10} {len(g['params']):>4} tensors {n:>11,d} params  "
            f"{g.get('algo', ''):<5} decay {g['weight_decay']:.3g}  "
            + (f"lr {lr:.3g}" if lr is not None else "lr base")
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

"""Optimizer groups by role and the warm-up + cosine schedule."""

import math

import pytest
import torch
import torchvision
from torch import nn

from strlowrank import apply_soft_threshold
from strlowrank.training.optim import (
    NORM_TYPES,
    build_optimizer,
    describe_groups,
    param_groups,
    parameter_roles,
    warmup_cosine_factor,
)


def test_every_parameter_exactly_once_with_intended_decay():
    model = torchvision.models.resnet18(num_classes=10)
    apply_soft_threshold(model, s_init=-5.0, granularity="layer")
    groups = param_groups(model, 5e-5, {"threshold": 1e-4, "norm_bias": 0.0})
    by_role = {g["role"]: g for g in groups}
    assert set(by_role) == {"weight", "threshold", "norm_bias"}
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    assert len(by_role["threshold"]["params"]) == 21
    assert len(by_role["weight"]["params"]) == 21  # 20 convs + fc weight (parametrized originals)
    assert by_role["threshold"]["weight_decay"] == 1e-4
    assert by_role["weight"]["weight_decay"] == 5e-5
    assert by_role["norm_bias"]["weight_decay"] == 0.0
    assert all(p.dim() == 1 for p in by_role["norm_bias"]["params"])  # BN weights, biases


def test_shared_global_threshold_listed_once():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    apply_soft_threshold(model, granularity="global")
    roles = [r for _, _, r in parameter_roles(model)]
    assert roles.count("threshold") == 1


def test_declared_roles_and_absolute_role_lr():
    class Spectral(nn.Module):
        param_roles = {"sigma": "spectrum"}

        def __init__(self):
            super().__init__()
            self.sigma = nn.Parameter(torch.ones(3))
            self.head = nn.Linear(3, 2, bias=False)

    model = Spectral()
    groups = param_groups(model, 0.1, {"spectrum": 0.0}, {"spectrum": 10.0})
    assert [g["role"] for g in groups] == ["spectrum", "weight"]
    assert [g.get("lr") for g in groups] == [10.0, None]  # the group's own lr, under its name
    assert "lr 10" in describe_groups(groups) and "lr base" in describe_groups(groups)
    for base in (1e-3, 0.5):  # the role's lr is its own; the base lr moves only the others
        groups = param_groups(model, 0.1, {"spectrum": 0.0}, {"spectrum": 10.0})
        opt = build_optimizer(groups, "adam", lr=base)
        assert [g["lr"] for g in opt.param_groups] == [10.0, base]
        assert opt.param_groups[0]["weight_decay"] == 0.0
    assert "lr 10" in describe_groups(groups) and "lr 0.5" in describe_groups(groups)


def test_warmup_cosine_values():
    assert warmup_cosine_factor(0, 10, 110, 0.0) == pytest.approx(0.1)
    assert warmup_cosine_factor(9, 10, 110, 0.0) == pytest.approx(1.0)
    assert warmup_cosine_factor(10, 10, 110, 0.0) == pytest.approx(1.0)
    assert warmup_cosine_factor(60, 10, 110, 0.0) == pytest.approx(0.5)
    assert warmup_cosine_factor(110, 10, 110, 0.1) == pytest.approx(0.1)
    quarter = 0.5 * (1 + math.cos(math.pi / 4))
    assert warmup_cosine_factor(35, 10, 110, 0.0) == pytest.approx(quarter)


@pytest.mark.parametrize(
    "algo,reference",
    [
        ("sgd", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01)),
        ("sgd_nesterov", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True)),
        ("adam", lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.01)),
        ("adamw", lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1)),
    ],
)
def test_role_optimizer_matches_torch(algo, reference):
    """Each rule of the mixed optimizer reproduces torch's optimizer step for step."""
    torch.manual_seed(0)
    ref_model = nn.Linear(5, 3)
    model = nn.Linear(5, 3)
    model.load_state_dict(ref_model.state_dict())
    ref_opt = reference(list(ref_model.parameters()))
    hyper = ref_opt.param_groups[0]
    group = {
        "params": list(model.parameters()),
        "algo": algo.split("_")[0],
        "lr": hyper["lr"],
        "weight_decay": hyper["weight_decay"],
        "nesterov": hyper.get("nesterov", False),
    }
    from strlowrank.training.optim import RoleOptimizer

    opt = RoleOptimizer([group], lr=hyper["lr"], momentum=hyper.get("momentum", 0.9))
    for _ in range(5):
        x = torch.randn(8, 5)
        for m, o in ((ref_model, ref_opt), (model, opt)):
            o.zero_grad()
            m(x).pow(2).sum().backward()
            o.step()
    for a, b in zip(ref_model.parameters(), model.parameters()):
        torch.testing.assert_close(a, b)


def test_role_algorithm_mix():
    model = torchvision.models.resnet18(num_classes=10)
    apply_soft_threshold(model)
    groups = param_groups(model, 1e-4)
    opt = build_optimizer(groups, "adam", 1e-3, role_algorithm={"threshold": "sgd"})
    algos = {g["role"]: g["algo"] for g in opt.param_groups}
    assert algos == {"weight": "adam", "threshold": "sgd", "norm_bias": "adam"}
    assert [g["lr"] for g in opt.param_groups] == [1e-3] * 3  # the base lr fills every group
    with pytest.raises(ValueError, match="unknown optimizer 'lbfgs'"):
        build_optimizer(param_groups(model, 1e-4), "adam", 1e-3, role_algorithm={"weight": "lbfgs"})


def test_norm_types_cover_every_torch_norm_layer():
    # torch's private base class appears only here, to check that the public list still covers it
    base = nn.modules.batchnorm._NormBase
    subclasses = [c for c in vars(nn).values() if isinstance(c, type) and issubclass(c, base)]
    assert len(subclasses) >= 13 and all(issubclass(c, NORM_TYPES) for c in subclasses)
    assert all(issubclass(c, base) or c in (nn.GroupNorm, nn.LayerNorm) for c in NORM_TYPES)
    # parameters of a norm layer are norm_bias whatever their shape (a 2-D LayerNorm weight)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.GroupNorm(2, 4),
        nn.InstanceNorm2d(4, affine=True),
        nn.LayerNorm([4, 4]),
    )
    roles = {name: role for name, _, role in parameter_roles(model)}
    assert roles.pop("0.weight") == "weight"
    assert set(roles.values()) == {"norm_bias"} and len(roles) == 9


def test_every_declared_role_is_a_known_role():
    from strlowrank.method import lowrank, pruning, rnn, threshold
    from strlowrank.training.optim import ROLES

    declared = [
        set(c.param_roles.values())
        for m in (lowrank, pruning, rnn, threshold)
        for c in vars(m).values()
        if isinstance(c, type) and hasattr(c, "param_roles")
    ]
    assert len(declared) >= 4 and set().union(*declared) <= set(ROLES)

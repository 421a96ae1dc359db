"""strlowrank.method.pruning: magnitude masks, GMP schedule and callback, budget transfer."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from strlowrank.method.pruning import (
    GMPCallback,
    MagnitudeMask,
    apply_masks,
    gmp_density,
    mask_density,
    masked_modules,
    read_budget_densities,
    remove_masks,
    set_global_density,
    set_layer_densities,
    uniform_densities,
)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    )


def _nnz(model: nn.Module) -> dict[str, int]:
    return {n: int(torch.count_nonzero(m.weight)) for n, m, _ in masked_modules(model)}


def test_apply_masks_is_identity_and_saved() -> None:
    model, x = _net(), torch.randn(2, 3, 8, 8)
    ref = model.eval()(x)
    assert apply_masks(model, exclude=("7",)) == ["0", "3"]
    assert apply_masks(model) == ["7"]  # already masked modules are skipped
    assert torch.equal(model(x), ref)
    mask = model[0].parametrizations.weight[0]
    assert isinstance(mask, MagnitudeMask) and mask.param_roles == {}
    assert not list(mask.parameters())
    assert "0.parametrizations.weight.0.mask" in model.state_dict()
    with pytest.raises(ValueError, match="no unparametrized"):
        apply_masks(model)


@pytest.mark.parametrize(
    ("step", "expected"),
    [(0, 1.0), (10, 1.0), (35, 0.1 + 0.9 * 0.5**3), (60, 0.1), (99, 0.1), (20, 0.1 + 0.9 * 0.8**3)],
)
def test_gmp_density_cubic(step: int, expected: float) -> None:
    """d_t = d_f + (d_i - d_f)(1 - (t - t0)/n)^3 with t0 = 10, n = 50, d_f = 0.1."""
    assert gmp_density(step, 10, 60, 0.1) == pytest.approx(expected, abs=1e-12)


def test_gmp_density_sparsity_form_and_initial() -> None:
    # sparsity form: s_t = s_f + (s_i - s_f)(1 - p)^3 with s_i = 0.5, s_f = 0.95, p = 0.25
    s_t = 0.95 + (0.5 - 0.95) * 0.75**3
    assert gmp_density(25, 0, 100, 0.05, initial_density=0.5) == pytest.approx(1 - s_t)
    assert gmp_density(-1, 0, 100, 0.05, initial_density=0.5) == 0.5


def test_set_layer_densities_exact_nnz() -> None:
    model = _net()
    apply_masks(model)
    before = model[3].weight.detach().abs().flatten().clone()
    kept = set_layer_densities(model, {"0": 0.5, "3": 0.1, "7": 1.0})
    assert kept == {"0": 108, "3": 115, "7": 80}
    assert _nnz(model) == kept
    survivors = model[3].weight.detach().flatten() != 0
    assert torch.equal(survivors.nonzero().flatten(), before.topk(115).indices.sort().values)
    with pytest.raises(KeyError, match="not masked"):
        set_layer_densities(model, {"1": 0.5})
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        set_layer_densities(model, {"0": 1.5})


def test_set_global_density() -> None:
    model = _net()
    apply_masks(model)
    total = sum(m.weight.numel() for _, m, _ in masked_modules(model))
    per_layer = set_global_density(model, 0.2)
    assert sum(_nnz(model).values()) == round(0.2 * total)
    assert mask_density(model) == pytest.approx(round(0.2 * total) / total)
    assert len(set(per_layer.values())) > 1  # one global threshold, different layer densities


def test_global_threshold_is_shared() -> None:
    model = _net()
    apply_masks(model)
    before = torch.cat([m.weight.detach().abs().flatten() for _, m, _ in masked_modules(model)])
    set_global_density(model, 0.3)
    after = torch.cat([m.weight.detach().abs().flatten() for _, m, _ in masked_modules(model)])
    assert float(before[after > 0].min()) >= float(before[after == 0].max())


def test_uniform_densities() -> None:
    d = uniform_densities(["conv1", "layer1.0.conv1", "fc"], 0.1, keep_dense=("conv1", "fc"))
    assert d == {"conv1": 1.0, "layer1.0.conv1": 0.1, "fc": 1.0}


def test_budget_transfer_roundtrip(tmp_path: Path) -> None:
    model = _net()
    apply_masks(model)
    target = {"0": 0.25, "3": 0.05, "7": 0.5}
    numel = {n: m.weight.numel() for n, m, _ in masked_modules(model)}
    nnz = {n: round(d * numel[n]) for n, d in target.items()}
    rows = [
        {
            "name": n,
            "kind": "conv2d",
            "numel": numel[n],
            "nnz": nnz[n],
            "sparsity": 1 - nnz[n] / numel[n],
        }
        for n in target
    ]
    rows.append(
        {"name": "total", "numel": sum(numel.values()), "nnz": sum(nnz.values()), "sparsity": 0.9}
    )
    pd.DataFrame(rows).to_csv(tmp_path / "budget.csv", index=False)
    densities = read_budget_densities(tmp_path / "budget.csv")
    assert set(densities) == set(target)
    set_layer_densities(model, densities)
    assert _nnz(model) == nnz
    pd.DataFrame(rows).drop(columns=["nnz", "numel"]).to_csv(tmp_path / "s.csv", index=False)
    assert read_budget_densities(tmp_path / "s.csv") == pytest.approx(
        {n: nnz[n] / numel[n] for n in target}
    )
    pd.DataFrame({"layer": ["a"], "nnz": [1]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match="bad.csv.*needs columns"):
        read_budget_densities(tmp_path / "bad.csv")


def test_masked_weights_stay_zero_under_sgd_with_decay() -> None:
    model = _net()
    apply_masks(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    callback = GMPCallback(0.3, start_epoch=0, end_epoch=1, update_every=2)
    callback.on_train_start(model, steps_per_epoch=4, epochs=2)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,))
    for step in range(8):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        callback.on_step_end(model, step)
        want = gmp_density(step, 0, 4, 0.3)
        for name, module, mask in masked_modules(model):
            original = module.parametrizations.weight.original
            assert torch.all(module.weight[~mask.mask] == 0), name
            assert torch.all(original[~mask.mask] == 0), name
            if step <= 4 and step % 2 == 0 or step == 4:
                assert mask.density() == pytest.approx(want, abs=1 / mask.mask.numel()), name
    assert callback.on_epoch_end(model, 1)["mask_density"] == pytest.approx(0.3, abs=0.01)
    assert callback.state_dict() == {"last_update": 4}


def test_gmp_callback_global_and_budget() -> None:
    model = _net()
    apply_masks(model)
    cb = GMPCallback(0.2, end_epoch=3, update_every=1, mode="global")
    cb.on_train_start(model, steps_per_epoch=2, epochs=3)
    assert (cb.start_step, cb.end_step) == (0, 5)  # clipped to the last step
    for step in range(6):
        cb.on_step_end(model, step)
    assert mask_density(model) == pytest.approx(0.2, abs=1e-3)
    model = _net()
    apply_masks(model)
    budget = GMPCallback(densities={"0": 0.5, "3": 0.1}, end_epoch=1, update_every=1)
    budget.on_train_start(model, 2, 2)
    for step in range(4):
        budget.on_step_end(model, step)
    assert _nnz(model) == {"0": 108, "3": 115, "7": 80}
    with pytest.raises(ValueError, match="final_density"):
        GMPCallback(0.5, densities={"0": 0.1})
    with pytest.raises(ValueError, match="no masks"):
        GMPCallback(0.5).on_train_start(_net(), 2, 2)


def test_remove_masks_keeps_outputs() -> None:
    model, x = _net().eval(), torch.randn(2, 3, 8, 8)
    apply_masks(model)
    set_global_density(model, 0.4)
    ref = model(x)
    assert remove_masks(model) == ["0", "3", "7"]
    assert not masked_modules(model)
    assert isinstance(model[3].weight, nn.Parameter)
    assert torch.equal(model(x), ref)


def test_mask_state_dict_roundtrip() -> None:
    model, x = _net().eval(), torch.randn(2, 3, 8, 8)
    apply_masks(model)
    set_layer_densities(model, {"0": 0.3, "3": 0.2})
    fresh = _net().eval()
    apply_masks(fresh)
    fresh.load_state_dict(model.state_dict())
    assert _nnz(fresh) == _nnz(model)
    assert torch.equal(fresh(x), model(x))

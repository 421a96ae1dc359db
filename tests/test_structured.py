"""Structured STR: the group soft threshold (docs/METHOD.md section 6), its BatchNorm gates,
the structured budget, and the export to a physically smaller network (torch and ONNX Runtime).

Equivalences: the fused operator's values and gradients equal autograd of the formula; a very
negative threshold is the identity; a dead channel is exactly zero after its BatchNorm; the
exported network's outputs equal the masked model's, and its dense MACs and parameters equal
what budget_table counted for the masked model.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from strlowrank import budget_table, totals
from strlowrank.export.structured_export import channel_widths, export_pruned_cnn
from strlowrank.method.group_threshold import (
    GroupSoftThreshold,
    apply_group_threshold,
    group_soft_threshold,
    group_thresholds,
    remove_group_threshold,
)
from strlowrank.training.optim import parameter_roles
from vision.models import build_model

pytest.importorskip("torch_pruning")  # the optional dependency of structured STR (requirements)
CL = torch.channels_last


def _kill(model: nn.Module, fraction: float, seed: int = 0, s: float = -4.0) -> None:
    """Make about ``fraction`` of the channels of every threshold (on a BatchNorm's gamma or a
    conv's filters) small enough to be dead at threshold parameter ``s``, the others alive."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module, p in group_thresholds(model):
            w = module.parametrizations.weight.original
            dead = torch.rand(w.shape[0], generator=gen) < fraction
            w[dead] *= 1e-4
            p.s.fill_(s)


def _settle_norms(model: nn.Module, x: torch.Tensor) -> None:
    """A few train-mode forwards so that BN running statistics are not the identity."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x + 0.1 * torch.randn_like(x))
    model.eval()


def test_operator_equals_formula_and_gradients():
    """Values and gradients of W and s (float64, some channels dead) equal autograd of
    W_c relu(||W_c|| - g(s) sqrt(n)) / ||W_c||; gradcheck on the fused Function."""
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3, dtype=torch.float64)
    w[1] *= 0.05
    w[4] *= 0.1  # below the threshold: dead
    s = torch.tensor(-1.5, dtype=torch.float64)  # g(s) sqrt(27) = 0.95
    upstream = torch.randn_like(w)
    w_ref, s_ref = w.clone().requires_grad_(), s.clone().requires_grad_()
    norms = w_ref.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    ref = w_ref * F.relu(norms - torch.sigmoid(s_ref) * 27**0.5) / norms
    gw_ref, gs_ref = torch.autograd.grad(ref, (w_ref, s_ref), upstream)
    w_x, s_x = w.clone().requires_grad_(), s.clone().requires_grad_()
    out = group_soft_threshold(w_x, s_x)
    gw, gs = torch.autograd.grad(out, (w_x, s_x), upstream)
    assert (out.flatten(1).abs().amax(1) == 0).tolist() == [False, True, False, False, True, False]
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gw, gw_ref)
    torch.testing.assert_close(gs, gs_ref)
    plain = group_soft_threshold(w_x, s_x, fused=False)
    torch.testing.assert_close(plain, ref)
    assert torch.autograd.gradcheck(group_soft_threshold, (w_x, s_x))


@pytest.mark.parametrize("fused", [True, False])
def test_hard_gate_passes_kept_channels_whole_with_the_soft_gradient_for_s(fused):
    """``hard``: kept channels equal W_c (no shrinkage), dead ones zero; dL/dW is the upstream
    gradient on the kept channels, and dL/ds equals the soft threshold's dL/ds (float64, on
    filters and on a 1-d gamma)."""
    torch.manual_seed(0)
    for w in (torch.randn(6, 3, 3, 3, dtype=torch.float64), torch.randn(8, dtype=torch.float64)):
        w[1] *= 0.05
        s = torch.tensor(-1.5 if w.dim() > 1 else -0.5, dtype=torch.float64)
        upstream = torch.randn_like(w)
        grads = {}
        for hard in (False, True):
            w_x, s_x = w.clone().requires_grad_(), s.clone().requires_grad_()
            out = group_soft_threshold(w_x, s_x, fused=fused, hard=hard)
            grads[hard] = (out, *torch.autograd.grad(out, (w_x, s_x), upstream))
        out, gw, gs = grads[True]
        alive = (grads[False][0] != 0).to(w.dtype)
        assert 0 < alive.sum() < alive.numel()
        torch.testing.assert_close(out, w * alive)
        torch.testing.assert_close(gw, upstream * alive)
        torch.testing.assert_close(gs, grads[False][2])
        assert gs != 0


def test_filter_threshold_before_a_batchnorm_gets_no_gradient():
    """Why a conv followed by a BatchNorm is thresholded on gamma: in training the norm undoes
    each filter's scale, so a threshold on the filter norms gets no task gradient (up to the
    norm's eps) while every channel lives; on gamma it does."""
    torch.manual_seed(0)
    x, upstream = torch.randn(4, 3, 8, 8), torch.randn(4, 8, 6, 6)
    grads = []
    for on_gamma in (False, True):
        conv, bn = nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8, eps=1e-12)
        s = nn.Parameter(torch.tensor(-3.0))  # tau well below every filter norm and gamma
        target = bn if on_gamma else conv
        parametrize.register_parametrization(
            target, "weight", GroupSoftThreshold(s, 1.0 if on_gamma else None)
        )
        (bn(conv(x)) * upstream).sum().backward()
        grads.append(float(s.grad.abs()))
    assert grads[0] < 1e-3 * grads[1], grads  # float32 rounding: about 1e-5 against 0.16


def test_very_negative_threshold_is_identity():
    model = build_model("resnet18", num_classes=10).eval()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    apply_group_threshold(model, x[:1], s_init=-3200.0)
    torch.testing.assert_close(model(x), ref(x))
    assert len(group_thresholds(model)) == 20  # every conv, not the classifier


def test_remove_keeps_outputs():
    model = build_model("resnet20", num_classes=10, in_chans=1)
    x = torch.randn(2, 1, 16, 16)
    apply_group_threshold(model, x[:1])
    _kill(model, 0.5)
    _settle_norms(model, x)
    before = model(x)
    assert len(remove_group_threshold(model)) == 21
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    torch.testing.assert_close(model(x), before)
    assert (model.bn1.weight == 0).any() and type(model.bn1.weight) is nn.Parameter


def test_dead_channel_is_zero_after_its_norm_and_roles():
    """A channel whose gamma is below the threshold is zero after the BatchNorm (train and
    eval) and its filter is zero; gamma and beta stay in the norm_bias role, s (on gamma) in
    the threshold role."""
    model = build_model("resnet20", num_classes=10, in_chans=1)
    x = torch.randn(4, 1, 16, 16)
    apply_group_threshold(model, x[:1], s_init=-4.0)
    _kill(model, 0.5)
    out = {}
    model.bn1.register_forward_hook(lambda m, a, o: out.setdefault(m.training, o))
    for train in (True, False):
        model.train(train)
        model(x)
    dead = model.conv1.weight.flatten(1).abs().amax(1) == 0
    assert dead.any() and not dead.all()
    for o in out.values():
        assert (o[:, dead] == 0).all() and (o[:, ~dead] != 0).any()
    roles = {n: r for n, _, r in parameter_roles(model)}
    assert roles["bn1.parametrizations.weight.original"] == "norm_bias"
    assert roles["bn1.parametrizations.weight.0.s"] == "threshold"


@pytest.mark.parametrize(
    "name,kwargs,size",
    [
        ("resnet20", {"in_chans": 1}, 28),
        ("resnet18", {}, 32),
        ("resnet50", {}, 32),
        ("mobilenet_v1", {"width": 0.25}, 64),
    ],
)
def test_export_equals_masked_and_budget(name, kwargs, size):
    """The smaller network: stock modules with fewer channels, the masked model's outputs in
    eval mode, and exactly the MACs and parameters budget_table counted for the masked model."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, **kwargs)
    x = torch.randn(3, kwargs.get("in_chans", 3), size, size)
    apply_group_threshold(model, x[:1], s_init=-10.0)
    _kill(model, 0.6)
    _settle_norms(model, x)
    table = budget_table(model, x[:1])
    small = export_pruned_cnn(model, x[:1])
    assert not any(hasattr(m, "parametrizations") for m in small.modules())
    dense_widths = channel_widths(build_model(name, num_classes=10, **kwargs))
    widths = channel_widths(small)
    assert sum(widths.values()) < sum(dense_widths.values())
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-5)
    small_total = totals(budget_table(small, x[:1]))
    assert small_total["macs_dense"] == totals(table)["macs_sparse"]
    assert small_total["numel"] == totals(table)["nnz"]
    rows = table.set_index("name")
    for layer, width in widths.items():
        assert rows.loc[layer, "channels"] == width, layer


def test_onnx_runtime_equals_masked():
    """The exported ResNet-20 in ONNX Runtime (BN folded) gives the masked model's outputs, with
    exact widths and with widths rounded up to multiples of 8."""
    pytest.importorskip("onnxruntime")
    from strlowrank.export import export_onnx
    from strlowrank.export.onnx_export import ort_session, run_ort

    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_chans=1)
    x = torch.randn(4, 1, 28, 28)
    apply_group_threshold(model, x[:1])
    _kill(model, 0.5)
    _settle_norms(model, x)
    for round_to in (None, 8):  # 8: widths rounded up for the runtime's blocked convs
        small = export_pruned_cnn(model, x[:1], round_to=round_to)
        widths = channel_widths(small).values()
        assert round_to is None or all(w % 8 == 0 for w in widths)
        session = ort_session(export_onnx(small, x[:1]))
        for batch in (x[:1], x):
            with torch.no_grad():
                expected = model(batch)
                torch.testing.assert_close(small(batch), expected, rtol=1e-4, atol=1e-5)
                ort_out = run_ort(session, batch)[0]
                torch.testing.assert_close(ort_out, expected, rtol=1e-4, atol=1e-4)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 1, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


@pytest.mark.parametrize("hard", [False, True])
def test_channels_last_equals_contiguous(hard):
    """Outputs and gradients of W, s and BN of a channels_last structured net (soft threshold
    or hard gate) equal the contiguous net's."""
    x = torch.randn(2, 3, 12, 12)
    ref = _net()
    apply_group_threshold(ref, x[:1], s_init=-2.5, hard=hard)  # some channels dead, not all
    model = copy.deepcopy(ref).to(memory_format=CL)
    F.cross_entropy(ref(x), torch.tensor([1, 2])).backward()
    F.cross_entropy(model(x.contiguous(memory_format=CL)), torch.tensor([1, 2])).backward()
    got = {n: p.grad for n, p in model.named_parameters()}
    for name, p in ref.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert all(p.s.grad.abs() > 0 for _, _, p in group_thresholds(model))


@pytest.mark.parametrize("hard", [False, True])
def test_compile_equals_eager(hard):
    """torch.compile (one graph, no breaks) of a channels_last structured net (soft threshold
    or hard gate): eager values and gradients (the aot_eager backend: the graph capture without
    inductor's code generation, which takes about a minute on a 2-core machine)."""
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=CL)
    eager = _net()
    apply_group_threshold(eager, x[:1], s_init=-2.5, hard=hard)
    eager = eager.to(memory_format=CL)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    out, out_ref = compiled(x), eager(x)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    out_ref.square().sum().backward()
    got = {n: p.grad for n, p in twin.named_parameters()}
    for name, p in eager.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)

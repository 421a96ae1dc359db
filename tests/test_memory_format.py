"""STR, masks and exports on channels_last weights and under ``torch.compile``.

Equivalences: the soft threshold S_g(W, s) (Kusupati et al., ICML 2020, equation (2)) and its
gradients do not depend on the memory format of W or of the upstream gradient; a channels_last
model trains like its contiguous twin; magnitude masks pick the same entries; exports give the
same outputs; a compiled STR model gives the eager values and gradients.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from strlowrank import apply_soft_threshold, soft_threshold
from strlowrank.export import export_sparse_cnn
from strlowrank.method.pruning import (
    apply_masks,
    masked_modules,
    set_global_density,
    set_layer_densities,
    uniform_densities,
)
from strlowrank.method.threshold import thresholded_modules
from vision.models import build_model

CL = torch.channels_last
GRANULARITIES = ("layer", "channel", "global")


def _net() -> nn.Module:
    """Convs (3x3, strided 1x1, depthwise) and a classifier: every weight layout STR meets."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 1, stride=2, bias=False),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, groups=32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("shape", [(), (8, 1, 1, 1)])
@pytest.mark.parametrize("w_format", [torch.contiguous_format, CL])
@pytest.mark.parametrize("g_format", [torch.contiguous_format, CL])
def test_operator_any_memory_format(shape, w_format, g_format) -> None:
    """Values and gradients (W, s) for every pair of layouts of W and of dL/dS."""
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    s = torch.full(shape, -1.0)
    upstream = torch.randn(8, 4, 3, 3)
    w_ref, s_ref = w.clone().requires_grad_(), s.clone().requires_grad_()
    ref = soft_threshold(w_ref, s_ref, fused=False)
    gw_ref, gs_ref = torch.autograd.grad(ref, (w_ref, s_ref), upstream)
    w_x = w.contiguous(memory_format=w_format).requires_grad_()
    s_x = s.clone().requires_grad_()
    out = soft_threshold(w_x, s_x)
    gw, gs = torch.autograd.grad(out, (w_x, s_x), upstream.contiguous(memory_format=g_format))
    assert torch.equal(out, ref)
    assert torch.equal(gw, gw_ref)
    torch.testing.assert_close(gs, gs_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_channels_last_model_equals_contiguous(granularity: str) -> None:
    """Outputs and gradients of W and s of a channels_last STR net equal the contiguous net's."""
    ref = _net()
    apply_soft_threshold(ref, s_init=-2.5, granularity=granularity)  # g(s) 0.076: some pruned
    model = copy.deepcopy(ref).to(memory_format=CL)
    assert model[0].parametrizations.weight.original.is_contiguous(memory_format=CL)
    x = torch.randn(2, 3, 12, 12)
    F.cross_entropy(ref(x), torch.tensor([1, 2])).backward()
    F.cross_entropy(model(x.contiguous(memory_format=CL)), torch.tensor([1, 2])).backward()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-6)
    got, expected = _grads(model), _grads(ref)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v1_small"])
def test_channels_last_str_model_trains_one_step(name: str) -> None:
    """One SGD step at 32 px, batch 2: a finite loss (that of the contiguous model up to the
    rounding that batch-2 BatchNorm amplifies), every threshold gets a finite nonzero gradient
    and moves."""
    torch.manual_seed(0)
    width = {"width": 0.25} if name.startswith("mobilenet") else {}
    ref = build_model(name, num_classes=10, **width)
    apply_soft_threshold(ref, s_init=-4.0)
    model = copy.deepcopy(ref).to(memory_format=CL)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([3, 7])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss = F.cross_entropy(model(x.contiguous(memory_format=CL)), y)
    loss.backward()
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, F.cross_entropy(ref(x), y), rtol=1e-2, atol=0.0)
    before = {n: p.s.detach().clone() for n, _, p in thresholded_modules(model)}
    for n, _, p in thresholded_modules(model):
        assert p.s.grad is not None and torch.isfinite(p.s.grad).all() and p.s.grad.abs() > 0, n
    opt.step()
    for n, _, p in thresholded_modules(model):
        assert not torch.equal(p.s.detach(), before[n]), n


def test_masks_channels_last_equal_contiguous() -> None:
    """Per-layer and global magnitude masks (the GMP updates) pick the same entries, and the
    pruned originals are zero, whatever the weights' memory format."""
    ref = _net()
    names = apply_masks(ref)
    model = copy.deepcopy(ref).to(memory_format=CL)
    assert all(
        p.mask.is_contiguous(memory_format=CL)
        for _, m, p in masked_modules(model)
        if p.mask.dim() == 4
    )
    for prune in (
        lambda m: set_layer_densities(m, uniform_densities(names, 0.3)),
        lambda m: set_global_density(m, 0.1),
    ):
        assert prune(model) == prune(ref)
        for (n, m, p), (_, m_ref, p_ref) in zip(masked_modules(model), masked_modules(ref)):
            assert torch.equal(p.mask, p_ref.mask), n
            assert torch.equal(m.weight, m_ref.weight), n


@pytest.mark.parametrize("method", ["str", "masks"])
def test_export_channels_last_model(method: str) -> None:
    """The sparse CNN export of a channels_last model (and input) equals the pruned model."""
    model = _net()
    if method == "str":
        apply_soft_threshold(model, s_init=-1.5)
    else:
        set_layer_densities(model, uniform_densities(apply_masks(model), 0.1))
    model = model.to(memory_format=CL).eval()
    x = torch.randn(2, 3, 16, 16).contiguous(memory_format=CL)
    exported, choices = export_sparse_cnn(
        model, x, min_sparsity=0.0, repeats=1, margin=float("inf")
    )
    assert choices and all(c.sparse for c in choices)  # every CSR path is taken
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x), rtol=1e-5, atol=1e-5)


def test_compile_equals_eager() -> None:
    """``torch.compile`` (one graph, no breaks) of a channels_last STR net: the eager outputs
    and gradients of W and s within 1e-5."""
    torch.manual_seed(0)
    eager = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.Flatten(),
        nn.Linear(8 * 64, 4),
    )
    apply_soft_threshold(eager, s_init=-4.0)  # g(s) 0.018: some of every layer pruned, not all
    eager = eager.to(memory_format=CL)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True)
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=CL)
    out, out_ref = compiled(x), eager(x)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    out_ref.square().sum().backward()
    got, expected = _grads(twin), _grads(eager)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5, msg=name)
    assert all(p.s.grad.abs() > 0 for _, _, p in thresholded_modules(twin))

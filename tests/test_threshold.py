"""The soft-threshold operator, its gradients and the parametrization (docs/METHOD.md section 1)."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from strlowrank import apply_soft_threshold, remove_soft_threshold, soft_threshold
from strlowrank.method.threshold import SoftThreshold, thresholded_modules


def test_operator_values():
    w = torch.tensor([-0.5, -0.1, 0.0, 0.05, 0.3])
    s = torch.tensor(0.0)  # g(s) = 0.5
    s_neg = torch.logit(torch.tensor(0.2))  # g(s) = 0.2
    assert torch.equal(soft_threshold(w, s), torch.zeros(5))
    expected = torch.tensor([-0.3, 0.0, 0.0, 0.0, 0.1])
    torch.testing.assert_close(soft_threshold(w, s_neg), expected)


def test_gradients_are_true_subgradients():
    w = torch.tensor([-0.5, -0.1, 0.05, 0.3], requires_grad=True)
    s = torch.logit(torch.tensor(0.2)).requires_grad_()
    upstream = torch.tensor([1.0, 2.0, 3.0, 4.0])
    (soft_threshold(w, s) * upstream).sum().backward()
    active = torch.tensor([1.0, 0.0, 0.0, 1.0])  # |w| > 0.2
    torch.testing.assert_close(w.grad, upstream * active)  # no straight-through estimator
    g = torch.sigmoid(s.detach())
    expected_s = -(g * (1 - g)) * (upstream * active * torch.sign(w.detach())).sum()
    torch.testing.assert_close(s.grad, expected_s)


def test_float32_under_autocast():
    w = torch.full((4,), 1.0 + 2e-3, dtype=torch.bfloat16)
    s = torch.logit(torch.tensor(1e-3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = soft_threshold(w.float(), s)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, w.float() - 1e-3)


def test_thresholded_layer_equals_functional():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    raw = conv.weight.detach().clone()
    apply_soft_threshold(conv, include=("*",), s_init=-2.0)
    x = torch.randn(2, 3, 8, 8)
    expected = F.conv2d(x, soft_threshold(raw, torch.tensor(-2.0)), conv.bias, padding=1)
    torch.testing.assert_close(conv(x), expected)


def test_very_negative_threshold_is_identity():
    model = torchvision.models.resnet18(num_classes=10).eval()
    ref = copy.deepcopy(model)
    apply_soft_threshold(model, s_init=-3200.0)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), ref(x))


def test_remove_keeps_outputs_and_bakes_zeros():
    model = torchvision.models.resnet18(num_classes=10).eval()
    apply_soft_threshold(model, s_init=-4.0)
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    names = remove_soft_threshold(model)
    assert len(names) == 21 and not list(thresholded_modules(model))
    torch.testing.assert_close(model(x), before)
    assert type(model.conv1.weight) is nn.Parameter
    assert (model.conv1.weight == 0).any()


@pytest.mark.parametrize("granularity,count", [("layer", 21), ("channel", 21), ("global", 1)])
def test_granularity(granularity, count):
    model = torchvision.models.resnet18()
    apply_soft_threshold(model, granularity=granularity)
    params = {id(p.s): p.s for _, _, p in thresholded_modules(model)}
    assert len(params) == count
    if granularity == "channel":
        assert model.conv1.parametrizations.weight[0].s.shape == (64, 1, 1, 1)


def test_include_exclude_patterns():
    model = torchvision.models.resnet18()
    names = apply_soft_threshold(model, include=("layer*",), exclude=("*downsample*",))
    assert "conv1" not in names and "fc" not in names
    assert all(n.startswith("layer") and "downsample" not in n for n in names)
    assert len(names) == 16
    with pytest.raises(ValueError, match="no conv/linear"):
        apply_soft_threshold(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="granularity"):
        apply_soft_threshold(model, granularity="row")


def test_threshold_learns_with_decay_only():
    """Weight decay alone on s (no task gradient) raises g(s): the sparsity knob."""
    s = nn.Parameter(torch.tensor(-3.0))
    opt = torch.optim.SGD([s], lr=1.0, weight_decay=0.1)
    for _ in range(5):
        opt.zero_grad()
        (0.0 * s).backward()
        opt.step()
    assert SoftThreshold(s).threshold() > torch.sigmoid(torch.tensor(-3.0))

"""vision.models: registry builds every model; shapes, STR layer counts, stem/head names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from strlowrank.method.threshold import apply_soft_threshold, select_modules
from vision.models import MODELS, build_model, first_last_layer_names

# model -> (number of conv + linear layers STR applies to, stem name, classifier name, input side)
EXPECTED = {
    "resnet18": (21, "conv1", "fc", 32),  # 20 convs (incl. 3 downsample) + fc
    "resnet50": (54, "conv1", "fc", 32),  # 53 convs (incl. 4 downsample) + fc
    "mobilenet_v1": (28, "stem.0", "classifier", 32),  # stem + 13 x (dw + pw) + fc
    "resnet20": (22, "conv1", "fc", 32),  # 19 convs + 2 projection shortcuts + fc
    "resnet18_small": (21, "conv1", "fc", 32),
    "mobilenet_v1_small": (28, "stem.0", "classifier", 32),
}


def test_registry_lists_every_model() -> None:
    assert set(MODELS) == set(EXPECTED)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg16", 10)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_forward_shape_and_str_layer_count(name: str) -> None:
    count, stem, head, side = EXPECTED[name]
    model = build_model(name, num_classes=7, in_chans=1).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, side, side)).shape == (1, 7)
    assert first_last_layer_names(model) == (stem, head)
    assert model.get_submodule(stem).in_channels == 1
    assert model.get_submodule(head).out_features == 7
    assert len(apply_soft_threshold(model, s_init=-10.0)) == count
    assert first_last_layer_names(model) == (stem, head)  # unchanged by the parametrization


def test_resnet50_weight_count_matches_paper() -> None:
    """The STR paper's count: ResNet-50 v1.5 has 25,502,912 conv + FC weights."""
    model = build_model("resnet50", 1000)
    assert sum(m.weight.numel() for _, m in select_modules(model)) == 25_502_912
    assert model.layer2[0].conv2.stride == (2, 2)  # v1.5: stride on the 3x3 conv


def _macs(model: nn.Module, x: torch.Tensor) -> int:
    """Dense multiply-accumulates per example of all conv + linear layers."""
    total = 0

    def hook(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        per_out = mod.weight[0].numel()  # (C_in / groups) * k * k, or in_features
        total += out[0].numel() * per_out

    hooks = [m.register_forward_hook(hook) for _, m in select_modules(model)]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return total


def test_mobilenet_v1_matches_paper_size() -> None:
    """Howard et al. 2017, table 1/8: 4.2 M parameters, 569 M mult-adds at 224 px."""
    model = build_model("mobilenet_v1", 1000)
    assert sum(p.numel() for p in model.parameters()) == 4_231_976
    macs = _macs(model, torch.randn(1, 3, 224, 224))
    assert abs(macs / 1e6 - 569) < 6  # conv + fc only, within 1%


def test_mobilenet_width_multiplier_and_init() -> None:
    half = build_model("mobilenet_v1_small", 10, width=0.5)
    assert half.get_submodule("stem.0").out_channels == 16
    assert half.classifier.in_features == 512
    thin = build_model("resnet20", 10, width=0.5)  # the uniformly thinner baseline
    assert thin.conv1.out_channels == 8 and thin.fc.in_features == 32
    with pytest.raises(ValueError, match="only supported by MobileNetV1 and resnet20"):
        build_model("resnet18", 10, width=0.5)
    # Kaiming normal, fan_in, ReLU gain: std = sqrt(2 / fan_in)
    w = build_model("resnet50", 10).layer3[0].conv2.weight
    expected = (2.0 / w[0].numel()) ** 0.5
    assert abs(float(w.detach().std()) / expected - 1) < 0.02

"""Vision model registry: the networks of STR (Kusupati et al., ICML 2020), section 5.1.

ImageNet models: torchvision's ResNet-18 and ResNet-50 (v1.5: stride on the 3x3 conv, as the
paper's), and a local MobileNetV1 (Howard et al. 2017, 224 px, 13 depthwise-separable blocks).
Small-image (32x32) variants: CIFAR ResNet-20 (He et al. 2016, section 4.2), ResNet-18 with a
3x3 stride-1 stem and no max-pool, and MobileNetV1 with a stride-1 stem.

Every model is a plain ``nn.Module`` built from stock ``nn.Conv2d`` / ``nn.Linear`` layers: STR or
magnitude masks are applied from outside by name pattern (``strlowrank.method.threshold``,
``strlowrank.method.pruning``). Weights are initialised Kaiming-normal (fan_in, ReLU gain) as in the
paper's configs; BatchNorm starts at gamma = 1, beta = 0; biases at 0.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet18, resnet50
from torchvision.models.resnet import BasicBlock

from strlowrank.training.checkpoint import CheckpointError, load_model_state

# MobileNetV1 body: (output channels, stride) of the 13 depthwise-separable blocks.
_MOBILENET_V1_BLOCKS = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
)


def init_weights(model: nn.Module) -> nn.Module:
    """Kaiming-normal (fan_in, ReLU) conv/linear weights, zero biases, BN gamma 1 and beta 0."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int, groups: int = 1) -> nn.Sequential:
    """Conv(k x k, no bias) -> BN -> ReLU, 'same' padding."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class DepthwiseSeparable(nn.Module):
    """Depthwise 3x3 (groups = C_in) + BN + ReLU, then pointwise 1x1 + BN + ReLU.

    [N, C_in, H, W] -> [N, C_out, H / stride, W / stride].
    """

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.depthwise = _conv_bn_relu(cin, cin, 3, stride, groups=cin)
        self.pointwise = _conv_bn_relu(cin, cout, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class MobileNetV1(nn.Module):
    """MobileNetV1 (Howard et al. 2017, table 1): 27 convs + a linear classifier.

    Args:
        num_classes: classifier outputs.
        in_chans: input channels (1 for grayscale data).
        width: width multiplier alpha; every layer has round(alpha * C) channels (at least 8).
        stem_stride: 2 for 224 px inputs (the paper), 1 for 32 px inputs.
    Shapes: [N, in_chans, H, W] -> [N, num_classes]; 224 px gives a 7 x 7 final map (alpha = 1:
    about 569 M multiply-adds, 4.2 M parameters).
    """

    def __init__(
        self, num_classes: int = 1000, in_chans: int = 3, width: float = 1.0, stem_stride: int = 2
    ) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"MobileNetV1 width multiplier must be > 0, got {width}")

        def scaled(c: int) -> int:
            return max(8, int(round(c * width)))

        cin = scaled(32)
        self.stem = _conv_bn_relu(in_chans, cin, 3, stem_stride)
        blocks = []
        for cout, stride in _MOBILENET_V1_BLOCKS:
            blocks.append(DepthwiseSeparable(cin, scaled(cout), stride))
            cin = scaled(cout)
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(x, 1))


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module | None:
    """1x1 conv + BN projection when the block changes shape, else None (identity)."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class CifarResNet(nn.Module):
    """CIFAR ResNet-(6n+2) (He et al. 2016, section 4.2) for 32x32 inputs.

    3x3 stem (16 channels), three stages of ``n`` torchvision BasicBlocks with 16/32/64 channels
    (stride 1/2/2), 1x1 conv + BN projection shortcuts (option B) so every layer is a conv,
    global average pool, linear classifier. Names follow torchvision (conv1, layer1..3, fc).
    ``width`` multiplies every channel count (rounded): a uniformly thinner network.
    Shapes: [N, in_chans, 32, 32] -> [N, num_classes].
    """

    def __init__(
        self, depth: int = 20, num_classes: int = 10, in_chans: int = 3, width: float = 1.0
    ) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        widths = [max(1, round(c * width)) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        cin = widths[0]
        stages = []
        for cout, stride in zip(widths, (1, 2, 2)):
            blocks = []
            for i in range(n):
                s = stride if i == 0 else 1
                blocks.append(BasicBlock(cin, cout, s, downsample=_shortcut(cin, cout, s)))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _torchvision_resnet(
    factory: Callable[..., nn.Module], num_classes: int, in_chans: int, small: bool
) -> nn.Module:
    """A torchvision ResNet (weights=None) with an ``in_chans`` stem; ``small``: 3x3/1, no pool."""
    model = factory(weights=None, num_classes=num_classes)
    if small:
        model.conv1 = nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    elif in_chans != 3:
        model.conv1 = nn.Conv2d(in_chans, 64, 7, 2, 3, bias=False)
    return model


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": lambda nc, ic, **kw: _torchvision_resnet(resnet18, nc, ic, small=False),
    "resnet50": lambda nc, ic, **kw: _torchvision_resnet(resnet50, nc, ic, small=False),
    "mobilenet_v1": lambda nc, ic, width=1.0: MobileNetV1(nc, ic, width, stem_stride=2),
    "resnet20": lambda nc, ic, width=1.0: CifarResNet(20, nc, ic, width),
    "resnet18_small": lambda nc, ic, **kw: _torchvision_resnet(resnet18, nc, ic, small=True),
    "mobilenet_v1_small": lambda nc, ic, width=1.0: MobileNetV1(nc, ic, width, stem_stride=1),
}
MODELS: tuple[str, ...] = tuple(_BUILDERS)


def build_model(name: str, num_classes: int, in_chans: int = 3, width: float = 1.0) -> nn.Module:
    """Build a registered model with Kaiming-normal init.

    Args:
        name: one of ``MODELS``.
        num_classes: classifier outputs.
        in_chans: input channels (1 for grayscale data, no channel copying needed).
        width: width multiplier of MobileNetV1 and the CIFAR ResNet (must be 1.0 for the others).
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    scalable = name.startswith("mobilenet") or name == "resnet20"
    if width != 1.0 and not scalable:
        raise ValueError(
            f"width multiplier {width} is only supported by MobileNetV1 and resnet20 models"
        )
    kwargs = {"width": width} if scalable else {}
    return init_weights(_BUILDERS[name](num_classes, in_chans, **kwargs))


def first_last_layer_names(model: nn.Module) -> tuple[str, str]:
    """Qualified names of the stem conv (first conv) and the classifier (last linear layer).

    These are the layers a run may keep dense (``exclude`` patterns for STR or masks).
    """
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not convs or not linears:
        raise ValueError("first_last_layer_names: model needs at least one Conv2d and one Linear")
    return convs[0], linears[-1]


def load_pretrained(model: nn.Module, path: str | Path) -> list[str]:
    """Load dense weights into ``model``: a run's checkpoint.pt (its ``model`` entry) or a plain
    state_dict file (e.g. torchvision's). A classifier whose shape differs (another number of
    classes) keeps its fresh initialization; any other mismatch is a one-line CheckpointError.
    Returns the names of the parameters that were not loaded."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model.init_from: no such file {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickles, truncated or foreign files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"model.init_from: {path} is no checkpoint ({first[:120]})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"model.init_from: {path} holds no state_dict of tensors")
    if any(".parametrizations." in k for k in state):
        raise CheckpointError(f"model.init_from: {path} is a sparsified run; give a dense one")
    _, last = first_last_layer_names(model)
    own = model.state_dict()
    skipped = [
        k
        for k in (f"{last}.weight", f"{last}.bias")
        if k in state and k in own and state[k].shape != own[k].shape
    ]
    load_model_state(model, {**state, **{k: own[k] for k in skipped}}, path)
    return skipped

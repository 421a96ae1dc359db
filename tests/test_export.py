"""strlowrank.export gives the same outputs; the fused soft threshold equals the plain one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from strlowrank.export import (
    LowRankGRU,
    SparseConv2d,
    SparseLinear,
    export_gru,
    export_sparse_cnn,
    file_bytes,
    save_export,
)
from strlowrank.export.sparse_cnn_ops import (
    MaxPool2dOneDNN,
    conv_bn_pairs,
    fold_batchnorm_,
    simplify_cnn,
)
from strlowrank.method.lowrank import MatrixSpec
from strlowrank.method.pruning import apply_masks, set_layer_densities, uniform_densities
from strlowrank.method.rnn import RNNLayer
from strlowrank.method.threshold import soft_threshold


def _tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 1, stride=2, bias=False),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


@pytest.mark.parametrize("shape", [(), (8, 1, 1, 1)])
def test_fused_soft_threshold_equals_soft_threshold(shape: tuple) -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3, dtype=torch.float64).float().requires_grad_()
    s = torch.full(shape, -1.0).requires_grad_()
    g = torch.randn(8, 4, 3, 3)
    ref = soft_threshold(w, s, fused=False)
    gw_ref, gs_ref = torch.autograd.grad((ref * g).sum(), (w, s))
    out = soft_threshold(w, s)
    gw, gs = torch.autograd.grad((out * g).sum(), (w, s))
    assert torch.equal(out, ref)
    assert torch.equal(gw, gw_ref)
    torch.testing.assert_close(gs, gs_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 3])
def test_sparse_layers_equal_dense(batch: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(batch, 8, 9, 9)
    for conv in (nn.Conv2d(8, 6, 1, stride=2), nn.Conv2d(8, 6, 3, 2, 1, bias=False)):
        with torch.no_grad():
            conv.weight.mul_(torch.rand_like(conv.weight) > 0.7)
            torch.testing.assert_close(SparseConv2d(conv)(x), conv(x), rtol=1e-5, atol=1e-5)
    linear = nn.Linear(8, 5)
    with torch.no_grad():
        torch.testing.assert_close(SparseLinear(linear)(x[:, :, 0, 0]), linear(x[:, :, 0, 0]))


def test_export_sparse_cnn_equal_outputs_and_smaller_file() -> None:
    torch.manual_seed(0)
    model = _tiny_cnn()
    names = apply_masks(model)
    set_layer_densities(model, uniform_densities(names, 0.05))
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    exported, choices = export_sparse_cnn(model, x, repeats=2, margin=float("inf"))  # all sparse
    assert [c.sparse for c in choices] == [True] * 4
    assert sum(isinstance(m, (SparseConv2d, SparseLinear)) for m in exported.modules()) == 4
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x), rtol=1e-5, atol=1e-5)
    dense_bytes, sparse_bytes = file_bytes(_tiny_cnn()), file_bytes(exported)
    print(f"tiny cnn: dense {dense_bytes} B, exported 95% sparse {sparse_bytes} B")
    assert sparse_bytes < dense_bytes


@pytest.mark.parametrize(
    "kernel,stride,padding,dilation",
    [
        (3, 1, 1, 1),
        (3, 2, 1, 1),
        (3, 1, 0, 1),
        (3, 2, 0, 1),
        (7, 2, 3, 1),
        (3, 1, 2, 2),
        (1, 1, 1, 1),
        ((1, 3), (2, 1), (0, 1), 1),
    ],
)
@pytest.mark.parametrize("mode", ["shift", "cols"])
def test_sparse_conv_shift_and_cols_equal_conv2d(kernel, stride, padding, dilation, mode) -> None:
    torch.manual_seed(0)
    for bias, batch, size in ((True, 1, 11), (False, 3, 10)):
        conv = nn.Conv2d(5, 7, kernel, stride, padding, dilation, bias=bias)
        with torch.no_grad():
            conv.weight.mul_(torch.rand_like(conv.weight) > 0.6)
            conv.weight[:, :, 0, 0] = 0.0  # an all-zero tap (skipped by "shift")
            x = torch.randn(batch, 5, size, size + 2)
            out = SparseConv2d(conv, mode)(x)
            torch.testing.assert_close(out, conv(x), rtol=1e-5, atol=1e-5)
            assert out.is_contiguous()


def test_sparse_conv_modes_checked() -> None:
    with pytest.raises(ValueError, match="mode"):
        SparseConv2d(nn.Conv2d(4, 4, 3), "matmul")
    with pytest.raises(ValueError, match="groups"):
        SparseConv2d(nn.Conv2d(4, 4, 3, groups=2))
    conv = nn.Conv2d(3, 4, 3, 2, 1)
    with torch.no_grad():
        conv.weight.zero_()  # no tap left: the output is the bias
        x = torch.randn(2, 3, 9, 8)
        for mode in ("shift", "cols"):
            torch.testing.assert_close(SparseConv2d(conv, mode)(x), conv(x))


@pytest.mark.parametrize("ceil_mode", [False, True])
def test_onednn_maxpool_equals_maxpool(ceil_mode: bool) -> None:
    x = torch.randn(2, 3, 13, 12)  # negative values: the padding must act as -inf
    for pool in (nn.MaxPool2d(3, 2, 1, ceil_mode=ceil_mode), nn.MaxPool2d(2, ceil_mode=ceil_mode)):
        with torch.no_grad():
            assert torch.equal(MaxPool2dOneDNN(pool)(x), pool(x))
    xg = x.clone().requires_grad_()
    MaxPool2dOneDNN(pool)(xg).sum().backward()  # autograd falls back to F.max_pool2d
    assert xg.grad is not None


def test_fold_batchnorm_conv_bn_relu(random_bn_stats) -> None:
    torch.manual_seed(0)
    model = random_bn_stats(_tiny_cnn())
    model[3].bias = nn.Parameter(torch.randn(32))  # a conv with a bias, followed by no BN
    x = torch.randn(2, 3, 16, 16)
    folded = simplify_cnn(model)
    assert isinstance(folded[1], nn.Identity) and folded[0].bias is not None
    assert isinstance(model[1], nn.BatchNorm2d)  # the original is untouched
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_conv_bn_pairs_only_exclusive_pairs_and_untraceable_fallback(random_bn_stats) -> None:
    class Shared(nn.Module):  # the conv output also feeds the add: its BN must stay
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) + y

    class Untraceable(nn.Module):  # data-dependent control flow: fx cannot trace it
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x) if x.sum() > 0 else -self.body(x)

    assert conv_bn_pairs(Shared().eval()) == []
    model = random_bn_stats(Untraceable())
    assert conv_bn_pairs(model) == [("body.0", "body.1")]
    x = torch.randn(1, 3, 8, 8).abs()
    with torch.no_grad():
        ref = model(x)
        assert fold_batchnorm_(model) == [("body.0", "body.1")]
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_export_sparse_cnn_torchvision_resnet_folded(random_bn_stats) -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = random_bn_stats(torchvision.models.resnet18(num_classes=10))
    names = apply_masks(model)
    set_layer_densities(model, uniform_densities(names, 0.1))
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    exported, choices = export_sparse_cnn(model, x, repeats=1, margin=float("inf"))
    assert all(c.sparse for c in choices) and len(choices) == 21
    assert {c.path for c in choices} <= {"matmul", "shift", "cols", "linear"}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in exported.modules())
    assert isinstance(exported.maxpool, MaxPool2dOneDNN)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x), rtol=1e-5, atol=1e-5)


def test_export_sparse_cnn_keeps_dense_layers_when_slower() -> None:
    model = _tiny_cnn().eval()
    exported, choices = export_sparse_cnn(model, torch.randn(1, 3, 8, 8), margin=0.0)
    assert not any(isinstance(m, (SparseConv2d, SparseLinear)) for m in exported.modules())
    assert choices == []  # dense weights are not even timed


@pytest.mark.parametrize("kind", ["lowrank", "str", "full"])
def test_export_gru_equal_outputs(kind: str, tmp_path) -> None:
    torch.manual_seed(0)
    spec_w, spec_u = (MatrixSpec(kind, rank=r, s_init=-1.0) for r in (3, 4))
    layer = RNNLayer("gru", 12, 16, spec=spec_w, spec_u=spec_u).eval()
    exported = export_gru(layer)
    assert isinstance(exported, LowRankGRU)  # an eager module
    x, h0 = torch.randn(3, 7, 12), torch.randn(3, 16)
    with torch.no_grad():
        for state in (None, h0):
            out, h = exported(x, state)
            out_ref, h_ref = layer(x, state)
            torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    size = save_export(exported, tmp_path / "gru.pt")
    assert size == (tmp_path / "gru.pt").stat().st_size
    state = torch.load(tmp_path / "gru.pt", weights_only=True)  # the state_dict, nothing else
    assert state.keys() == exported.state_dict().keys()
    for name, value in exported.state_dict().items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=0)
    print(f"gru {kind}: exported state_dict {size} B")


def test_export_gru_from_nn_gru_and_dense_fallback() -> None:
    torch.manual_seed(0)
    gru = nn.GRU(5, 6, batch_first=True).eval()
    exported = export_gru(gru)
    assert isinstance(exported, LowRankGRU) and not exported.u_factored
    x = torch.randn(2, 4, 5)
    with torch.no_grad():
        torch.testing.assert_close(exported(x)[0], gru(x)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="GRU"):
        export_gru(RNNLayer("lstm", 5, 6))
    with pytest.raises(ValueError, match="per-gate layers are not supported"):
        export_gru(RNNLayer("gru", 5, 6, split="per_gate"))
    with pytest.raises(ValueError, match="backend must be 'eager' or 'cpp'"):
        export_gru(gru, backend="script")

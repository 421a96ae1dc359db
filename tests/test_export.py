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
from strlowrank.pruning import apply_masks, set_layer_densities, uniform_densities
from strlowrank.rnn import RNNLayer
from strlowrank.threshold import soft_threshold


def _tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip


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


def test_export_sparse_cnn_keeps_dense_layers_when_slower() -> None:
    model = _tiny_cnn().eval()
    exported, choices = export_sparse_cnn(model, torch.randn(1, 3, 8, 8), margin=0.0)
    assert not any(isinstance(m, (SparseConv2d, SparseLinear)) for m in exported.modules())
    assert choices == []  # dense weights are not even timed


@pytest.mark.parametrize("kind", ["lowrank", "str", "full"])
def test_export_gru_equal_outputs(kind: str, tmp_path) -> None:
    torch.manual_seed(0)
    layer = RNNLayer("gru", 12, 16, kind=kind, rank_w=3, rank_u=4, s_init=-1.0).eval()
    exported = export_gru(layer)
    x, h0 = torch.randn(3, 7, 12), torch.randn(3, 16)
    with torch.no_grad():
        for state in (None, h0):
            out, h = exported(x, state)
            out_ref, h_ref = layer(x, state)
            torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    size = save_export(exported, tmp_path / "gru.pt")
    assert size == (tmp_path / "gru.pt").stat().st_size
    with pytest.warns(FutureWarning):  # TorchScript is deprecated in torch 2.x, still works
        reloaded = torch.jit.load(str(tmp_path / "gru.pt"))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x)[0], exported(x)[0])
    print(f"gru {kind}: exported TorchScript {size} B")


def test_export_gru_from_nn_gru_and_dense_fallback() -> None:
    torch.manual_seed(0)
    gru = nn.GRU(5, 6, batch_first=True).eval()
    exported = export_gru(gru, script=False)
    assert isinstance(exported, LowRankGRU) and not exported.u_factored
    x = torch.randn(2, 4, 5)
    with torch.no_grad():
        torch.testing.assert_close(exported(x)[0], gru(x)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="GRU"):
        export_gru(RNNLayer("lstm", 5, 6))

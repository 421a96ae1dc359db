"""ONNX exports run in ONNX Runtime give the model's outputs; streaming equals the whole run.

GRU graphs (the low-rank ``Scan`` form and ONNX's dense ``GRU`` op) and pruned CNNs (STR with
BN, masked ResNet-18) are run in onnxruntime and compared with the PyTorch model within 1e-5.
Streaming: frame-by-frame ``step`` and chunked calls carrying h give the outputs of one
whole-sequence call, for the eager, C++ and ONNX forms.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from strlowrank.export import (  # noqa: E402
    export_gru,
    export_onnx,
    gru_cpp,  # noqa: E402
    save_export,
)
from strlowrank.export.onnx_export import ort_session, run_ort  # noqa: E402
from strlowrank.method.lowrank import MatrixSpec  # noqa: E402
from strlowrank.method.pruning import apply_masks, set_layer_densities, uniform_densities  # noqa: E402
from strlowrank.method.rnn import RNNLayer  # noqa: E402
from strlowrank.method.threshold import apply_soft_threshold  # noqa: E402

TOL = 1e-5


def _layer(kind: str) -> RNNLayer:
    torch.manual_seed(0)
    if kind == "lowrank":  # both W and U stay factored (r (out + in) < out in)
        spec_w, spec_u = MatrixSpec("lowrank", rank=8), MatrixSpec("lowrank", rank=16)
        return RNNLayer("gru", 32, 64, spec_w, spec_u).eval()
    return RNNLayer("gru", 12, 16, MatrixSpec(kind, s_init=-1.0)).eval()


def _matmuls_per_step(proto) -> int:
    scan = next(n for n in proto.graph.node if n.op_type == "Scan")
    body = scan.attribute[0].g
    return sum(n.op_type == "MatMul" for n in body.node)


@pytest.mark.parametrize("form", ["scan", "gru_op"])
@pytest.mark.parametrize("kind", ["lowrank", "str", "full"])
def test_gru_onnx_equals_layer(kind: str, form: str, tmp_path) -> None:
    layer = _layer(kind)
    x, h0 = torch.randn(3, 17, layer.input_size), torch.randn(3, layer.hidden_size)
    path = tmp_path / "gru.onnx"
    proto = export_onnx(layer, path=path, form=form)
    assert save_export(proto, tmp_path / "again.onnx") == path.stat().st_size  # the graph's bytes
    assert (tmp_path / "again.onnx").read_bytes() == path.read_bytes()
    with torch.no_grad():
        out_ref, h_ref = layer(x, h0)
    out, h = run_ort(ort_session(path.read_bytes()), x, h0)
    assert out.shape == out_ref.shape and h.shape == h_ref.shape
    assert float((out - out_ref).abs().max()) <= TOL
    assert float((h - h_ref).abs().max()) <= TOL
    if form == "scan":  # factors kept: h -> (h B_U^T) -> A_U^T, two products per step
        exported = export_gru(layer)
        assert _matmuls_per_step(proto) == 1 + exported.u_factored
    else:
        assert [n.op_type for n in proto.graph.node].count("GRU") == 1


def test_gru_onnx_batch_is_dynamic() -> None:
    session = ort_session(export_onnx(_layer("lowrank")))
    for batch in (1, 5):
        out, h = run_ort(session, torch.randn(batch, 4, 32), torch.zeros(batch, 64))
        assert out.shape == (batch, 4, 64) and h.shape == (batch, 64)


def _check_cnn(model: nn.Module, x: torch.Tensor, tmp_path) -> None:
    proto = export_onnx(model, x, path=tmp_path / "cnn.onnx")
    assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node)  # folded
    with torch.no_grad():
        ref = model(x)
    (out,) = run_ort(ort_session(proto), x)
    torch.testing.assert_close(out, ref, rtol=TOL, atol=TOL)
    (out,) = run_ort(ort_session(proto), x[:1])  # another batch size
    torch.testing.assert_close(out, ref[:1], rtol=TOL, atol=TOL)


def test_str_cnn_onnx_equals_model(tmp_path, random_bn_stats) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    apply_soft_threshold(model, s_init=-1.0)  # g(-1) = 0.27: a real share of zeros
    random_bn_stats(model)
    assert float((model[3].weight == 0).float().mean()) > 0.3
    _check_cnn(model, torch.randn(2, 3, 16, 16), tmp_path)


def test_masked_resnet_onnx_equals_model(tmp_path, random_bn_stats) -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = random_bn_stats(torchvision.models.resnet18(num_classes=10))
    names = apply_masks(model)
    set_layer_densities(model, uniform_densities(names, 0.05))
    _check_cnn(model.eval(), torch.randn(2, 3, 32, 32), tmp_path)


# --------------------------------------------------------------------------- streaming


def _streams(module, x: torch.Tensor, h0: torch.Tensor) -> dict[str, tuple]:
    """The outputs of ``module`` (x, h) -> (out, h) fed whole, frame by frame and in chunks."""
    frames, h = [], h0
    for t in range(x.shape[1]):
        y_t, h = module.step(x[:, t], h) if hasattr(module, "step") else _onnx_step(module, x, t, h)
        frames.append(y_t)
    runs = {"frames": (torch.stack(frames, 1), h)}
    outs, h = [], h0
    for chunk in torch.split(x, [1, 6, 20, 2, x.shape[1] - 29], dim=1):
        out, h = module(chunk, h)
        outs.append(out)
    runs["chunks"] = (torch.cat(outs, 1), h)
    return runs


def _onnx_step(module, x: torch.Tensor, t: int, h: torch.Tensor) -> tuple:
    out, h = module(x[:, t : t + 1], h)
    return out[:, 0], h


class _OrtGRU:
    """An ONNX Runtime session called like the exported GRU: (x, h) -> (out, h)."""

    def __init__(self, proto) -> None:
        self.session = ort_session(proto)

    def __call__(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, h = run_ort(self.session, x, h)
        return out, h


def _backends(layer: RNNLayer) -> dict[str, object]:
    found = {
        "eager": export_gru(layer),
        "onnx_scan": _OrtGRU(export_onnx(layer)),
        "onnx_gru_op": _OrtGRU(export_onnx(layer, form="gru_op")),
    }
    if gru_cpp.available():
        found["cpp"] = export_gru(layer, backend="cpp")
    return found


@pytest.mark.parametrize("kind", ["lowrank", "full"])
def test_streaming_equals_whole_sequence(kind: str) -> None:
    layer = _layer(kind)
    x, h0 = torch.randn(2, 40, layer.input_size), torch.randn(2, layer.hidden_size)
    with torch.no_grad():
        whole, h_whole = layer(x, h0)
        for name, module in _backends(layer).items():
            for how, (out, h) in _streams(module, x, h0).items():
                assert float((out - whole).abs().max()) <= TOL, (name, how)
                assert float((h - h_whole).abs().max()) <= TOL, (name, how)

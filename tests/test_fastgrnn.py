"""The FastGRNN cell: the hand-written recurrence equals the formula written out step by step
(outputs and gradients of every parameter), in every matrix form (full, W1 W2, STR), through
export, initialization from a checkpoint and ONNX."""

from __future__ import annotations

import pytest
import torch

from speech.config import SpeechConfig
from speech.models import SpeechModelConfig, build_model, init_from_checkpoint
from strlowrank.method.budget import budget_table, matrix_params
from strlowrank.method.fastgrnn import fastgrnn_recurrence
from strlowrank.method.lowrank import MatrixSpec
from strlowrank.method.rnn import RNNLayer
from strlowrank.training.checkpoint import save_checkpoint
from strlowrank.training.config import to_dict


def formula(x, w, u, b_z, b_h, zeta_raw, nu_raw, h):
    """FastGRNN, one step at a time: z = sigmoid(W x + U h + b_z), h~ = tanh(W x + U h + b_h),
    h' = (sigmoid(zeta) (1 - z) + sigmoid(nu)) h~ + z h."""
    zeta, nu = torch.sigmoid(zeta_raw), torch.sigmoid(nu_raw)
    outs = []
    for t in range(x.shape[1]):
        pre = x[:, t] @ w.T + h @ u.T
        z = torch.sigmoid(pre + b_z)
        h_tilde = torch.tanh(pre + b_h)
        h = (zeta * (1 - z) + nu) * h_tilde + z * h
        outs.append(h)
    return torch.stack(outs, 1)


def _inputs(dtype=torch.float64, batch=3, steps=7, inputs=4, hidden=5):
    torch.manual_seed(0)
    return [
        torch.randn(batch, steps, inputs, dtype=dtype),
        torch.randn(hidden, inputs, dtype=dtype),
        0.5 * torch.randn(hidden, hidden, dtype=dtype),
        torch.randn(hidden, dtype=dtype),
        torch.randn(hidden, dtype=dtype),
        torch.tensor(0.3, dtype=dtype),
        torch.tensor(-1.0, dtype=dtype),
        torch.randn(batch, hidden, dtype=dtype),
    ]


def test_recurrence_equals_formula_outputs_and_gradients():
    args = [a.requires_grad_() for a in _inputs()]
    out, h_last = fastgrnn_recurrence(*args)
    ref = formula(*args)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(h_last, out[:, -1], atol=0, rtol=0)
    weights = torch.randn_like(ref)
    mine = torch.autograd.grad((out * weights).sum(), args)
    theirs = torch.autograd.grad((ref * weights).sum(), args)
    for name, a, b in zip(["x", "W", "U", "b_z", "b_h", "zeta", "nu", "h0"], mine, theirs):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8, msg=name)


def test_recurrence_passes_gradcheck():
    args = [a.requires_grad_() for a in _inputs(steps=4, hidden=3, inputs=2)]
    assert torch.autograd.gradcheck(lambda *a: fastgrnn_recurrence(*a)[0], args)


def _layer(kind: str, **spec) -> RNNLayer:
    torch.manual_seed(1)
    layer = RNNLayer("fastgrnn", 4, 6, MatrixSpec(kind, **spec))
    with torch.no_grad():
        layer.zeta.fill_(0.4)
        layer.nu.fill_(-2.0)
        layer.bias_ih.normal_()
    return layer


@pytest.mark.parametrize("kind", ["full", "lowrank", "str"])
def test_layer_equals_formula_with_its_effective_matrices(kind):
    layer = _layer(kind, rank=2, s_init=-1.0)
    x, h0 = torch.randn(2, 5, 4), torch.randn(2, 6)
    out, h = layer(x, h0)
    w, u = layer.stacked_weights()
    ref = formula(x, w, u, layer.bias_ih, layer.bias_hh, layer.zeta, layer.nu, h0)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    assert w.shape == (6, 4) and u.shape == (6, 6)  # one W and one U for both gates
    grads = torch.autograd.grad(out.sum(), list(layer.parameters()))
    ref_grads = torch.autograd.grad(ref.sum(), list(layer.parameters()), allow_unused=True)
    for (name, _), a, b in zip(layer.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


def test_lowrank_is_fastgrnns_w1_w2_and_str_is_full_at_very_negative_threshold():
    layer = _layer("lowrank", rank=2)
    assert layer.ranks() == (2, 2)
    torch.testing.assert_close(layer.W(), layer.W.W1 @ layer.W.W2)
    full = _layer("full")
    strm = RNNLayer("fastgrnn", 4, 6, MatrixSpec("str", s_init=-100.0))
    strm.load_dense_(*full.stacked_weights(), full.bias_ih, full.bias_hh, **full.cell_scalars())
    x = torch.randn(3, 4, 4)
    torch.testing.assert_close(strm(x)[0], full(x)[0], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="scalars"):
        strm.load_dense_(*full.stacked_weights(), full.bias_ih, full.bias_hh)


def test_per_gate_split_is_refused():
    with pytest.raises(ValueError, match="FastGRNN shares one W and one U"):
        RNNLayer("fastgrnn", 4, 6, split="per_gate")
    from speech.models import SpeechModelConfig, build_model

    cfg = SpeechModelConfig(cell="fastgrnn", split="per_gate", hidden=6)
    with pytest.raises(ValueError, match=r"^model\.split: per_gate .*FastGRNN shares"):
        build_model(cfg, input_size=4, num_classes=2)


def test_export_keeps_outputs_scalars_and_counts_fastgrnns_parameters():
    layer = _layer("lowrank", rank=2).eval()
    compact = layer.export()
    x = torch.randn(2, 5, 4)
    torch.testing.assert_close(compact(x)[0], layer(x)[0], atol=1e-6, rtol=1e-5)
    assert float(compact.zeta.detach()) == pytest.approx(0.4)
    assert float(compact.nu.detach()) == pytest.approx(-2.0)
    cfg = SpeechModelConfig(cell="fastgrnn", param="lowrank", hidden=80, rank_w=5, rank_u=40)
    model = build_model(cfg, input_size=9, num_classes=2)
    assert matrix_params(budget_table(model)) == 5 * (80 + 9) + 80 * 80  # rank-40 U is stored dense


def test_init_from_a_trained_fastgrnn_copies_matrices_biases_and_scalars(tmp_path):
    source_cfg = SpeechModelConfig(cell="fastgrnn", param="full", hidden=6)
    torch.manual_seed(0)
    source = build_model(source_cfg, input_size=4, num_classes=3).eval()
    with torch.no_grad():
        source.rnns[0].zeta.fill_(0.7)
        source.rnns[0].nu.fill_(-3.0)
    path = tmp_path / "checkpoint.pt"
    full = SpeechConfig(model=source_cfg)
    full.train.epochs = 1
    save_checkpoint({"model": source.state_dict(), "config": to_dict(full), "epoch": 1}, path)
    cfg = SpeechModelConfig(cell="fastgrnn", param="str", hidden=6, s_init=-100.0)
    model = build_model(cfg, input_size=4, num_classes=3).eval()
    init_from_checkpoint(model, path)
    x = torch.randn(2, 8, 4)
    torch.testing.assert_close(model(x), source(x), atol=1e-5, rtol=1e-4)
    assert float(model.rnns[0].nu) == -3.0


def test_onnx_graph_equals_layer(tmp_path):
    pytest.importorskip("onnxruntime")  # an optional dependency, not one of the project's modules
    from strlowrank.export import export_onnx
    from strlowrank.export.onnx_export import ort_session, run_ort

    for kind in ("full", "lowrank"):
        layer = _layer(kind, rank=2).eval()
        x, h0 = torch.randn(3, 9, 4), torch.randn(3, 6)
        proto = export_onnx(layer, path=tmp_path / "fastgrnn.onnx")
        out, h = run_ort(ort_session(proto), x, h0)
        with torch.no_grad():
            out_ref, h_ref = layer(x, h0)
        torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)
        assert (tmp_path / "fastgrnn.onnx").stat().st_size > 0

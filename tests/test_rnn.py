"""RNNLayer equivalences: full rank equals nn.GRU / nn.LSTM (outputs and gradients), STR at
s -> -inf equals its dense init, export keeps outputs, budget entries on a hand-computed case."""

import math

import pytest
import torch
from torch import nn

from speech.models import SpeechModelConfig, build_model, recurrent_params
from strlowrank.rnn import RNNLayer, compact_bytes, num_parameters

TORCH = {"gru": nn.GRU, "lstm": nn.LSTM}


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_full_rank_equals_torch_outputs_and_gradients(cell):
    torch.manual_seed(0)
    ref = TORCH[cell](6, 5, batch_first=True)
    layer = RNNLayer.from_torch(ref)
    x = torch.randn(3, 7, 6)
    out_ref, state_ref = ref(x)
    out, state = layer(x)
    torch.testing.assert_close(out, out_ref, atol=0, rtol=0)
    h_ref = state_ref if cell == "gru" else state_ref[0]
    h = state if cell == "gru" else state[0]
    torch.testing.assert_close(h, h_ref[0], atol=0, rtol=0)
    (out_ref.square().sum()).backward()
    (out.square().sum()).backward()
    pairs = [(layer.W.weight, ref.weight_ih_l0), (layer.U.weight, ref.weight_hh_l0),
             (layer.bias_ih, ref.bias_ih_l0), (layer.bias_hh, ref.bias_hh_l0)]  # fmt: skip
    for mine, theirs in pairs:
        torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_str_at_very_negative_threshold_equals_torch(cell):
    torch.manual_seed(0)
    ref = TORCH[cell](6, 5, batch_first=True)
    layer = RNNLayer.from_torch(ref, kind="str", s_init=-100.0)
    x = torch.randn(3, 7, 6)
    torch.testing.assert_close(layer(x)[0], ref(x)[0], atol=1e-5, rtol=1e-5)
    assert layer.ranks() == (6, 5)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_gradients_reach_factors(cell):
    torch.manual_seed(0)
    layer = RNNLayer(cell, 6, 8, kind="str", s_init=-1.0)
    layer(torch.randn(2, 5, 6))[0].sum().backward()
    for m in (layer.W, layer.U):
        for p in (m.P, m.sigma, m.Q, m.s):
            assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_export_equal_outputs_params_and_bytes(cell):
    torch.manual_seed(0)
    layer = RNNLayer(cell, 6, 8, kind="str", s_init=0.0)  # tau = max sigma / 2
    with torch.no_grad():
        layer.W.sigma.copy_(torch.linspace(2.0, 0.1, 6))
        layer.U.sigma.copy_(torch.linspace(2.0, 0.1, 8))
    r_w, r_u = layer.ranks()
    assert (r_w, r_u) == (3, 4)
    compact = layer.export()
    x = torch.randn(3, 7, 6)
    torch.testing.assert_close(compact(x)[0], layer(x)[0], atol=1e-5, rtol=1e-5)
    assert compact.ranks() == (r_w, r_u)
    rows = len(compact.bias_ih)
    expected = r_w * (rows + 6) + r_u * (rows + 8) + 2 * rows
    assert num_parameters(compact) == expected
    assert compact_bytes(compact) == 4 * expected
    assert sum(e["nnz"] for e in layer.budget_entries(None)) == expected - 2 * rows


def test_budget_entries_hand_computed():
    layer = RNNLayer("gru", 10, 4, kind="lowrank", kind_u="full", rank_w=2)
    entries = layer.budget_entries((torch.zeros(2, 5, 10),))
    w, u = entries
    assert (w["name"], w["kind"], w["param"], w["shape"]) == ("W", "gru.W", "lowrank", "12x10")
    assert (w["numel"], w["nnz"], w["rank"], w["full_rank"]) == (120, 44, 2, 10)
    assert w["sparsity"] == pytest.approx(1 - 44 / 120)
    assert (w["macs_dense"], w["macs_sparse"]) == (600, 220)
    assert math.isnan(w["threshold"])
    assert (u["numel"], u["nnz"], u["rank"], u["macs_dense"]) == (48, 48, 4, 240)
    s = RNNLayer("gru", 10, 4, kind="str", s_init=0.0)
    tau = s.budget_entries(None)[1]["threshold"]
    assert tau == pytest.approx(0.5 * float(s.U.sigma.detach().max()))


@pytest.mark.parametrize("param", ["full", "lowrank", "str"])
def test_keyword_spotter_export(param):
    torch.manual_seed(0)
    cfg = SpeechModelConfig(param=param, hidden=8, layers=2, rank_w=3, rank_u=4, s_init=-0.8)
    model = build_model(cfg, input_size=5, num_classes=4).eval()
    x = torch.randn(2, 9, 5)
    compact = model.export()
    torch.testing.assert_close(compact(x), model(x), atol=1e-5, rtol=1e-5)
    assert recurrent_params(compact) == recurrent_params(model)


@pytest.mark.parametrize("param", ["full", "lowrank", "str"])
def test_matrix_spectra_rows(param):
    from strlowrank.lowrank import STRMatrix, matrix_spectra

    torch.manual_seed(0)
    model = build_model(SpeechModelConfig(param=param, hidden=8, rank_w=2, rank_u=3), 5, 4)
    rows = matrix_spectra(model, "init")
    assert len(rows) == 5 + 8  # one row per singular value of W [24, 5] and U [24, 8]
    assert {r["layer"] for r in rows} == {"rnns.0"} and {r["stage"] for r in rows} == {"init"}
    u = [r for r in rows if r["matrix"] == "U"]
    assert [r["index"] for r in u] == list(range(8))
    sig = [r["sigma"] for r in u]
    assert sig == sorted(sig, reverse=True)
    m = model.rnns[0].U
    if isinstance(m, STRMatrix):
        assert u[0]["threshold"] == pytest.approx(float(m.tau().detach()))
    else:
        assert math.isnan(u[0]["threshold"])
        expect = torch.linalg.svdvals(m().detach())
        torch.testing.assert_close(torch.tensor(sig), expect, atol=1e-6, rtol=1e-5)

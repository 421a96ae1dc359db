"""RNNLayer equivalences: full rank equals nn.GRU / nn.LSTM (outputs and gradients), the
functional_call recurrence equals torch's private kernel call, STR at s -> -inf equals its dense
init, export keeps outputs, budget entries on a hand-computed case, and a speech model built
from its MatrixSpecs computes what stock nn.GRU / nn.LSTM layers compute with its matrices."""

import math

import pytest
import torch
from torch import nn

from speech.models import SpeechModelConfig, build_model
from strlowrank.method.budget import budget_table, matrix_params
from strlowrank.method.lowrank import MatrixSpec, STRMatrix
from strlowrank.method.rnn import RNNLayer, matrix_spectra

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
    pairs = [
        (layer.W.weight, ref.weight_ih_l0),
        (layer.U.weight, ref.weight_hh_l0),
        (layer.bias_ih, ref.bias_ih_l0),
        (layer.bias_hh, ref.bias_hh_l0),
    ]
    for mine, theirs in pairs:
        torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-6, rtol=1e-5)


def _vf_recurrence(cell, x, weights, state):
    """torch._VF.gru / _VF.lstm, the private call inside nn.GRU.forward (the reference)."""
    if cell == "gru":
        out, h_n = torch._VF.gru(x, state[None], weights, True, 1, 0.0, True, False, True)
        return out, h_n[0]
    out, h_n, c_n = torch._VF.lstm(
        x, (state[0][None], state[1][None]), weights, True, 1, 0.0, True, False, True
    )
    return out, (h_n[0], c_n[0])


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_functional_call_recurrence_equals_vf_outputs_and_gradients(cell):
    torch.manual_seed(0)
    layer = RNNLayer(cell, 6, 8, MatrixSpec("str", s_init=-1.0), split="per_gate").train()
    x = torch.randn(3, 7, 6)
    state = torch.randn(3, 8) if cell == "gru" else (torch.randn(3, 8), torch.randn(3, 8))
    params = list(layer.parameters())
    results = []
    for run in (
        lambda: layer(x, state),
        lambda: _vf_recurrence(
            cell, x, [*layer.stacked_weights(), layer.bias_ih, layer.bias_hh], state
        ),
    ):
        out, final = run()
        h = final if cell == "gru" else final[0]
        results.append((out, h, torch.autograd.grad(out.square().sum() + h.sum(), params)))
    (out, h, grads), (out_ref, h_ref, grads_ref) = results
    torch.testing.assert_close(out, out_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(h, h_ref, atol=1e-6, rtol=0)
    assert len(grads) == len(params) > 4 * 3  # P, sigma, Q, s of every gate's W and U, biases
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_str_at_very_negative_threshold_equals_torch(cell):
    torch.manual_seed(0)
    ref = TORCH[cell](6, 5, batch_first=True)
    layer = RNNLayer.from_torch(ref, spec=MatrixSpec("str", s_init=-100.0))
    x = torch.randn(3, 7, 6)
    torch.testing.assert_close(layer(x)[0], ref(x)[0], atol=1e-5, rtol=1e-5)
    assert layer.ranks() == (6, 5)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_gradients_reach_factors(cell):
    torch.manual_seed(0)
    layer = RNNLayer(cell, 6, 8, MatrixSpec("str", s_init=-1.0))
    layer(torch.randn(2, 5, 6))[0].sum().backward()
    for m in (layer.W, layer.U):
        for p in (m.P, m.sigma, m.Q, m.s):
            assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_export_equal_outputs_params_and_bytes(cell):
    torch.manual_seed(0)
    layer = RNNLayer(cell, 6, 8, MatrixSpec("str", s_init=0.0))  # tau = max sigma / 2
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
    assert sum(p.numel() for p in compact.parameters()) == expected  # what the export stores
    assert matrix_params(budget_table(compact)) == expected - 2 * rows  # all but the biases
    assert matrix_params(budget_table(layer)) == expected - 2 * rows


def test_budget_entries_hand_computed():
    layer = RNNLayer("gru", 10, 4, MatrixSpec("lowrank", rank=2), MatrixSpec("full"))
    entries = layer.budget_entries((torch.zeros(2, 5, 10),))
    w, u = entries
    assert (w["name"], w["kind"], w["param"], w["shape"]) == ("W", "gru.W", "lowrank", "12x10")
    assert (w["numel"], w["nnz"], w["rank"], w["full_rank"]) == (120, 44, 2, 10)
    assert w["sparsity"] == pytest.approx(1 - 44 / 120)
    assert (w["macs_dense"], w["macs_sparse"]) == (600, 220)
    assert math.isnan(w["threshold"])
    assert (u["numel"], u["nnz"], u["rank"], u["macs_dense"]) == (48, 48, 4, 240)
    s = RNNLayer("gru", 10, 4, MatrixSpec("str", s_init=0.0))
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
    assert matrix_params(budget_table(compact)) == matrix_params(budget_table(model))


@pytest.mark.parametrize("param", ["full", "lowrank", "str"])
def test_matrix_spectra_rows(param):
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


# ------------------------------------------------------------------------------ per-gate split
GATE_COUNT = {"gru": 3, "lstm": 4}


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_per_gate_full_equals_stacked_outputs_and_gradients(cell):
    torch.manual_seed(0)
    stacked = RNNLayer(cell, 6, 5)
    torch.manual_seed(0)
    per_gate = RNNLayer(cell, 6, 5, split="per_gate")
    for mine, theirs in zip(per_gate.stacked_weights(), stacked.stacked_weights()):
        torch.testing.assert_close(mine, theirs, atol=0, rtol=0)  # same draw, row blocks
    x = torch.randn(3, 7, 6)
    out_s, out_p = stacked(x)[0], per_gate(x)[0]
    torch.testing.assert_close(out_p, out_s, atol=0, rtol=0)
    out_s.square().sum().backward()
    out_p.square().sum().backward()
    gates = "rzn" if cell == "gru" else "ifgo"
    for side in "WU":
        grad = torch.cat([getattr(per_gate, f"{side}_{g}").weight.grad for g in gates])
        torch.testing.assert_close(grad, getattr(stacked, side).weight.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(per_gate.bias_hh.grad, stacked.bias_hh.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_per_gate_str_at_very_negative_threshold_equals_torch(cell):
    torch.manual_seed(0)
    ref = TORCH[cell](3, 5, batch_first=True)
    layer = RNNLayer.from_torch(ref, spec=MatrixSpec("str", s_init=-100.0), split="per_gate")
    x = torch.randn(3, 7, 3)
    torch.testing.assert_close(layer(x)[0], ref(x)[0], atol=1e-5, rtol=1e-5)
    g = GATE_COUNT[cell]
    assert layer.ranks() == (3,) * g + (5,) * g
    names = list(layer.matrices())
    assert names[0] == ("W_r" if cell == "gru" else "W_i") and len(names) == 2 * g


def test_per_gate_ranks_budget_export_and_spectra():
    torch.manual_seed(0)
    layer = RNNLayer("gru", 6, 8, MatrixSpec("str", s_init=0.0), split="per_gate")
    with torch.no_grad():
        for i, m in enumerate(layer.matrices().values()):
            m.sigma.copy_(torch.linspace(2.0, 0.1, len(m.sigma)) * (1 + i % 3))
            m.s.fill_(-1.0 - i / 4)  # a different threshold per gate: different ranks
    ranks = layer.ranks()
    assert len(ranks) == 6 and len(set(ranks)) > 1
    entries = layer.budget_entries(None)
    assert [e["name"] for e in entries] == ["W_r", "W_z", "W_n", "U_r", "U_z", "U_n"]
    assert [e["shape"] for e in entries] == ["8x6"] * 3 + ["8x8"] * 3
    assert [e["rank"] for e in entries] == list(ranks)
    assert [e["full_rank"] for e in entries] == [6] * 3 + [8] * 3
    compact = layer.export()
    x = torch.randn(3, 7, 6)
    torch.testing.assert_close(compact(x)[0], layer(x)[0], atol=1e-5, rtol=1e-5)
    assert compact.split == "per_gate" and list(compact.matrices()) == list(layer.matrices())
    assert sum(e["nnz"] for e in compact.budget_entries(None)) == sum(e["nnz"] for e in entries)
    model = torch.nn.Module()
    model.rnn = layer
    rows = matrix_spectra(model, "final")
    assert len(rows) == 3 * 6 + 3 * 8
    assert sorted({r["matrix"] for r in rows}) == sorted(layer.matrices())


@pytest.mark.parametrize("cell,param", [("gru", "lowrank"), ("lstm", "str"), ("gru", "full")])
def test_per_gate_two_layer_keyword_spotter(cell, param):
    torch.manual_seed(0)
    cfg = SpeechModelConfig(
        cell=cell,
        param=param,
        hidden=8,
        layers=2,
        rank_w=3,
        rank_u=4,
        s_init=-0.8,
        split="per_gate",
    )
    model = build_model(cfg, input_size=5, num_classes=4).eval()
    x = torch.randn(2, 9, 5)
    compact = model.export()
    torch.testing.assert_close(compact(x), model(x), atol=1e-5, rtol=1e-5)
    assert matrix_params(budget_table(compact)) == matrix_params(budget_table(model))
    g = GATE_COUNT[cell]
    assert [len(r) for r in model.ranks()] == [2 * g, 2 * g]
    if param == "lowrank":  # rank_w / rank_u for every gate; W_g [8, 5] (layer 1: [8, 8])
        assert model.ranks()[0] == (3,) * g + (4,) * g  # U_g [8, 8] at rank 4: 64 either way
        assert matrix_params(budget_table(model)) == g * (3 * (8 + 5) + 64) + g * (3 * (8 + 8) + 64)
    with pytest.raises(ValueError, match="model.rank_u: 9 is above the full rank 8"):
        build_model(
            SpeechModelConfig(param="lowrank", hidden=8, rank_w=3, rank_u=9, split="per_gate"), 5, 4
        )


# ------------------------------------------------------------------------------ init from
def _checkpoint(tmp_path, cfg: SpeechModelConfig, epochs: int = 2, done: int = 2, inputs: int = 5):
    """A trained-model checkpoint with its config, as the trainer writes it."""
    from speech.config import SpeechConfig
    from strlowrank.training.checkpoint import save_checkpoint
    from strlowrank.training.config import to_dict

    torch.manual_seed(1)
    model = build_model(cfg, input_size=inputs, num_classes=4).eval()
    full = SpeechConfig(model=cfg)
    full.train.epochs = epochs
    path = tmp_path / "source" / "checkpoint.pt"
    save_checkpoint({"model": model.state_dict(), "config": to_dict(full), "epoch": done}, path)
    return model, path


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_init_from_full_and_full_rank_lowrank_equal_the_source(tmp_path, cell):
    from speech.models import init_from_checkpoint

    source_cfg = SpeechModelConfig(cell=cell, param="full", hidden=6, layers=2)
    source, path = _checkpoint(tmp_path, source_cfg, inputs=6)
    x = torch.randn(2, 9, 6)
    for param, split in (
        ("full", "stacked"),
        ("lowrank", "stacked"),
        ("lowrank", "per_gate"),
        ("str", "per_gate"),
    ):
        cfg = SpeechModelConfig(
            cell=cell,
            param=param,
            hidden=6,
            layers=2,
            rank_w=6,
            rank_u=6,
            s_init=-100.0,
            split=split,
            init_from=str(path),
        )
        model = build_model(cfg, input_size=6, num_classes=4).eval()
        init_from_checkpoint(model, path)
        exact = param == "full"
        torch.testing.assert_close(
            model(x), source(x), atol=0 if exact else 1e-5, rtol=0 if exact else 1e-4
        )


def test_init_from_lowrank_is_the_truncated_svd(tmp_path):
    from speech.models import init_from_checkpoint

    source, path = _checkpoint(tmp_path, SpeechModelConfig(param="full", hidden=6))
    for split in ("stacked", "per_gate"):
        cfg = SpeechModelConfig(param="lowrank", hidden=6, rank_w=2, rank_u=3, split=split)
        model = build_model(cfg, input_size=5, num_classes=4)
        init_from_checkpoint(model, path)
        layer, src = model.rnns[0], source.rnns[0]
        for side, rank in (("W", 2), ("U", 3)):
            dense = getattr(src, side)().detach()
            blocks = [dense] if split == "stacked" else list(dense.chunk(3))
            mats = [m for n, m in layer.matrices().items() if n.startswith(side)]
            for block, m in zip(blocks, mats):
                u, s, vh = torch.linalg.svd(block, full_matrices=False)
                truncated = (u[:, :rank] * s[:rank]) @ vh[:rank]
                torch.testing.assert_close(m().detach(), truncated, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.classifier.weight, source.classifier.weight)


def test_init_from_mismatch_and_unfinished_name_the_file(tmp_path):
    from speech.models import init_from_checkpoint
    from strlowrank.training.checkpoint import CheckpointError

    _, path = _checkpoint(tmp_path, SpeechModelConfig(param="full", hidden=6))
    lstm = build_model(SpeechModelConfig(cell="lstm", hidden=6), 5, 4)
    with pytest.raises(CheckpointError, match=f"{path}: model.cell is 'gru' in the checkpoint"):
        init_from_checkpoint(lstm, path)
    with pytest.raises(CheckpointError, match="classifier shape"):
        init_from_checkpoint(build_model(SpeechModelConfig(hidden=6), 5, 7), path)
    _, partial = _checkpoint(tmp_path / "p", SpeechModelConfig(param="full", hidden=6), 4, 1)
    with pytest.raises(CheckpointError, match="unfinished run .epoch 1 of 4"):
        init_from_checkpoint(build_model(SpeechModelConfig(hidden=6), 5, 4), partial)


# ------------------------------------------------------------------------------ matrix specs
SPEC_CASES = {
    "default": {},
    "per_gate": dict(split="per_gate"),
    "lstm": dict(cell="lstm"),
    "lowrank_randn_per_gate_2_layers": dict(
        param="lowrank", lowrank_init="randn", layers=2, split="per_gate", rank_w=3, rank_u=5
    ),
    "lowrank_svd": dict(param="lowrank", rank_w=4, rank_u=6),
    "str_rms_lstm_per_gate": dict(
        cell="lstm", split="per_gate", threshold_scale="rms", s_init=-0.5, s_bias=0.25
    ),
}


@pytest.mark.parametrize("case", list(SPEC_CASES))
def test_keyword_spotter_equals_stock_rnns(case):
    """The speech model built through MatrixSpec -> RNNLayer -> make_matrix computes what stock
    nn.GRU / nn.LSTM layers compute with its effective matrices (the gate blocks stacked in
    torch's order) and biases, followed by the mean over time and the classifier."""
    cfg = SpeechModelConfig(hidden=16, **SPEC_CASES[case])
    torch.manual_seed(7)
    model = build_model(cfg, input_size=5, num_classes=4).eval()
    gates = "rzn" if cfg.cell == "gru" else "ifgo"
    blocks = [""] if cfg.split == "stacked" else [f"_{g}" for g in gates]
    assert len(model.rnns) == cfg.layers
    x = torch.randn(2, 9, 5)
    h = x
    with torch.no_grad():
        for layer in model.rnns:
            w, u = (torch.cat([layer.get_submodule(side + b)() for b in blocks]) for side in "WU")
            rnn = TORCH[cfg.cell](h.shape[2], cfg.hidden, batch_first=True)
            rnn.load_state_dict(
                {
                    "weight_ih_l0": w,
                    "weight_hh_l0": u,
                    "bias_ih_l0": layer.bias_ih,
                    "bias_hh_l0": layer.bias_hh,
                }
            )
            h = rnn(h)[0]
        expected = model.classifier(h.mean(dim=1))
        torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=0)


def test_init_from_with_the_cost_unit_shares_it_over_the_trained_spectra(tmp_path):
    """threshold_scale cost: after --init-from every STR matrix's unit is u (out + in) with u
    the largest trained sigma per parameter, and the model still equals the source at s -> -inf;
    a resumed run keeps the unit it was trained with (a buffer in the state dict)."""
    from speech.models import init_from_checkpoint

    source, path = _checkpoint(tmp_path, SpeechModelConfig(param="full", hidden=6, layers=2))
    cfg = SpeechModelConfig(
        param="str", hidden=6, layers=2, split="per_gate", threshold_scale="cost", s_init=-100.0
    )
    model = build_model(cfg, input_size=5, num_classes=4).eval()
    init_from_checkpoint(model, path)
    x = torch.randn(2, 7, 5)
    torch.testing.assert_close(model(x), source(x), atol=1e-5, rtol=1e-4)
    mats = [m for rnn in model.rnns for m in rnn.matrices().values()]
    cost = [m.P.shape[0] + m.Q.shape[0] for m in mats]
    unit = max(float(m.sigma.max()) / c for m, c in zip(mats, cost))
    for m, c in zip(mats, cost):
        assert float(m.sigma_ref) == pytest.approx(unit * c, rel=1e-6)
    fresh = build_model(cfg, input_size=5, num_classes=4)
    assert float(fresh.rnns[0].W_r.sigma_ref) != pytest.approx(float(mats[0].sigma_ref))
    fresh.load_state_dict(model.state_dict())
    assert float(fresh.rnns[0].W_r.sigma_ref) == pytest.approx(float(mats[0].sigma_ref))


def test_learned_allocation_keeps_the_str_sources_ranks_and_function(tmp_path):
    """model.allocation learned: a fixed-rank model at the ranks an STR checkpoint learned, equal
    to it (a rank-r matrix truncated at r is itself); another split is refused with one line."""
    from speech.models import allocate_ranks, init_from_checkpoint
    from strlowrank.training.checkpoint import CheckpointError

    for split in ("stacked", "per_gate"):
        src_cfg = SpeechModelConfig(param="str", hidden=6, split=split, s_init=-100.0)
        torch.manual_seed(2)
        src = build_model(src_cfg, input_size=5, num_classes=4).eval()
        for k, m in enumerate(src.rnns[0].matrices().values()):  # ranks 0, 1, 2, ...
            m.s.data.fill_(10.0)
            m.sigma_ref.fill_(float(m.sigma.detach().sort(descending=True).values[k]) * 1.0001)
        src_ranks = src.rnns[0].ranks()
        assert len(set(src_ranks)) > 1 and 0 in src_ranks
        from speech.config import SpeechConfig
        from strlowrank.training.checkpoint import save_checkpoint
        from strlowrank.training.config import to_dict

        path = tmp_path / split / "checkpoint.pt"
        state = {"model": src.state_dict(), "config": to_dict(SpeechConfig(model=src_cfg))}
        save_checkpoint(state | {"epoch": 20}, path)
        cfg = SpeechModelConfig(param="lowrank", hidden=6, split=split, allocation="learned")
        model = build_model(cfg, input_size=5, num_classes=4)
        ranks = allocate_ranks(model, path, None)
        assert tuple(ranks.values()) == src_ranks
        model.set_ranks_(ranks)
        init_from_checkpoint(model, path)
        assert model.rnns[0].ranks() == src_ranks
        x = torch.randn(2, 7, 5)
        torch.testing.assert_close(model.eval()(x), src(x), atol=1e-5, rtol=1e-4)
    other = build_model(SpeechModelConfig(param="lowrank", hidden=6, allocation="learned"), 5, 4)
    with pytest.raises(CheckpointError, match="model.split is 'per_gate' in the checkpoint"):
        allocate_ranks(other, path, None)

"""The compiled GRU (strlowrank.export.gru_cpp) equals the eager export and the RNNLayer.

The first test in a session that uses the ``compiled`` fixture builds the extension (~15-30 s
on a cold cache); every later one reuses the loaded op. Those tests are skipped where no C++
compiler or ninja is installed.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest
import torch
from torch import nn

from strlowrank.export import export_gru, gru_cpp
from strlowrank.method.lowrank import MatrixSpec
from strlowrank.method.rnn import RNNLayer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    # runs before conftest's per-test fixture: point the build at the session's private cache
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STRLOWRANK_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        if not gru_cpp.available():
            pytest.skip(f"compiled GRU unavailable: {gru_cpp.unavailable_reason()}")
        yield


def _check(module: nn.Module, reference: nn.Module, x: torch.Tensor, h0: torch.Tensor | None):
    with torch.no_grad():
        out, h = module(x, h0)
        out_ref, h_ref = reference(x, h0)
    assert out.shape == out_ref.shape and h.shape == h_ref.shape
    assert float((out - out_ref).abs().max()) <= 1e-5
    assert float((h - h_ref).abs().max()) <= 1e-5


# (input, hidden, kind, rank_w, rank_u, W factored, U factored); ranks below
# out in / (out + in) stay factored, the others are stored dense by the export.
CASES = [
    (12, 16, "lowrank", 3, 4, True, True),
    (32, 128, "lowrank", 32, 32, False, True),  # the P3 shape: W dense (r_W = I), U factored
    (20, 24, "lowrank", 4, 20, True, False),
    (5, 6, "full", None, None, False, False),
    (12, 16, "str", None, None, True, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"I{c[0]}H{c[1]}-{c[2]}")
@pytest.mark.usefixtures("compiled")
def test_cpp_equals_eager_and_layer(case: tuple) -> None:
    torch.manual_seed(0)
    inp, hid, kind, rank_w, rank_u, w_fact, u_fact = case
    spec_w, spec_u = (MatrixSpec(kind, rank=r, s_init=-1.0) for r in (rank_w, rank_u))
    layer = RNNLayer("gru", inp, hid, spec=spec_w, spec_u=spec_u)
    layer.eval()
    eager = export_gru(layer)
    cpp = export_gru(layer, backend="cpp")
    assert isinstance(cpp, gru_cpp.CompiledLowRankGRU)
    if kind != "str":
        assert (cpp.w_factored, cpp.u_factored) == (w_fact, u_fact)
    for batch, steps in ((1, 9), (5, 23)):
        x = torch.randn(batch, steps, inp)
        for h0 in (None, torch.randn(batch, hid)):
            _check(cpp, eager, x, h0)
            _check(cpp, layer, x, h0)


@pytest.mark.usefixtures("compiled")
def test_cpp_blocks_edge_cases_and_fallback() -> None:
    torch.manual_seed(0)
    layer = RNNLayer("gru", 6, 8, MatrixSpec("lowrank", rank=2), MatrixSpec("lowrank", rank=3))
    layer.eval()
    cpp = export_gru(layer, backend="cpp")
    weights = tuple(getattr(cpp, n) for n in cpp._names)
    x, h0 = torch.randn(3, 11, 6), torch.randn(3, 8)
    with torch.no_grad():
        ref = layer(x, h0)
        for block in (1, 4, 100):  # input projection in blocks of steps
            out, h = gru_cpp.gru_forward(x, h0, weights, cpp.w_factored, cpp.u_factored, block)
            torch.testing.assert_close(out, ref[0], rtol=0, atol=1e-5)
            torch.testing.assert_close(h, ref[1], rtol=0, atol=1e-5)
        out, h = cpp(x[:, :0], h0)  # T = 0: the initial state comes back
        assert out.shape == (3, 0, 8) and torch.equal(h, h0)
        out, h = cpp(x.transpose(0, 1).contiguous().transpose(0, 1))  # non-contiguous x
        torch.testing.assert_close(out, layer(x)[0], rtol=0, atol=1e-5)
        with pytest.raises(RuntimeError, match="h0 must be"):
            cpp(x, torch.randn(2, 8))
        with pytest.raises(RuntimeError, match="float32"):
            cpp(x.double())
    # an input that needs gradients runs the eager LowRankGRU math (autograd works)
    out, _ = cpp(x.clone().requires_grad_())
    out.sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(out.detach(), layer(x)[0], rtol=0, atol=1e-5)


@pytest.mark.usefixtures("compiled")
def test_export_nn_gru_cpp() -> None:
    torch.manual_seed(0)
    gru = nn.GRU(10, 32, batch_first=True).eval()
    cpp = export_gru(gru, backend="cpp")
    assert not cpp.w_factored and not cpp.u_factored
    for batch in (1, 4):
        x = torch.randn(batch, 17, 10)
        for h0 in (None, torch.randn(batch, 32)):
            with torch.no_grad():
                out, h = cpp(x, h0)
                out_ref, h_ref = gru(x, None if h0 is None else h0.unsqueeze(0))
            assert float((out - out_ref).abs().max()) <= 1e-5
            assert float((h - h_ref[0]).abs().max()) <= 1e-5
    with pytest.raises(ValueError, match="backend"):
        export_gru(gru, backend="onnx")


def test_unavailable_gives_one_line_error(monkeypatch) -> None:
    monkeypatch.setitem(gru_cpp._state, "loaded", False)
    monkeypatch.setitem(gru_cpp._state, "error", "ninja is not installed (pip install ninja)")
    with pytest.raises(RuntimeError, match=r"backend='cpp'\): ninja is not installed"):
        export_gru(nn.GRU(3, 4, batch_first=True), backend="cpp")
    assert not gru_cpp.available()


def test_cache_folder_follows_the_source(tmp_path, monkeypatch) -> None:
    """The build folder is named by the source's text: an edited source is compiled anew."""
    first = gru_cpp.cache_dir()
    assert gru_cpp.cache_dir() == first and "TORCH_LIBRARY(strlowrank_gru" in gru_cpp.source()
    edited = tmp_path / "lowrank_gru.cpp"
    edited.write_text(gru_cpp.source() + "// edited\n")
    monkeypatch.setattr(gru_cpp, "_SOURCE", edited)
    assert gru_cpp.cache_dir() != first


def test_source_ships_as_package_data() -> None:
    tomllib = pytest.importorskip("tomllib")
    package = ROOT / "strlowrank"
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["strlowrank"]
    relative = gru_cpp._SOURCE.relative_to(package).as_posix()
    assert any(fnmatch.fnmatch(relative, g) for g in globs), (relative, globs)

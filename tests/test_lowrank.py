"""Equivalences of the factorized matrices: identity at s -> -inf, scale lives in sigma,
function-preserving refactorization, rank counting, factors and parameter counts, the
factored-vs-dense rule and MatrixSpec."""

import math

import pytest
import torch

from strlowrank.method.lowrank import (
    FullMatrix,
    LowRankMatrix,
    MatrixSpec,
    Refactorize,
    STRMatrix,
    factored_is_cheaper,
    make_matrix,
    refactorize_,
    spec_of,
)


def _str_with_spectrum(sigma: list[float], s: float, out: int = 6, inp: int = 4) -> STRMatrix:
    """An STRMatrix with orthonormal P, Q and a hand-built spectrum."""
    m = STRMatrix(out, inp, s_init=s)
    with torch.no_grad():
        m.sigma.copy_(torch.tensor(sigma))
    return m


def test_very_negative_threshold_is_identity():
    torch.manual_seed(0)
    w = torch.randn(12, 5)
    m = STRMatrix(12, 5, s_init=-100.0, init=w)
    assert m.rank() == 5
    torch.testing.assert_close(m(), w, atol=1e-5, rtol=1e-5)


def test_rank_counting_on_hand_built_spectrum():
    g = 1 / (1 + math.exp(-0.0))  # s = 0: tau = 0.5 * max sigma = 2.0
    m = _str_with_spectrum([4.0, 3.0, 2.5, 1.0], s=0.0)
    assert float(m.tau().detach()) == pytest.approx(g * 4.0)
    assert m.rank() == 3
    torch.testing.assert_close(m.spectrum(), torch.tensor([2.0, 1.0, 0.5, 0.0]))
    assert m.num_params() == min(3 * (6 + 4), 6 * 4)  # factors only when smaller than dense
    fixed = _str_with_spectrum([4.0, 3.0, 2.5, 1.0], s=0.0)
    fixed.threshold_scale = "one"  # raw STR: tau = g(s) = 0.5
    assert fixed.rank() == 4


def test_threshold_cannot_be_undone_by_rescaling():
    torch.manual_seed(0)
    m = STRMatrix(8, 5, s_init=-1.0)
    before, rank = m().clone(), m.rank()
    with torch.no_grad():  # rescaling factors is normalized away
        m.P.mul_(7.0)
        m.Q.mul_(0.1)
    torch.testing.assert_close(m(), before)
    with torch.no_grad():  # growing the whole spectrum grows the threshold with it
        m.sigma.mul_(10.0)
    assert m.rank() == rank
    torch.testing.assert_close(m(), 10.0 * before, atol=1e-5, rtol=1e-5)


def test_refactorize_preserves_function_and_puts_scale_in_sigma():
    torch.manual_seed(0)
    m = STRMatrix(10, 6, s_init=-1.2)  # tau = 0.23 * 5 = 1.15: rank 3
    with torch.no_grad():
        m.sigma.copy_(torch.tensor([5.0, 4.0, 3.0, 1.0, 0.5, 0.2]))
        # drift away from orthonormal factors with unequal column norms
        m.P.add_(0.3 * torch.randn_like(m.P)).mul_(torch.linspace(0.5, 3.0, 6))
        m.Q.add_(0.3 * torch.randn_like(m.Q))
    before, rank = m().clone(), m.rank()
    assert rank == 3
    assert refactorize_(m) == 1
    torch.testing.assert_close(m(), before, atol=1e-5, rtol=1e-4)
    assert m.rank() == rank
    eye = torch.eye(6)
    torch.testing.assert_close(m.P.T @ m.P, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(m.Q.T @ m.Q, eye, atol=1e-5, rtol=0)
    cb = Refactorize(every_steps=2, every_epochs=0)
    cb.on_step_end(m, 1)
    torch.testing.assert_close(m(), before, atol=1e-5, rtol=1e-4)


def test_gradients_reach_all_str_parameters():
    torch.manual_seed(0)
    m = STRMatrix(8, 5, s_init=-1.0)
    (m() ** 2).sum().backward()
    for p in (m.P, m.sigma, m.Q, m.s):
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["full", "lowrank", "str"])
def test_factors_reproduce_matrix_and_count_params(kind):
    torch.manual_seed(0)
    m = make_matrix(MatrixSpec(kind, rank=3, s_init=-0.8), 9, 5)
    a, b = m.factors()
    torch.testing.assert_close(a @ b, m().detach(), atol=1e-5, rtol=1e-5)
    r = m.rank()
    assert a.shape == (9, r) and b.shape == (r, 5)
    expected = 45 if kind == "full" else min(r * (9 + 5), 45)  # dense when factors are larger
    assert m.num_params() == expected


def test_lowrank_inits():
    torch.manual_seed(0)
    w = torch.randn(7, 5)
    m = LowRankMatrix(7, 5, 5, init=w)  # full-rank truncation of the SVD is exact
    torch.testing.assert_close(m(), w, atol=1e-5, rtol=1e-5)
    r = LowRankMatrix(7, 5, 2, init="randn")
    assert r.rank() == 2 and r.W1.std() < 0.3
    assert FullMatrix(7, 5).rank() == 5
    with pytest.raises(ValueError, match="needs a rank"):
        MatrixSpec("lowrank")
    with pytest.raises(ValueError, match="MatrixSpec.kind: 'sparse'"):
        MatrixSpec("sparse")


def test_factored_is_cheaper_is_strict_and_sets_num_params():
    # r (out + in) < out in; at equality (4 x 4 at rank 2: 16 = 16) the dense form is kept
    assert factored_is_cheaper(1, 4, 4) and not factored_is_cheaper(2, 4, 4)
    assert factored_is_cheaper(3, 12, 10) and not factored_is_cheaper(6, 12, 10)  # 66 < 120, 132
    for rank, expected in ((1, 8), (2, 16), (3, 16)):
        assert LowRankMatrix(4, 4, rank).num_params() == expected
    m = _str_with_spectrum([4.0, 3.0, 2.5, 1.0], s=0.0, out=4, inp=4)  # rank 3: dense, 16
    assert m.rank() == 3 and m.num_params() == 16


def test_matrix_spec_builds_and_round_trips():
    torch.manual_seed(0)
    dense = torch.randn(6, 4)
    spec = MatrixSpec("str", s_init=-1.5, threshold_scale="init", s_bias=0.5)
    m = make_matrix(spec, 6, 4, dense)
    assert (float(m.s.detach()), m.threshold_scale, float(m.s_bias)) == (-1.5, "init", 0.5)
    assert spec_of(m) == spec and spec_of(make_matrix(MatrixSpec("full"), 6, 4)).kind == "full"
    low = make_matrix(MatrixSpec("lowrank", rank=2), 6, 4, dense)
    torch.testing.assert_close(low(), LowRankMatrix(6, 4, 2, init=dense)(), atol=0, rtol=0)
    assert spec_of(low) == MatrixSpec("lowrank", rank=2)
    torch.manual_seed(1)
    randn = make_matrix(MatrixSpec("lowrank", rank=2, lowrank_init="randn"), 6, 4, dense)
    torch.manual_seed(1)
    torch.testing.assert_close(randn.W1, 0.1 * torch.randn(6, 2), atol=0, rtol=0)  # dense unused
    for bad in (dict(threshold_scale="mean"), dict(lowrank_init="zeros")):
        with pytest.raises(ValueError, match="MatrixSpec"):
            MatrixSpec("str", **bad)

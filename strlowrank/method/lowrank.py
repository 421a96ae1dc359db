"""Factorized matrices for low-rank RNNs: full, fixed low rank, and STR on singular values.

docs/METHOD.md section 2 (STR, Kusupati et al., ICML 2020, section 4.2). An STR matrix is

    W = P_n diag(relu(sigma - tau)) Q_n^T,      tau = g(s) * max_i sigma_i,   g = sigmoid

with P_n, Q_n the column-normalized factors P [out, k], Q [in, k] (k = min(out, in)), sigma [k]
the spectrum and s one threshold parameter per matrix. The learned rank is the number of
nonzero thresholded values relu(sigma_i - tau). Two properties make the rank learnable:

- scale lives in sigma only: rescaling a column of P or Q changes nothing (it is normalized away);
- the threshold is relative to the spectrum's own scale: multiplying sigma by c > 0 multiplies
  tau by c as well, so growing the spectrum cannot escape the threshold; g(s) < 1 keeps the top
  singular value, so a matrix never collapses below rank 1.

The fixed-rank baseline is W = W1 W2 (EdgeML-style, FastGRNN). ``refactorize_`` re-orthonormalizes
P and Q by an SVD without changing any effective matrix. A ``MatrixSpec`` names a matrix's kind
and settings; ``make_matrix`` builds it. Every deployable form stores factors of rank r for an
[out, in] matrix only when ``factored_is_cheaper``: r (out + in) < out in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("full", "lowrank", "str")
THRESHOLD_SCALES = ("max", "rms", "init", "one", "cost")
LOWRANK_INITS = ("svd", "randn")


def factored_is_cheaper(rank: int, out_features: int, in_features: int) -> bool:
    """True when factors A [out, r], B [r, in] hold fewer numbers than the dense W [out, in]:

        r (out + in) < out in,

    i.e. r < out in / (out + in). At equality the dense matrix is kept (same size, one product).
    """
    return rank * (out_features + in_features) < out_features * in_features


def compact_size(rank: int, out_features: int, in_features: int) -> int:
    """Numbers in the deployable form: r (out + in) if ``factored_is_cheaper``, else out in."""
    if factored_is_cheaper(rank, out_features, in_features):
        return rank * (out_features + in_features)
    return out_features * in_features


def uniform_init(out_features: int, in_features: int, bound: float | None = None) -> torch.Tensor:
    """U(-bound, bound) [out, in], default bound 1/sqrt(in) (torch RNNs use 1/sqrt(hidden))."""
    bound = 1.0 / math.sqrt(in_features) if bound is None else bound
    return torch.empty(out_features, in_features).uniform_(-bound, bound)


def _float32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype != torch.float32 else t


class FullMatrix(nn.Module):
    """A dense matrix W [out, in]; its compact form is itself (out * in parameters)."""

    param_roles = {"weight": "weight"}

    def __init__(self, out_features: int, in_features: int, init: torch.Tensor | None = None):
        super().__init__()
        w = uniform_init(out_features, in_features) if init is None else init.detach().clone()
        self.weight = nn.Parameter(w.float())

    def forward(self) -> torch.Tensor:
        return _float32(self.weight)

    def rank(self) -> int:
        """The full rank min(out, in) (the matrix is stored densely whatever its numerical rank)."""
        return min(self.weight.shape)

    def num_params(self) -> int:
        return self.weight.numel()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, I_in) or (I_out, W): A [out, r] @ B [r, in] == W with r = min(out, in)."""
        w = self.forward().detach()
        out_f, in_f = w.shape
        if out_f >= in_f:
            return w.clone(), torch.eye(in_f, dtype=w.dtype, device=w.device)
        return torch.eye(out_f, dtype=w.dtype, device=w.device), w.clone()


class LowRankMatrix(nn.Module):
    """W = W1 W2 with W1 [out, r], W2 [r, in] and a fixed rank r (r (out + in) parameters).

    ``init`` is a dense [out, in] matrix factorized by truncated SVD (W1 = U_r sqrt(S_r),
    W2 = sqrt(S_r) V_r^T), or the string ``"randn"`` for EdgeML's 0.1 * N(0, 1) factors.
    """

    param_roles = {"W1": "weight", "W2": "weight"}

    def __init__(
        self,
        out_features: int,
        in_features: int,
        rank: int,
        init: torch.Tensor | str | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= rank <= min(out_features, in_features):
            raise ValueError(f"rank {rank} outside [0, {min(out_features, in_features)}]")
        if isinstance(init, str):
            if init != "randn":
                raise ValueError(f"unknown low-rank init {init!r} (a tensor, None or 'randn')")
            w1, w2 = 0.1 * torch.randn(out_features, rank), 0.1 * torch.randn(rank, in_features)
        else:
            dense = uniform_init(out_features, in_features) if init is None else init.float()
            u, s, vh = torch.linalg.svd(dense.detach(), full_matrices=False)
            root = s[:rank].sqrt()
            w1, w2 = u[:, :rank] * root, root[:, None] * vh[:rank]
        self.W1 = nn.Parameter(w1.contiguous())
        self.W2 = nn.Parameter(w2.contiguous())

    @classmethod
    def from_factors(cls, a: torch.Tensor, b: torch.Tensor) -> LowRankMatrix:
        """A fixed-rank matrix holding copies of A [out, r] and B [r, in]."""
        m = cls(a.shape[0], b.shape[1], a.shape[1], init="randn")
        with torch.no_grad():
            m.W1.copy_(a)
            m.W2.copy_(b)
        return m

    def forward(self) -> torch.Tensor:
        return _float32(self.W1) @ _float32(self.W2)

    def rank(self) -> int:
        return self.W1.shape[1]

    def num_params(self) -> int:
        """Parameters of the deployable form: the factors, or the dense matrix if smaller."""
        return compact_size(self.rank(), self.W1.shape[0], self.W2.shape[1])

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.W1.detach().float().clone(), self.W2.detach().float().clone()


class STRMatrix(nn.Module):
    """W = P_n diag(relu(sigma - tau)) Q_n^T, tau = g(s) * scale(sigma) (module docstring).

    Shapes: P [out, k], sigma [k], Q [in, k], s [] with k = min(out, in). Initialized from the
    SVD of ``init`` (default: a standard uniform init), so at s -> -inf it equals ``init``.

    ``threshold_scale``: ``"max"`` (tau = g(s) max sigma, the default), ``"init"`` (g(s) times
    the initial largest singular value, a fixed scale), ``"one"`` (tau = g(s), raw STR) or
    ``"cost"`` (g(s) times a fixed unit shared by a model's matrices in proportion to what one
    direction costs; `share_threshold_unit_` sets it, alone it is ``"init"``).
    """

    param_roles = {"P": "factor", "Q": "factor", "sigma": "spectrum", "s": "threshold"}

    def __init__(
        self,
        out_features: int,
        in_features: int,
        s_init: float = -4.0,
        init: torch.Tensor | None = None,
        threshold_scale: str = "max",
        s_bias: float = 0.0,
    ) -> None:
        super().__init__()
        if threshold_scale not in THRESHOLD_SCALES:
            raise ValueError(f"threshold_scale must be one of {THRESHOLD_SCALES}")
        dense = uniform_init(out_features, in_features) if init is None else init.float()
        u, s, vh = torch.linalg.svd(dense.detach(), full_matrices=False)
        self.P = nn.Parameter(u.contiguous())
        self.sigma = nn.Parameter(s.contiguous())
        self.Q = nn.Parameter(vh.T.contiguous())
        self.s = nn.Parameter(torch.tensor(float(s_init)))
        self.threshold_scale = threshold_scale
        self.register_buffer("sigma_ref", s.max().clone())
        self.register_buffer("s_bias", torch.tensor(float(s_bias)))

    def scale(self) -> torch.Tensor:
        """The threshold's unit: max or RMS of sigma (with gradient), the initial max, or 1."""
        if self.threshold_scale == "max":
            return _float32(self.sigma).max().clamp_min(0.0)
        if self.threshold_scale == "rms":  # sqrt(mean sigma^2) = ||W_sigma||_F / sqrt(k)
            return _float32(self.sigma).square().mean().sqrt()
        if self.threshold_scale in ("init", "cost"):
            return self.sigma_ref.float()
        return torch.ones((), device=self.sigma.device)

    def tau(self) -> torch.Tensor:
        """The threshold in the matrix's units, tau = g(s) * scale (a 0-d tensor)."""
        return self.g() * self.scale()

    def g(self) -> torch.Tensor:
        """g = sigmoid(s + s_bias): the threshold as a fraction of ``scale()``."""
        return torch.sigmoid(_float32(self.s) + self.s_bias)

    def spectrum(self) -> torch.Tensor:
        """The thresholded singular values relu(sigma - tau) [k] (float32, differentiable)."""
        with torch.autocast(device_type=self.sigma.device.type, enabled=False):
            return F.relu(_float32(self.sigma) - self.tau())

    def normalized_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Column-normalized P_n [out, k] and Q_n [in, k]."""
        return F.normalize(_float32(self.P), dim=0), F.normalize(_float32(self.Q), dim=0)

    def forward(self) -> torch.Tensor:
        with torch.autocast(device_type=self.sigma.device.type, enabled=False):
            p, q = self.normalized_factors()
            return (p * self.spectrum()) @ q.T

    def rank(self) -> int:
        """Learned rank: the number of nonzero thresholded singular values."""
        return int((self.spectrum().detach() > 0).sum())

    def num_params(self) -> int:
        """Parameters of the deployable form: r (out + in) as factors, or out in if smaller."""
        return compact_size(self.rank(), self.P.shape[0], self.Q.shape[0])

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A = P_n[:, act] sqrt(e) [out, r], B = sqrt(e) Q_n[:, act]^T [r, in], A @ B == W."""
        with torch.no_grad():
            e = self.spectrum()
            keep = e > 0
            p, q = self.normalized_factors()
            root = e[keep].sqrt()
            return (p[:, keep] * root).clone(), (root[:, None] * q[:, keep].T).clone()

    @torch.no_grad()
    def refactorize_(self) -> None:
        """Re-orthonormalize P, Q by an SVD of W; the effective matrix and the rank are unchanged.

        With W = U diag(S) V^T (S_1 >= ... >= S_r > 0 = S_{r+1} ...), the new threshold tau' and
        spectrum sigma'_i = S_i + tau' (active) reproduce relu(sigma' - tau') = S. For the
        ``max`` scale tau' = g S_1 + g tau', so tau' = g S_1 / (1 - g). Pruned values keep their
        ratio to the threshold (sigma'_j = sigma_j tau' / tau), so they stay pruned.
        """
        e = self.spectrum()
        active = int((e > 0).sum())
        tau_old = float(self.tau())
        u, s_vals, vh = torch.linalg.svd(self.forward(), full_matrices=False)
        g = float(self.g())
        top = float(s_vals[0]) if active else 0.0
        tau = g * top / (1.0 - g) if self.threshold_scale == "max" and active else tau_old
        pruned = torch.sort(self.sigma.float()[e <= 0], descending=True).values
        ratio = tau / tau_old if tau_old > 0 else 1.0
        new_sigma = torch.cat([s_vals[:active] + tau, pruned * ratio])
        self.P.copy_(u)
        self.Q.copy_(vh.T)
        self.sigma.copy_(new_sigma)


@dataclass(frozen=True)
class MatrixSpec:
    """What ``make_matrix`` builds: a matrix's kind and its kind's settings.

    Args:
        kind: ``"full"`` (dense W) | ``"lowrank"`` (W = W1 W2 at a fixed rank) | ``"str"``
            (thresholded singular values, a learned rank).
        rank: the fixed rank of a ``"lowrank"`` matrix (required there; ignored otherwise).
        s_init: STR's initial threshold parameter s (``STRMatrix``).
        threshold_scale: STR's threshold unit (``STRMatrix``): max | rms | init | one.
        s_bias: STR's constant b in g = sigmoid(s + b).
        lowrank_init: ``"svd"`` (truncated SVD of the dense init) or ``"randn"`` (EdgeML's
            0.1 N(0, 1) factors; the dense init is then ignored).
    Settings of other kinds are ignored, so one spec can describe every matrix of a model.
    """

    kind: str = "full"
    rank: int | None = None
    s_init: float = -4.0
    threshold_scale: str = "max"
    s_bias: float = 0.0
    lowrank_init: str = "svd"

    def __post_init__(self) -> None:
        choices = {
            "kind": KINDS,
            "threshold_scale": THRESHOLD_SCALES,
            "lowrank_init": LOWRANK_INITS,
        }
        for field, allowed in choices.items():
            if (value := getattr(self, field)) not in allowed:
                raise ValueError(f"MatrixSpec.{field}: {value!r}, expected one of {allowed}")
        if self.kind == "lowrank" and self.rank is None:
            raise ValueError("MatrixSpec(kind='lowrank') needs a rank")


def make_matrix(
    spec: MatrixSpec, out_features: int, in_features: int, init: torch.Tensor | None = None
) -> nn.Module:
    """The matrix ``spec`` describes, [out, in], from a dense ``init`` [out, in] (default
    U(-1/sqrt(in), 1/sqrt(in))): full = a copy, lowrank = truncated SVD at ``spec.rank`` (or
    random factors, ``lowrank_init="randn"``), str = SVD (equal to ``init`` as s -> -inf)."""
    if spec.kind == "full":
        return FullMatrix(out_features, in_features, init)
    if spec.kind == "lowrank":
        dense = "randn" if spec.lowrank_init == "randn" else init
        return LowRankMatrix(out_features, in_features, spec.rank, dense)
    return STRMatrix(
        out_features,
        in_features,
        s_init=spec.s_init,
        init=init,
        threshold_scale=spec.threshold_scale,
        s_bias=spec.s_bias,
    )


def spec_of(matrix: nn.Module) -> MatrixSpec:
    """The spec that rebuilds ``matrix``'s kind and settings: the rank of a fixed low-rank
    matrix, the current s, threshold unit and bias of an STR matrix (``lowrank_init`` "svd")."""
    if isinstance(matrix, STRMatrix):
        return MatrixSpec(
            "str",
            s_init=float(matrix.s.detach()),
            threshold_scale=matrix.threshold_scale,
            s_bias=float(matrix.s_bias),
        )
    if isinstance(matrix, LowRankMatrix):
        return MatrixSpec("lowrank", rank=matrix.rank())
    return MatrixSpec("full")


@torch.no_grad()
def share_threshold_unit_(model: nn.Module) -> float:
    """Give every STR matrix of ``model`` with ``threshold_scale`` "cost" one threshold unit
    per parameter: sigma_0,m = u (out_m + in_m), with

        u = max_m sigma_max,m / (out_m + in_m)

    over those matrices (sigma_max,m their current top singular value; out + in is what one
    singular direction costs as factors). At equal g(s) a direction is then kept when its
    sigma per parameter exceeds g u, the order in which a greedy allocation
    (`strlowrank.method.allocation.greedy_ranks`) adds directions; g < 1 keeps the top
    direction of the matrix that sets u. Returns u (0.0 when there is no such matrix)."""
    mats = [m for m in model.modules() if isinstance(m, STRMatrix) and m.threshold_scale == "cost"]
    if not mats:
        return 0.0
    cost = [m.P.shape[0] + m.Q.shape[0] for m in mats]
    unit = max(float(m.sigma.float().max().clamp_min(0.0)) / c for m, c in zip(mats, cost))
    for m, c in zip(mats, cost):
        m.sigma_ref.fill_(unit * c)
    return unit


def refactorize_(model: nn.Module) -> int:
    """Call ``refactorize_`` on every STRMatrix of ``model``; returns how many were refactorized."""
    mats = [m for m in model.modules() if isinstance(m, STRMatrix)]
    for m in mats:
        m.refactorize_()
    return len(mats)


class Refactorize:
    """Engine callback: ``refactorize_(model)`` every ``every_steps`` optimizer steps (0: never)
    and at the end of every ``every_epochs``-th epoch (0: never). Reports no metrics.

    Function-preserving, but optimizer moments of P, Q, sigma refer to the old coordinates, so
    prefer rare calls (once per epoch) when the optimizer keeps momentum.
    """

    def __init__(self, every_steps: int = 0, every_epochs: int = 1) -> None:
        self.every_steps = every_steps
        self.every_epochs = every_epochs

    def on_step_end(self, model: nn.Module, step: int) -> None:
        if self.every_steps and (step + 1) % self.every_steps == 0:
            refactorize_(model)

    def on_epoch_end(self, model: nn.Module, epoch: int) -> dict[str, float] | None:
        if self.every_epochs and (epoch + 1) % self.every_epochs == 0:
            refactorize_(model)
        return None

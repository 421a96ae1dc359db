"""GRU and LSTM layers over factorized matrices, run through torch's fused recurrence.

Each layer holds two stacked matrices (gates in torch's order; GRU r, z, n; LSTM i, f, g, o):

    W [G H, I] (input to hidden),   U [G H, H] (hidden to hidden),   G = 3 (GRU) or 4 (LSTM)

each a ``FullMatrix``, ``LowRankMatrix`` (W = W1 W2) or ``STRMatrix``
(W = P_n diag(relu(sigma - g(s) max sigma)) Q_n^T), see ``strlowrank.lowrank``. The effective
matrices are reconstructed once per forward and handed with the biases to torch's fused
GRU/LSTM kernel (``torch._VF.gru`` / ``torch._VF.lstm``, what ``nn.GRU.forward`` calls), so the
time loop never runs in Python and autograd reaches the factors. GRU and LSTM differ only in the
kernel and the number of gates. No parametrization is ever registered on nn.GRU / nn.LSTM
(pytorch issue 65688).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from strlowrank.lowrank import LowRankMatrix, STRMatrix, make_matrix

GATES = {"gru": 3, "lstm": 4}
State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def fused_recurrence(
    cell: str, x: torch.Tensor, weights: list[torch.Tensor], state: State | None, train: bool
) -> tuple[torch.Tensor, State]:
    """Run torch's fused single-layer recurrence on x [B, T, I] with [W, U, b_ih, b_hh].

    Returns outputs [B, T, H] and the final state: h [B, H] (GRU) or (h, c) (LSTM).
    """
    batch, hidden = x.shape[0], weights[1].shape[1]
    weights = [w.to(x.dtype) for w in weights]
    if cell == "gru":
        h0 = x.new_zeros(1, batch, hidden) if state is None else state.unsqueeze(0)
        out, h_n = torch._VF.gru(x, h0, weights, True, 1, 0.0, train, False, True)
        return out, h_n[0]
    if state is None:
        state = (x.new_zeros(batch, hidden), x.new_zeros(batch, hidden))
    hx = (state[0].unsqueeze(0), state[1].unsqueeze(0))
    out, h_n, c_n = torch._VF.lstm(x, hx, weights, True, 1, 0.0, train, False, True)
    return out, (h_n[0], c_n[0])


class RNNLayer(nn.Module):
    """One batch-first GRU/LSTM layer whose W and U are full, fixed low rank or STR matrices.

    Args:
        cell: ``"gru"`` or ``"lstm"``.
        kind: matrix kind of W (and of U unless ``kind_u`` is given): full | lowrank | str.
        rank_w, rank_u: ranks of fixed low-rank matrices.
        s_init: initial threshold parameter of STR matrices (g(s_init) = fraction of max sigma).
        lowrank_init: ``"svd"`` (truncated SVD of the standard init) or ``"randn"`` (0.1 N(0,1)).
        threshold_scale: see ``STRMatrix``.
    Initial dense matrices and biases follow torch: U(-1/sqrt(H), 1/sqrt(H)).
    """

    param_roles = {"bias_ih": "norm_bias", "bias_hh": "norm_bias"}

    def __init__(
        self,
        cell: str,
        input_size: int,
        hidden_size: int,
        kind: str = "full",
        kind_u: str | None = None,
        rank_w: int | None = None,
        rank_u: int | None = None,
        s_init: float = -4.0,
        lowrank_init: str = "svd",
        threshold_scale: str = "max",
        s_bias: float = 0.0,
    ) -> None:
        super().__init__()
        if cell not in GATES:
            raise ValueError(f"cell must be one of {tuple(GATES)}, got {cell!r}")
        self.cell, self.input_size, self.hidden_size = cell, input_size, hidden_size
        rows, bound = GATES[cell] * hidden_size, 1.0 / math.sqrt(hidden_size)
        opts = (s_init, lowrank_init, threshold_scale, s_bias)
        self.W = self._matrix(kind, rows, input_size, rank_w, bound, *opts)
        self.U = self._matrix(kind_u or kind, rows, hidden_size, rank_u, bound, *opts)
        self.bias_ih = nn.Parameter(torch.empty(rows).uniform_(-bound, bound))
        self.bias_hh = nn.Parameter(torch.empty(rows).uniform_(-bound, bound))

    @staticmethod
    def _matrix(kind, rows, cols, rank, bound, s_init, lowrank_init, scale, s_bias) -> nn.Module:
        dense = torch.empty(rows, cols).uniform_(-bound, bound)
        init = "randn" if kind == "lowrank" and lowrank_init == "randn" else dense
        return make_matrix(kind, rows, cols, rank, init, s_init, scale, s_bias)

    def matrices(self) -> dict[str, nn.Module]:
        return {"W": self.W, "U": self.U}

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """x [B, T, I] -> (outputs [B, T, H], final state h [B, H] or (h, c))."""
        weights = [self.W(), self.U(), self.bias_ih, self.bias_hh]
        return fused_recurrence(self.cell, x, weights, state, self.training)

    def ranks(self) -> tuple[int, int]:
        """(r_W, r_U), as the paper reports them."""
        return self.W.rank(), self.U.rank()

    def budget_entries(self, inputs: tuple | None) -> list[dict]:
        """One row per matrix: shape, numel, nnz (compact params), rank, threshold, MACs.

        MACs are per sequence: T out in (dense) and T num_params (compact), T = inputs[0].shape[1].
        """
        steps = float(inputs[0].shape[1]) if inputs and inputs[0] is not None else float("nan")
        rows = []
        rows_, cols = GATES[self.cell] * self.hidden_size, (self.input_size, self.hidden_size)
        for (name, m), in_f in zip(self.matrices().items(), cols):
            out_f = rows_
            numel, nnz = out_f * in_f, m.num_params()
            thr = float(m.tau().detach()) if isinstance(m, STRMatrix) else float("nan")
            rows.append({
                "name": name, "kind": f"{self.cell}.{name}", "param": _kind_of(m),
                "shape": f"{out_f}x{in_f}", "numel": numel, "nnz": nnz,
                "sparsity": 1.0 - nnz / numel, "rank": m.rank(), "full_rank": min(out_f, in_f),
                "threshold": thr, "macs_dense": steps * numel, "macs_sparse": steps * nnz,
            })  # fmt: skip
        return rows

    def export(self) -> RNNLayer:
        """A compact copy: every factorized matrix stored as two factors at its (learned) rank,
        shrunk singular values folded in (a fixed ``lowrank`` layer), unless the dense matrix is
        smaller (r (out + in) >= out in); full matrices stay dense.
        Outputs equal this layer's outputs up to float rounding."""
        compact = RNNLayer(self.cell, self.input_size, self.hidden_size, kind="full")
        for name, m in self.matrices().items():
            a, b = m.factors()
            if a.shape[1] * (a.shape[0] + b.shape[1]) >= a.shape[0] * b.shape[1]:
                new = make_matrix("full", a.shape[0], b.shape[1], init=(a @ b).detach())
            else:  # factors only pay off below r = out in / (out + in)
                new = LowRankMatrix.from_factors(a, b)
            setattr(compact, name, new)
        compact.load_state_dict(
            {"bias_ih": self.bias_ih.detach(), "bias_hh": self.bias_hh.detach()}, strict=False
        )
        return compact.to(self.bias_ih.device)

    @classmethod
    def from_torch(cls, rnn: nn.GRU | nn.LSTM, kind: str = "full", **kwargs) -> RNNLayer:
        """An RNNLayer holding the weights of a single-layer unidirectional nn.GRU/nn.LSTM
        (factorized by SVD for ``kind`` lowrank/str; ``kwargs`` go to the constructor)."""
        if rnn.num_layers != 1 or rnn.bidirectional or not rnn.bias or rnn.proj_size:
            raise ValueError("from_torch needs one unidirectional layer with biases")
        cell = "gru" if isinstance(rnn, nn.GRU) else "lstm"
        layer = cls(cell, rnn.input_size, rnn.hidden_size, kind=kind, **kwargs)
        rows = GATES[cell] * rnn.hidden_size
        for name, w in (("W", rnn.weight_ih_l0), ("U", rnn.weight_hh_l0)):
            m = layer.matrices()[name]
            rank = m.rank() if isinstance(m, LowRankMatrix) else None
            s_init = float(m.s.detach()) if isinstance(m, STRMatrix) else -4.0
            scale = getattr(m, "threshold_scale", "max")
            bias = float(m.s_bias) if isinstance(m, STRMatrix) else 0.0
            new = make_matrix(_kind_of(m), rows, w.shape[1], rank, w.detach(), s_init, scale, bias)
            setattr(layer, name, new)
        with torch.no_grad():
            layer.bias_ih.copy_(rnn.bias_ih_l0)
            layer.bias_hh.copy_(rnn.bias_hh_l0)
        return layer


def _kind_of(m: nn.Module) -> str:
    if isinstance(m, STRMatrix):
        return "str"
    return "lowrank" if isinstance(m, LowRankMatrix) else "full"


def compact_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers of a (compact, exported) model."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def num_parameters(model: nn.Module) -> int:
    """Number of parameter elements of a model (for an exported model: what it stores)."""
    return sum(p.numel() for p in model.parameters())

"""GRU, LSTM and FastGRNN layers over factorized matrices.

Each layer holds two stacked matrices (gates in torch's order; GRU r, z, n; LSTM i, f, g, o):

    W [G H, I] (input to hidden),   U [G H, H] (hidden to hidden),   G = 3 (GRU), 4 (LSTM), 1

where FastGRNN (G = 1) shares its one W and one U between the gate z and the update h~
(`strlowrank.method.fastgrnn`), with biases b_z, b_h (stored as ``bias_ih``, ``bias_hh``) and two
learned scalars ``zeta``, ``nu``;

each a ``FullMatrix``, ``LowRankMatrix`` (W = W1 W2) or ``STRMatrix``
(W = P_n diag(relu(sigma - g(s) max sigma)) Q_n^T), see ``strlowrank.method.lowrank``. With
``split="per_gate"`` every gate has its own pair (GRU W_r, W_z, W_n, U_r, U_z, U_n), each
[H, I] / [H, H] with its own rank, and the stacked matrices are their concatenation

    W = [W_r; W_z; W_n],     U = [U_r; U_z; U_n]

so a GRU layer learns 6 ranks (an LSTM 8) and runs the same kernel (FastGRNN has one pair and
no per-gate split). The effective matrices are reconstructed once per forward and handed with
the biases to a stock nn.GRU / nn.LSTM through ``torch.func.functional_call`` (torch's fused
kernel), so the time loop never runs in Python and autograd reaches the factors; FastGRNN runs
`fastgrnn_recurrence`. GRU and LSTM differ only in the module and the number of gates. No
parametrization is ever registered on nn.GRU / nn.LSTM: their forward reads a cached list of
weight tensors that a parametrization does not update. ``matrix_spectra``
lists the singular values of every recurrent matrix of a model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from strlowrank.method.fastgrnn import fastgrnn_recurrence
from strlowrank.method.lowrank import (
    FullMatrix,
    LowRankMatrix,
    MatrixSpec,
    STRMatrix,
    factored_is_cheaper,
    make_matrix,
    spec_of,
)

# torch's row order; FastGRNN's one W and one U serve both its gate and its update
GATE_NAMES = {"gru": ("r", "z", "n"), "lstm": ("i", "f", "g", "o"), "fastgrnn": ("zh",)}
GATES = {cell: len(names) for cell, names in GATE_NAMES.items()}
SPLITS = ("stacked", "per_gate")
State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
CELLS = tuple(GATES)
TORCH_RNNS = {"gru": nn.GRU, "lstm": nn.LSTM}
FASTGRNN_INIT = {"zeta": 1.0, "nu": -4.0, "bias": 1.0}  # EdgeML's FastGRNN initialization
WEIGHT_NAMES = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")  # nn.GRU's names


def fused_recurrence(
    cell: str, x: torch.Tensor, weights: list[torch.Tensor], state: State | None, train: bool
) -> tuple[torch.Tensor, State]:
    """Run torch's fused single-layer recurrence on x [B, T, I] with [W, U, b_ih, b_hh].

    The weights go by ``torch.func.functional_call`` into a stock batch-first nn.GRU / nn.LSTM
    built on the meta device (no memory, no random draw), so the call is ``nn.GRU.forward``'s
    own: the same fused kernel, with autograd reaching whatever computed the weights.
    Returns outputs [B, T, H] and the final state: h [B, H] (GRU) or (h, c) (LSTM).
    """
    batch, hidden = x.shape[0], weights[1].shape[1]
    rnn = TORCH_RNNS[cell](x.shape[2], hidden, batch_first=True, device="meta").train(train)
    params = dict(zip(WEIGHT_NAMES, (w.to(x.dtype) for w in weights)))
    if cell == "gru":
        h0 = x.new_zeros(1, batch, hidden) if state is None else state.unsqueeze(0)
        out, h_n = torch.func.functional_call(rnn, params, (x, h0))
        return out, h_n[0]
    if state is None:
        state = (x.new_zeros(batch, hidden), x.new_zeros(batch, hidden))
    hx = (state[0].unsqueeze(0), state[1].unsqueeze(0))
    out, (h_n, c_n) = torch.func.functional_call(rnn, params, (x, hx))
    return out, (h_n[0], c_n[0])


class RNNLayer(nn.Module):
    """One batch-first GRU/LSTM/FastGRNN layer whose W and U are full, fixed low rank or STR.

    Args:
        cell: ``"gru"``, ``"lstm"`` or ``"fastgrnn"``.
        spec: the ``MatrixSpec`` of W (kind, fixed rank, STR threshold settings); default full.
        spec_u: the ``MatrixSpec`` of U (default: ``spec``).
        split: ``"stacked"`` (one W [G H, I] and one U [G H, H]) or ``"per_gate"`` (W_g [H, I]
            and U_g [H, H] per gate g, named ``W_r``, ``U_r``, ...; every gate of a side is built
            from that side's spec, so fixed ranks are the same for every gate).
    Initial dense matrices and biases follow torch: U(-1/sqrt(H), 1/sqrt(H)) (the same
    stacked draw for both splits: a per-gate layer starts as the row blocks of the stacked one);
    FastGRNN's biases and scalars follow EdgeML (`FASTGRNN_INIT`).
    """

    param_roles = {
        "bias_ih": "norm_bias",
        "bias_hh": "norm_bias",
        "zeta": "norm_bias",
        "nu": "norm_bias",
    }

    def __init__(
        self,
        cell: str,
        input_size: int,
        hidden_size: int,
        spec: MatrixSpec | None = None,
        spec_u: MatrixSpec | None = None,
        split: str = "stacked",
    ) -> None:
        super().__init__()
        if cell not in GATES:
            raise ValueError(f"cell must be one of {tuple(GATES)}, got {cell!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if cell == "fastgrnn" and split != "stacked":
            raise ValueError("split: FastGRNN shares one W and one U between its gates (stacked)")
        self.cell, self.input_size, self.hidden_size = cell, input_size, hidden_size
        self.split = split
        spec = MatrixSpec() if spec is None else spec
        rows, bound = GATES[cell] * hidden_size, 1.0 / math.sqrt(hidden_size)
        for side, side_spec, cols in (("W", spec, input_size), ("U", spec_u or spec, hidden_size)):
            dense = torch.empty(rows, cols).uniform_(-bound, bound)
            for name, block in zip(self._names(side), self._blocks(dense)):
                self.add_module(name, make_matrix(side_spec, *block.shape, block))
        self.bias_ih = nn.Parameter(torch.empty(rows).uniform_(-bound, bound))
        self.bias_hh = nn.Parameter(torch.empty(rows).uniform_(-bound, bound))
        if cell == "fastgrnn":
            with torch.no_grad():
                self.bias_ih.fill_(FASTGRNN_INIT["bias"])
                self.bias_hh.fill_(FASTGRNN_INIT["bias"])
            self.zeta = nn.Parameter(torch.tensor(FASTGRNN_INIT["zeta"]))
            self.nu = nn.Parameter(torch.tensor(FASTGRNN_INIT["nu"]))

    def _names(self, side: str) -> list[str]:
        """Matrix names of one side ("W" or "U"): [side] or [side_r, side_z, ...] per gate."""
        if self.split == "stacked":
            return [side]
        return [f"{side}_{gate}" for gate in GATE_NAMES[self.cell]]

    def _blocks(self, stacked: torch.Tensor) -> list[torch.Tensor]:
        """A stacked [G H, *] tensor as the blocks of this layer's matrices of one side."""
        return [stacked] if self.split == "stacked" else list(stacked.chunk(GATES[self.cell]))

    def matrices(self) -> dict[str, nn.Module]:
        """Every recurrent matrix by name: W, U (stacked) or W_r, W_z, ..., U_r, ... (per gate)."""
        return {name: getattr(self, name) for side in "WU" for name in self._names(side)}

    def stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The effective stacked W [G H, I] and U [G H, H] (per-gate blocks concatenated)."""
        w, u = ([getattr(self, name)() for name in self._names(side)] for side in "WU")
        return (w[0], u[0]) if self.split == "stacked" else (torch.cat(w), torch.cat(u))

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """x [B, T, I] -> (outputs [B, T, H], final state h [B, H] or (h, c))."""
        if self.cell == "fastgrnn":
            w, u = self.stacked_weights()
            return fastgrnn_recurrence(
                x, w, u, self.bias_ih, self.bias_hh, self.zeta, self.nu, state
            )
        weights = [*self.stacked_weights(), self.bias_ih, self.bias_hh]
        return fused_recurrence(self.cell, x, weights, state, self.training)

    @torch.no_grad()
    def set_ranks_(self, ranks: dict[str, int]) -> None:
        """Give fixed low-rank matrices new ranks ({"W": 5, "U_r": 3, ...}): each is rebuilt as
        the truncated SVD of its current effective matrix at that rank."""
        for name, rank in ranks.items():
            matrix = self.matrices().get(name)
            if not isinstance(matrix, LowRankMatrix):
                raise ValueError(f"set_ranks_: {name} is not a fixed low-rank matrix of this layer")
            dense = matrix().detach()
            setattr(self, name, LowRankMatrix(*dense.shape, rank, dense).to(dense.device))

    def cell_scalars(self) -> dict[str, torch.Tensor]:
        """The cell's learned scalars beyond matrices and biases: FastGRNN's raw zeta and nu."""
        return {"zeta": self.zeta, "nu": self.nu} if self.cell == "fastgrnn" else {}

    def ranks(self) -> tuple[int, ...]:
        """Rank of every matrix in ``matrices()`` order: (r_W, r_U) as the paper reports them, or
        (r_W_r, r_W_z, r_W_n, r_U_r, r_U_z, r_U_n) per gate."""
        return tuple(m.rank() for m in self.matrices().values())

    @torch.no_grad()
    def load_dense_(
        self,
        w: torch.Tensor,
        u: torch.Tensor,
        bias_ih: torch.Tensor,
        bias_hh: torch.Tensor,
        **scalars: torch.Tensor,
    ) -> None:
        """Re-initialize every matrix from stacked dense W [G H, I], U [G H, H] (and copy the
        biases [G H] and the ``cell_scalars``), keeping each matrix's kind, rank and threshold
        settings: full = copy, lowrank = truncated SVD at its rank, str = SVD (equal to the
        dense block as s -> -inf)."""
        rows = GATES[self.cell] * self.hidden_size
        expected = {"W": (rows, self.input_size), "U": (rows, self.hidden_size)}
        for side, dense in (("W", w), ("U", u)):
            if tuple(dense.shape) != expected[side]:
                raise ValueError(f"{side}: shape {tuple(dense.shape)}, expected {expected[side]}")
            for name, block in zip(self._names(side), self._blocks(dense.detach().float())):
                new = make_matrix(spec_of(getattr(self, name)), *block.shape, block.clone())
                setattr(self, name, new.to(self.bias_ih.device))
        self.bias_ih.copy_(bias_ih)
        self.bias_hh.copy_(bias_hh)
        if set(scalars) != set(self.cell_scalars()):
            raise ValueError(
                f"{self.cell}: scalars {sorted(scalars)}, expected {sorted(self.cell_scalars())}"
            )
        for name, value in scalars.items():
            getattr(self, name).copy_(value)

    def budget_entries(self, inputs: tuple | None) -> list[dict]:
        """One row per matrix: shape, numel, nnz (compact params), rank, threshold, MACs.

        MACs are per sequence: T out in (dense) and T num_params (compact), T = inputs[0].shape[1].
        """
        steps = float(inputs[0].shape[1]) if inputs and inputs[0] is not None else float("nan")
        rows = []
        for name, m in self.matrices().items():
            out_f, in_f = self._shape(name)
            numel, nnz = out_f * in_f, m.num_params()
            thr = float(m.tau().detach()) if isinstance(m, STRMatrix) else float("nan")
            rows.append(
                {
                    "name": name,
                    "kind": f"{self.cell}.{name}",
                    "param": spec_of(m).kind,
                    "shape": f"{out_f}x{in_f}",
                    "numel": numel,
                    "nnz": nnz,
                    "sparsity": 1.0 - nnz / numel,
                    "rank": m.rank(),
                    "full_rank": min(out_f, in_f),
                    "threshold": thr,
                    "macs_dense": steps * numel,
                    "macs_sparse": steps * nnz,
                }
            )
        return rows

    def _shape(self, name: str) -> tuple[int, int]:
        """(out, in) of the matrix ``name``: [G H | H, I] for W*, [G H | H, H] for U*."""
        out_f = self.hidden_size * (GATES[self.cell] if self.split == "stacked" else 1)
        return out_f, self.input_size if name.startswith("W") else self.hidden_size

    def export(self) -> RNNLayer:
        """A compact copy: every factorized matrix stored as two factors at its (learned) rank,
        shrunk singular values folded in (a fixed ``lowrank`` layer), unless the dense matrix is
        smaller (``factored_is_cheaper`` false); full matrices stay dense.
        Outputs equal this layer's outputs up to float rounding; a per-gate layer stays per gate."""
        compact = RNNLayer(self.cell, self.input_size, self.hidden_size, split=self.split)
        for name, m in self.matrices().items():
            a, b = m.factors()
            if factored_is_cheaper(a.shape[1], a.shape[0], b.shape[1]):
                new = LowRankMatrix.from_factors(a, b)
            else:
                new = FullMatrix(a.shape[0], b.shape[1], (a @ b).detach())
            setattr(compact, name, new)
        params = {"bias_ih": self.bias_ih, "bias_hh": self.bias_hh, **self.cell_scalars()}
        compact.load_state_dict({k: v.detach() for k, v in params.items()}, strict=False)
        return compact.to(self.bias_ih.device)

    @classmethod
    def from_torch(cls, rnn: nn.GRU | nn.LSTM, **kwargs) -> RNNLayer:
        """An RNNLayer holding the weights of a single-layer unidirectional nn.GRU/nn.LSTM
        (``kwargs``: the constructor's ``spec``, ``spec_u``, ``split``; lowrank / str matrices
        factorize the weights by SVD, see ``load_dense_``)."""
        if rnn.num_layers != 1 or rnn.bidirectional or not rnn.bias or rnn.proj_size:
            raise ValueError("from_torch needs one unidirectional layer with biases")
        cell = "gru" if isinstance(rnn, nn.GRU) else "lstm"
        layer = cls(cell, rnn.input_size, rnn.hidden_size, **kwargs)
        layer.load_dense_(rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0)
        return layer


def matrix_spectra(model: nn.Module, stage: str) -> list[dict]:
    """One row per singular value of every recurrent matrix (W, U) of every ``RNNLayer``.

    Rows: {"layer", "matrix", "stage", "index", "sigma", "threshold"}. For an ``STRMatrix``,
    sigma is the raw learnable spectrum sorted descending and threshold is tau (same units);
    for full / fixed-rank matrices sigma = svdvals of the effective matrix, threshold NaN.
    """
    rows = []
    for name, layer in model.named_modules():
        if not isinstance(layer, RNNLayer):
            continue
        for mat_name, m in layer.matrices().items():
            with torch.no_grad():
                if isinstance(m, STRMatrix):
                    sigma = torch.sort(m.sigma.detach().float(), descending=True).values
                    tau = float(m.tau())
                else:
                    sigma, tau = torch.linalg.svdvals(m().detach().float()), float("nan")
            rows += [
                {
                    "layer": name,
                    "matrix": mat_name,
                    "stage": stage,
                    "index": i,
                    "sigma": float(v),
                    "threshold": tau,
                }
                for i, v in enumerate(sigma.tolist())
            ]
    return rows

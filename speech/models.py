"""Keyword-spotting models: stacked low-rank GRU/LSTM layers and a linear classifier.

    h_t = RNN(x_t, h_{t-1}),  logits = V pool(h_1..h_T) + b

with each recurrent matrix full, fixed low rank (W = W1 W2, FastGRNN's (r_W, r_U) = (16, 25)) or
STR on singular values (W = P_n diag(relu(sigma - g(s) sigma_0)) Q_n^T, sigma_0 the initial top
singular value, learned rank), see
``strlowrank.rnn`` and docs/LEARNED_RANK.md.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from strlowrank.config import option
from strlowrank.rnn import GATES, RNNLayer

POOLS = ("last", "mean")


@dataclass
class SpeechModelConfig:
    cell: str = option("gru", "gru | lstm", choices=("gru", "lstm"))
    param: str = option("str", "recurrent matrices: full | lowrank (fixed ranks) | str (learned)",
                        choices=("full", "lowrank", "str"))  # fmt: skip
    hidden: int = option(128, "hidden units per layer", min=1)
    layers: int = option(1, "stacked recurrent layers", min=1)
    rank_w: int = option(16, "input-to-hidden rank for param=lowrank (FastGRNN, Google-12)", min=0)
    rank_u: int = option(25, "hidden-to-hidden rank for param=lowrank", min=0)
    s_init: float = option(-10.0, "STR: initial threshold parameter; g(s_init + s_bias) is the "
                           "initial threshold as a fraction of the threshold unit")  # fmt: skip
    threshold_scale: str = option("init", "STR threshold unit: init (initial top singular value) "
                                  "| max | rms | one", choices=("init", "max", "rms", "one"))
    s_bias: float = option(2.0, "STR: g = sigmoid(s + s_bias); decay pulls g to sigmoid(s_bias)")
    lowrank_init: str = option("svd", "fixed low rank init: svd of the torch init | randn "
                               "(EdgeML's 0.1 N(0, 1))", choices=("svd", "randn"))  # fmt: skip
    pool: str = option("mean", "classifier input: mean over time of h_t | last hidden state",
                       choices=POOLS)  # fmt: skip
    dropout: float = option(0.0, "dropout on the pooled features", min=0.0, max=0.99)


class KeywordSpotter(nn.Module):
    """x [B, T, F] (normalized log-mel frames) -> logits [B, num_classes]."""

    def __init__(self, cfg: SpeechModelConfig, input_size: int, num_classes: int) -> None:
        super().__init__()
        if cfg.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {cfg.pool!r}")
        self.cfg = cfg
        sizes = [input_size] + [cfg.hidden] * cfg.layers
        if cfg.param == "lowrank":
            rows = GATES[cfg.cell] * cfg.hidden
            for name, rank, cols in (("rank_w", cfg.rank_w, min(sizes[:-1])),
                                     ("rank_u", cfg.rank_u, cfg.hidden)):  # fmt: skip
                if rank > min(rows, cols):
                    raise ValueError(f"model.{name}: {rank} is above the full rank "
                                     f"{min(rows, cols)} of a {rows}x{cols} matrix")  # fmt: skip
        self.rnns = nn.ModuleList(
            RNNLayer(
                cfg.cell, sizes[i], cfg.hidden, kind=cfg.param, rank_w=cfg.rank_w,
                rank_u=cfg.rank_u, s_init=cfg.s_init, lowrank_init=cfg.lowrank_init,
                threshold_scale=cfg.threshold_scale, s_bias=cfg.s_bias,
            )
            for i in range(cfg.layers)
        )  # fmt: skip
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.hidden, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled recurrent features [B, H]."""
        for rnn in self.rnns:
            x, final = rnn(x)
        if self.cfg.pool == "mean":
            return x.mean(dim=1)
        return final if self.cfg.cell == "gru" else final[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.features(x)))

    def ranks(self) -> list[tuple[int, int]]:
        """(r_W, r_U) of every recurrent layer."""
        return [rnn.ranks() for rnn in self.rnns]

    def export(self) -> KeywordSpotter:
        """A compact copy: recurrent matrices as factors at their learned ranks (equal outputs)."""
        compact = copy.deepcopy(self)
        compact.rnns = nn.ModuleList(rnn.export() for rnn in self.rnns)
        return compact


def build_model(cfg: SpeechModelConfig, input_size: int, num_classes: int) -> KeywordSpotter:
    return KeywordSpotter(cfg, input_size, num_classes)


def recurrent_params(model: nn.Module) -> int:
    """Parameters a deployed recurrent cell needs: sum of num_params of its matrices (no biases)."""
    return sum(m.num_params() for r in model.modules() if isinstance(r, RNNLayer)
               for m in r.matrices().values())  # fmt: skip

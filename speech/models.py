"""Keyword-spotting models: stacked low-rank GRU/LSTM layers and a linear classifier.

    h_t = RNN(x_t, h_{t-1}),  logits = V pool(h_1..h_T) + b

with each recurrent matrix full, fixed low rank (W = W1 W2, FastGRNN's (r_W, r_U) = (16, 25)) or
STR on singular values (W = P_n diag(relu(sigma - g(s) sigma_0)) Q_n^T, sigma_0 the initial top
singular value, learned rank), see
``strlowrank.method.rnn`` and docs/LEARNED_RANK.md.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from strlowrank.method.allocation import energy_ranks, greedy_ranks
from strlowrank.method.budget import budget_table, layers
from strlowrank.method.lowrank import MatrixSpec, share_threshold_unit_
from strlowrank.method.rnn import CELLS, GATES, SPLITS, RNNLayer
from strlowrank.training.checkpoint import CheckpointError, load_checkpoint, load_model_state
from strlowrank.training.config import ConfigError, from_dict, option

POOLS = ("last", "mean")
ALLOCATIONS = ("fixed", "energy", "greedy", "learned")


@dataclass
class SpeechModelConfig:
    cell: str = option(
        "gru", "gru | lstm | fastgrnn (one W, U shared by gate and update)", choices=CELLS
    )
    param: str = option(
        "auto",
        "recurrent matrices: full | lowrank (fixed ranks) | str (learned) | auto: str, except "
        "with --init-from and --target-params, where the trained model's ranks are allocated "
        "by spectral energy and fine-tuned (lowrank, allocation energy; docs/LEARNED_RANK.md)",
        choices=("auto", "full", "lowrank", "str"),
    )
    hidden: int = option(128, "hidden units per layer", min=1)
    layers: int = option(1, "stacked recurrent layers", min=1)
    rank_w: int = option(16, "input-to-hidden rank for param=lowrank (FastGRNN, Google-12)", min=0)
    rank_u: int = option(25, "hidden-to-hidden rank for param=lowrank", min=0)
    s_init: float = option(
        -10.0,
        "STR: initial threshold parameter; g(s_init + s_bias) is the "
        "initial threshold as a fraction of the threshold unit",
    )
    threshold_scale: str = option(
        "init",
        "STR threshold unit: init (each matrix's initial top singular value) | cost (one unit "
        "per parameter shared by the model's matrices, so a common threshold keeps directions "
        "by sigma per parameter) | max | rms | one",
        choices=("init", "cost", "max", "rms", "one"),
    )
    s_bias: float = option(2.0, "STR: g = sigmoid(s + s_bias); decay pulls g to sigmoid(s_bias)")
    lowrank_init: str = option(
        "svd",
        "fixed low rank init: svd of the torch init | randn (EdgeML's 0.1 N(0, 1))",
        choices=("svd", "randn"),
    )
    pool: str = option(
        "mean", "classifier input: mean over time of h_t | last hidden state", choices=POOLS
    )
    dropout: float = option(0.0, "dropout on the pooled features", min=0.0, max=0.99)
    split: str = option(
        "stacked",
        "recurrent matrices: stacked (one W [G H, I], one U [G H, H] "
        "per layer) | per_gate (W_g [H, I], U_g [H, H] per gate, each its own "
        "rank; lowrank: rank_w / rank_u for every gate)",
        choices=SPLITS,
    )
    allocation: str = option(
        "fixed",
        "param=lowrank ranks: fixed (rank_w / rank_u) | energy (one spectral energy fraction "
        "for every matrix) | greedy (singular directions by sigma per parameter), chosen per "
        "matrix from the init_from model's spectra to meet --target-params | learned (the "
        "ranks the init_from model has, e.g. an STR run's: its matrices, fine-tuned at them)",
        choices=ALLOCATIONS,
    )
    fixed_epochs: int = option(
        0,
        "param=str: after its epochs, train this many more at the ranks it learned (a fixed-rank "
        "model from its matrices, no threshold or spectrum decay); the STR part goes to "
        "<out>/str, the final model to <out> (0: off)",
        min=0,
    )
    init_from: str | None = option(
        None,
        "checkpoint.pt of a trained model with the same cell, hidden, layers and classes: "
        "its effective matrices initialize this one (full: copy, lowrank: truncated SVD at the "
        "fixed ranks, str: SVD) and its biases and classifier are copied",
    )


class KeywordSpotter(nn.Module):
    """x [B, T, F] (normalized log-mel frames) -> logits [B, num_classes]."""

    def __init__(self, cfg: SpeechModelConfig, input_size: int, num_classes: int) -> None:
        super().__init__()
        if cfg.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {cfg.pool!r}")
        self.cfg = cfg
        sizes = [input_size] + [cfg.hidden] * cfg.layers
        if cfg.cell == "fastgrnn" and cfg.split != "stacked":
            raise ValueError(
                f"model.split: {cfg.split} needs a W and a U per gate; FastGRNN shares one W and "
                "one U between its gates (use stacked)"
            )
        if cfg.param == "lowrank" and cfg.allocation == "fixed":
            rows = cfg.hidden * (GATES[cfg.cell] if cfg.split == "stacked" else 1)
            for name, rank, cols in (
                ("rank_w", cfg.rank_w, min(sizes[:-1])),
                ("rank_u", cfg.rank_u, cfg.hidden),
            ):
                if rank > min(rows, cols):
                    raise ValueError(
                        f"model.{name}: {rank} is above the full rank "
                        f"{min(rows, cols)} of a {rows}x{cols} matrix"
                    )
        spec_w, spec_u = matrix_specs(cfg)
        self.rnns = nn.ModuleList(
            RNNLayer(cfg.cell, sizes[i], cfg.hidden, spec=spec_w, spec_u=spec_u, split=cfg.split)
            for i in range(cfg.layers)
        )
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.hidden, num_classes)
        share_threshold_unit_(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled recurrent features [B, H]."""
        for rnn in self.rnns:
            x, final = rnn(x)
        if self.cfg.pool == "mean":
            return x.mean(dim=1)
        return final[0] if self.cfg.cell == "lstm" else final

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.features(x)))

    def ranks(self) -> list[tuple[int, ...]]:
        """(r_W, r_U) of every recurrent layer (per gate: r_W_r, r_W_z, ..., r_U_r, ...)."""
        return [rnn.ranks() for rnn in self.rnns]

    def set_ranks_(self, ranks: dict[str, int]) -> None:
        """New fixed ranks by full matrix name ({"rnns.0.W": 5, ...}, `RNNLayer.set_ranks_`)."""
        for i, rnn in enumerate(self.rnns):
            mine = {k.rsplit(".", 1)[1]: r for k, r in ranks.items() if k.startswith(f"rnns.{i}.")}
            rnn.set_ranks_(mine)

    def export(self) -> KeywordSpotter:
        """A compact copy: recurrent matrices as factors at their learned ranks (equal outputs)."""
        compact = copy.deepcopy(self)
        compact.rnns = nn.ModuleList(rnn.export() for rnn in self.rnns)
        return compact


def matrix_specs(cfg: SpeechModelConfig) -> tuple[MatrixSpec, MatrixSpec]:
    """The ``MatrixSpec`` of every W and of every U of the model (they differ in the fixed rank;
    an allocated model starts at rank 0 until `KeywordSpotter.set_ranks_`)."""
    common = dict(
        kind="str" if cfg.param == "auto" else cfg.param,
        s_init=cfg.s_init,
        threshold_scale=cfg.threshold_scale,
        s_bias=cfg.s_bias,
        lowrank_init=cfg.lowrank_init,
    )
    if cfg.allocation != "fixed":
        return MatrixSpec(rank=0, **common), MatrixSpec(rank=0, **common)
    return MatrixSpec(rank=cfg.rank_w, **common), MatrixSpec(rank=cfg.rank_u, **common)


def build_model(cfg: SpeechModelConfig, input_size: int, num_classes: int) -> KeywordSpotter:
    return KeywordSpotter(cfg, input_size, num_classes)


def init_from_checkpoint(model: KeywordSpotter, path: str | Path) -> None:
    """Initialize ``model`` from the trained model in checkpoint ``path``.

    The source is rebuilt from the checkpoint's own config (any param or split,
    :func:`load_source`); each layer's effective stacked W [G H, I], U [G H, H] goes through
    ``RNNLayer.load_dense_`` (full: copy, lowrank: truncated SVD, str: SVD), biases and
    classifier are copied.
    """
    source = load_source(model, path)
    with torch.no_grad():
        for mine, src in zip(model.rnns, source.rnns):
            mine.load_dense_(*src.stacked_weights(), src.bias_ih, src.bias_hh, **src.cell_scalars())
        model.classifier.load_state_dict(source.classifier.state_dict())
    share_threshold_unit_(model)  # the unit of the trained spectra


def load_source(model: KeywordSpotter, path: str | Path) -> KeywordSpotter:
    """The trained model in checkpoint ``path``, rebuilt from the checkpoint's own config.
    Cell, hidden size, layers, input size and classes must match ``model``'s and the run must be
    finished (else a one-line ``CheckpointError`` naming the file)."""
    state = load_checkpoint(path)
    try:
        source_cfg = from_dict(SpeechModelConfig, dict(state.get("config", {}).get("model", {})))
    except (ConfigError, AttributeError, TypeError) as e:
        raise CheckpointError(f"{path}: not a speech-track checkpoint ({e})") from None
    source_cfg.init_from = None
    done, epochs = state.get("epoch"), state["config"].get("train", {}).get("epochs")
    if isinstance(done, int) and isinstance(epochs, int) and done < epochs:
        raise CheckpointError(
            f"{path}: an unfinished run (epoch {done} of {epochs}); "
            "finish it (--resume) before initializing from it"
        )
    own, theirs = model.cfg, source_cfg
    for key in ("cell", "hidden", "layers"):
        if getattr(own, key) != getattr(theirs, key):
            raise CheckpointError(
                f"{path}: model.{key} is {getattr(theirs, key)!r} in the "
                f"checkpoint, {getattr(own, key)!r} here"
            )
    weight = state["model"].get("classifier.weight")
    if weight is None or tuple(weight.shape) != tuple(model.classifier.weight.shape):
        shape, own_shape = (
            None if weight is None else tuple(weight.shape),
            tuple(model.classifier.weight.shape),
        )
        raise CheckpointError(
            f"{path}: classifier shape {shape}, expected {own_shape} (other classes?)"
        )
    source = build_model(theirs, model.rnns[0].input_size, model.classifier.out_features)
    if theirs.allocation != "fixed":  # its ranks were chosen at run time: read them off W1
        source.set_ranks_(
            {
                k.removesuffix(".W1"): int(v.shape[1])
                for k, v in state["model"].items()
                if k.endswith(".W1")
            }
        )
    try:
        load_model_state(source, state["model"], path)
    except CheckpointError as e:
        raise CheckpointError(f"{e} (another input size?)") from None
    return source


def allocate_ranks(model: KeywordSpotter, path: str | Path, target: float | None) -> dict[str, int]:
    """Ranks per matrix ({"rnns.0.W": r, ...}) by ``model.cfg.allocation`` (energy | greedy,
    `strlowrank.method.allocation`) from the singular values of the trained model in checkpoint
    ``path``, in ``model``'s matrix layout, for ``target`` parameters counted as
    ``--target-params`` counts them (the budget table: recurrent matrices and the classifier);
    ``learned``: the ranks that model has (:func:`learned_ranks`, no target)."""
    if model.cfg.allocation == "learned":
        return learned_ranks(model, path)
    rule = {"energy": energy_ranks, "greedy": greedy_ranks}[model.cfg.allocation]
    twin_cfg = copy.deepcopy(model.cfg)
    twin_cfg.param, twin_cfg.init_from = "full", None
    twin = build_model(twin_cfg, model.rnns[0].input_size, model.classifier.out_features)
    init_from_checkpoint(twin, path)
    table = layers(budget_table(twin, None))
    matrices = {
        f"rnns.{i}.{name}": m()
        for i, rnn in enumerate(twin.rnns)
        for name, m in rnn.matrices().items()
    }
    others = int(table.loc[~table["name"].isin(list(matrices)), "numel"].sum())
    if target <= others:
        raise ValueError(
            f"controller.target: {target:g} parameters leave nothing for the recurrent matrices "
            f"(the rest of the model counts {others})"
        )
    with torch.no_grad():
        spectra = {name: torch.linalg.svdvals(w.float()) for name, w in matrices.items()}
    shapes = {name: tuple(w.shape) for name, w in matrices.items()}
    return rule(spectra, shapes, int(target - others))


def learned_ranks(model: KeywordSpotter, path: str | Path) -> dict[str, int]:
    """The rank of every matrix of the trained model in checkpoint ``path`` (an STR run's learned
    ranks), by ``model``'s matrix names; the two must have the same matrix layout (split)."""
    source = load_source(model, path)
    if source.cfg.split != model.cfg.split:
        raise CheckpointError(
            f"{path}: model.split is {source.cfg.split!r} in the checkpoint, "
            f"{model.cfg.split!r} here (model.allocation learned keeps its matrices)"
        )
    return {
        f"rnns.{i}.{name}": m.rank()
        for i, rnn in enumerate(source.rnns)
        for name, m in rnn.matrices().items()
    }


def training_cost(epochs: int, init_from: str | Path | None) -> int:
    """Training epochs a model costs: its own plus, for a model started from a checkpoint, the
    cost of that checkpoint's run (its summary.json ``cost_epochs``, else its configured epochs),
    so a fine-tuned truncated SVD is charged the full-rank run it needed."""
    if not init_from:
        return int(epochs)
    summary = Path(init_from).with_name("summary.json")
    try:
        return int(epochs) + int(json.loads(summary.read_text())["cost_epochs"])
    except (OSError, KeyError, ValueError, TypeError):
        state = load_checkpoint(init_from)
        return int(epochs) + int(state.get("config", {}).get("train", {}).get("epochs", 0))

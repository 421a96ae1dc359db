"""Train a keyword-spotting GRU/LSTM whose recurrent matrices learn their rank (speech track).

    python speech/train_gru.py                                   # STR GRU-128, synthetic data
    python speech/train_gru.py --model.param lowrank --model.rank_w 16 --model.rank_u 25
    python speech/train_gru.py --config configs/speech_gru100_lowrank.yaml --data-dir /data/sc_v1
    python speech/train_gru.py --init-from runs/full/checkpoint.pt --target-params 12000
    python speech/train_gru.py --target-params 6536 --model.fixed_epochs 10  # STR, then fixed ranks

Without --data-dir the synthetic espeak-ng Speech Commands tree is generated once into the cache
(about half a minute). The run folder gets config.yaml, metrics.csv, budget.csv (rank per matrix),
summary.json (test_acc, val_acc, params, ranks), spectra.csv, checkpoint.pt and plots/. With
--model.fixed_epochs N the STR run goes to <out>/str and <out> gets the model trained N more epochs
at the ranks it learned.
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import TensorDataset

from speech.config import SpeechConfig
from speech.features import augment, load_features
from speech.har import load_har
from speech.models import (
    allocate_ranks,
    build_model,
    init_from_checkpoint,
    training_cost,
)
from strlowrank.method.budget import matrix_params, ranked_layers
from strlowrank.method.lowrank import Refactorize
from strlowrank.method.rnn import matrix_spectra
from strlowrank.training.cli import execute, parse_config, run_main
from strlowrank.training.controller import build_controller
from strlowrank.training.distributed import DistInfo
from strlowrank.training.engine import Task


def rank_text(table: pd.DataFrame) -> str:
    """'ranks W 12/32 U 20/128' from the budget rows of the recurrent matrices."""
    rows = ranked_layers(table)
    return "ranks " + " ".join(
        f"{name.rsplit('.', 1)[-1]} {int(r)}/{int(f)}"
        for name, r, f in zip(rows["name"], rows["rank"], rows["full_rank"])
    )


def load_splits(cfg: SpeechConfig, info: DistInfo) -> dict:
    """The train / val / test features of ``data.root``, or of the default data of ``data.name``."""
    d, progress = cfg.data, cfg.train.progress and info.is_main
    if d.name != "speech_commands":
        return load_har(d.root, d.name, progress=progress)
    if d.root is None:
        from speech.synth import ensure_default_data  # espeak-ng only for the default data

        root = ensure_default_data(progress=progress)
    else:
        root = Path(d.root)
    return load_features(
        root,
        d.task,
        cfg.features,
        progress=progress,
        silence_fraction=d.silence_fraction,
        unknown_fraction=d.unknown_fraction,
    )


def allocated(cfg: SpeechConfig, model: torch.nn.Module) -> dict[str, int]:
    """The ranks ``model.allocation`` picks from ``model.init_from`` for the params target."""
    c = cfg.controller
    if cfg.model.param != "lowrank" or not cfg.model.init_from:
        raise ValueError(
            f"model.allocation {cfg.model.allocation}: needs model.param lowrank and --init-from"
        )
    if cfg.model.allocation == "learned":
        return allocate_ranks(model, cfg.model.init_from, None)
    if c.metric != "params" or c.target is None:
        raise ValueError(f"model.allocation {cfg.model.allocation}: needs --target-params N")
    return allocate_ranks(model, cfg.model.init_from, c.target)


def build_task(cfg: SpeechConfig, info: DistInfo) -> Task:
    d = cfg.data
    sets = load_splits(cfg, info)
    train, val, test = sets["train"], sets["val"], sets["test"]
    model = build_model(cfg.model, train.x.shape[2], len(train.class_names))
    allocating = cfg.model.allocation != "fixed"
    if allocating:
        model.set_ranks_(allocated(cfg, model))
    if cfg.model.init_from:
        init_from_checkpoint(model, cfg.model.init_from)
    spectra = matrix_spectra(model, "init")
    callbacks = []
    if cfg.model.param == "str" and cfg.lowrank.refactorize_every_epochs:
        callbacks.append(Refactorize(every_epochs=cfg.lowrank.refactorize_every_epochs))

    def add_noise(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return augment(x, d.augment_shift, d.augment_noise), y

    def summarize(table: pd.DataFrame) -> dict:
        ranks = ranked_layers(table)
        final = matrix_spectra(model, "final")
        if info.is_main:
            pd.DataFrame(spectra + final).to_csv(Path(cfg.out) / "spectra.csv", index=False)
        return {
            "track": "speech",
            "method": cfg.model.param,
            "cell": cfg.model.cell,
            "hidden": cfg.model.hidden,
            "split": cfg.model.split,
            "layers": cfg.model.layers,
            "init_from": cfg.model.init_from,
            "source_init_from": source_start(cfg.model.init_from),
            "allocation": cfg.model.allocation,
            "threshold_scale": cfg.model.threshold_scale if cfg.model.param == "str" else None,
            "epochs": cfg.train.epochs,
            "cost_epochs": training_cost(cfg.train.epochs, cfg.model.init_from),
            "tag": cfg.tag,
            "params": matrix_params(table),
            "ranks": {n: int(r) for n, r in zip(ranks["name"], ranks["rank"])},
        }

    controller = None if allocating else build_controller(cfg.controller, model, val.x[:1])
    if controller is not None:
        if cfg.model.param != "str":
            raise ValueError("controller.target: a budget target needs model.param str")
        callbacks.append(controller)
    augmenting = d.augment_shift > 0 or d.augment_noise > 0
    return Task(
        model=model,
        train_set=TensorDataset(train.x, train.y),
        val_set=TensorDataset(val.x, val.y),
        test_set=TensorDataset(test.x, test.y),
        example_input=val.x[:1],
        augment=add_noise if augmenting else None,
        callbacks=callbacks,
        describe=rank_text,
        summarize=summarize,
    )


def report(model: torch.nn.Module, out: Path, summary: dict, plots: bool = True) -> None:
    ranks = ", ".join(f"{k}={v}" for k, v in summary.get("ranks", {}).items())
    print(f"learned ranks: {ranks}; recurrent parameters: {summary.get('params')}")
    if plots:
        from strlowrank.analysis.plotting import plot_run

        for path in plot_run(out):
            print(f"plot: {path}")


def source_start(init_from: str | None) -> str | None:
    """Where the run a model started from started itself (its summary.json ``init_from``): tells
    STR from scratch from STR from a trained model when ``model.allocation learned`` fixes its
    ranks."""
    if not init_from:
        return None
    try:
        return json.loads(Path(init_from).with_name("summary.json").read_text()).get("init_from")
    except (OSError, ValueError, AttributeError):
        return None


def resolve_param(cfg: SpeechConfig) -> None:
    """``model.param auto``: STR (learned ranks), except from a trained model to a parameter
    target, where the energy allocation of its spectra, fine-tuned, is what to use at equal
    compute (docs/RESULTS.md, "Equal compute"): lowrank with ``model.allocation energy``."""
    m = cfg.model
    if m.param != "auto":
        return
    compressing = m.init_from and cfg.controller.metric == "params" and cfg.controller.target
    m.param = "lowrank" if compressing else "str"
    if compressing and m.allocation == "fixed":
        m.allocation = "energy"


def then_fixed(cfg: SpeechConfig) -> tuple[SpeechConfig, SpeechConfig]:
    """The two runs of ``--model.fixed_epochs N``: STR as configured into <out>/str, then the
    model at the ranks it learned (``model.allocation learned``) trained N epochs into <out>."""
    if cfg.model.param != "str":
        raise ValueError("model.fixed_epochs: needs model.param str (it fixes learned ranks)")
    learn = copy.deepcopy(cfg)
    learn.out, learn.model.fixed_epochs = str(Path(cfg.out) / "str"), 0
    fixed = copy.deepcopy(cfg)
    fixed.model.param, fixed.model.allocation, fixed.model.fixed_epochs = "lowrank", "learned", 0
    fixed.model.init_from = str(Path(learn.out) / "checkpoint.pt")
    fixed.train.epochs = cfg.model.fixed_epochs
    return learn, fixed


def main(argv: Sequence[str] | None = None) -> dict:
    about = __doc__.split("\n\n")[0]
    cfg, args = parse_config(SpeechConfig, about, argv, prog="speech/train_gru.py")
    resolve_param(cfg)
    if not cfg.model.fixed_epochs:
        return execute(cfg, args, build_task, report)
    learn, fixed = then_fixed(cfg)
    if not args.test_only and not (Path(learn.out) / "summary.json").is_file():
        partial = Path(learn.out) / "checkpoint.pt"  # an interrupted STR part goes on
        first = copy.copy(args)
        first.resume = str(partial) if partial.is_file() else None
        execute(learn, first, build_task, report)
    return execute(fixed, args, build_task, report)


if __name__ == "__main__":
    sys.exit(run_main(main))

"""Train a CNN dense, with STR, or with a magnitude-pruning baseline (the vision track).

    python vision/train.py                                  # STR ResNet-20 on the shipped subset
    python vision/train.py --method.name gmp --method.final_sparsity 0.9
    python vision/train.py --config configs/vision_resnet50_str90.yaml --data-dir /data/imagenet
    torchrun --nproc_per_node=8 vision/train.py --config ... # DistributedDataParallel

The run folder gets config.yaml, metrics.csv, budget.csv, budget_history.csv, summary.json,
checkpoint.pt and plots/ (per-layer sparsity and MACs).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

from strlowrank import apply_soft_threshold, pruning
from strlowrank.cli import execute, parse_config, run_main
from strlowrank.controller import build_controller
from strlowrank.distributed import DistInfo
from strlowrank.engine import Task
from vision.config import VisionConfig
from vision.data import build_datasets
from vision.models import build_model, first_last_layer_names


def sparsify(model: torch.nn.Module, cfg: VisionConfig) -> list:
    """Apply the configured method to ``model``; return the engine callbacks it needs."""
    m = cfg.method
    first, last = first_last_layer_names(model)
    keep = ((first, m.keep_first_dense), (last, m.keep_last_dense))
    exclude = tuple(name for name, dense in keep if dense)
    if m.name == "dense":
        return []
    if m.name == "str":
        apply_soft_threshold(model, exclude=exclude, s_init=m.s_init, granularity=m.granularity)
        return []
    pruning.apply_masks(model, exclude=exclude)
    common = dict(start_epoch=m.start_epoch, end_epoch=m.end_epoch, update_every=m.update_every)
    if m.name == "transfer":
        if not m.budget:
            raise ValueError("method.budget: the transfer method needs an STR run's budget.csv")
        densities = pruning.read_budget_densities(m.budget)
        own = {n for n, _, _ in pruning.masked_modules(model)}
        if not own & set(densities):
            raise ValueError(f"{m.budget}: no layer name matches this model ({cfg.model.name})")
        return [
            pruning.GMPCallback(
                densities={k: v for k, v in densities.items() if k in own}, mode="layer", **common
            )
        ]
    mode = m.gmp_scope if m.name == "gmp" else "layer"
    return [pruning.GMPCallback(final_density=1.0 - m.final_sparsity, mode=mode, **common)]


def build_task(cfg: VisionConfig, info: DistInfo) -> Task:
    d = cfg.data
    train_set, val_set, num_classes, in_chans = build_datasets(
        d.name, d.root, d.image_size, augment=d.augment, skip_bad_images=d.skip_bad_images
    )
    model = build_model(cfg.model.name, num_classes, in_chans, width=cfg.model.width)
    callbacks = sparsify(model, cfg)
    example = val_set[0][0].unsqueeze(0)
    controller = build_controller(cfg.controller, model, example)
    if controller is not None:
        if cfg.method.name != "str":
            raise ValueError("controller.target: a budget target needs method.name str")
        callbacks.append(controller)

    def summarize(table) -> dict:
        return {"track": "vision", "method": cfg.method.name, "model": cfg.model.name}

    return Task(
        model=model,
        train_set=train_set,
        val_set=val_set,
        example_input=example,
        callbacks=callbacks,
        summarize=summarize,
    )


def report(model: torch.nn.Module, out, summary: dict, plots: bool = True) -> None:
    if plots:
        from strlowrank.plotting import plot_run

        for path in plot_run(out):
            print(f"plot: {path}")


def main(argv: Sequence[str] | None = None) -> dict:
    cfg, args = parse_config(VisionConfig, __doc__.split("\n\n")[0], argv, prog="vision/train.py")
    return execute(cfg, args, build_task, report)


if __name__ == "__main__":
    sys.exit(run_main(main))

"""Train a CNN dense, with STR, or with a magnitude-pruning baseline (the vision track).

    python vision/train.py                                  # STR ResNet-20 on the shipped subset
    python vision/train.py --method.name gmp --method.final_sparsity 0.9
    python vision/train.py --method.granularity structured --method.streams keep \\
        --target-macs 0.3 --controller.correction track   # whole channels: a smaller CNN
    python vision/train.py --init-from runs/dense/checkpoint.pt --target-sparsity 0.9 --epochs 7
    python vision/train.py --init-from runs/structured/checkpoint.pt --method.name dense
                                                          # fine-tune the smaller CNN it learned
    python vision/train.py --config configs/vision_resnet50_str90.yaml --data-dir /data/imagenet
    torchrun --nproc_per_node=8 vision/train.py --config ... # DistributedDataParallel

The run folder gets config.yaml, metrics.csv, budget.csv, budget_history.csv, summary.json,
checkpoint.pt and plots/ (per-layer sparsity and MACs).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

from strlowrank.training.cli import execute, parse_config, run_main
from strlowrank.training.controller import build_controller
from strlowrank.training.distributed import DistInfo
from strlowrank.training.engine import Task
from vision.config import VisionConfig
from vision.data import build_datasets
from vision.method import check_reachable, smaller_network, sparsify, structured_source
from vision.models import build_model, load_pretrained


def build_task(cfg: VisionConfig, info: DistInfo) -> Task:
    d = cfg.data
    train_set, val_set, num_classes, in_chans = build_datasets(
        d.name, d.root, d.image_size, augment=d.augment, skip_bad_images=d.skip_bad_images
    )
    model = build_model(cfg.model.name, num_classes, in_chans, width=cfg.model.width)
    example = val_set[0][0].unsqueeze(0)
    source = structured_source(cfg.model.init_from) if cfg.model.init_from else None
    if source is not None:  # the smaller network a structured STR run learned
        model = smaller_network(model, source, cfg.model.init_from, example)
    elif cfg.model.init_from:
        for name in load_pretrained(model, cfg.model.init_from):
            print(f"init_from: {name} has another shape (classes): freshly initialized")
    callbacks = sparsify(model, cfg, example)
    controller = build_controller(cfg.controller, model, example)
    if controller is not None:
        if cfg.method.name != "str":
            raise ValueError("controller.target: a budget target needs method.name str")
        if cfg.method.granularity == "structured":
            check_reachable(model, controller)
        callbacks.append(controller)

    def summarize(table) -> dict:
        m = cfg.method
        method = "str_structured" if m.name == "str" and m.granularity == "structured" else m.name
        return {"track": "vision", "method": method, "model": cfg.model.name}

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
        from strlowrank.analysis.plotting import plot_run

        for path in plot_run(out):
            print(f"plot: {path}")


def main(argv: Sequence[str] | None = None) -> dict:
    cfg, args = parse_config(VisionConfig, __doc__.split("\n\n")[0], argv, prog="vision/train.py")
    return execute(cfg, args, build_task, report)


if __name__ == "__main__":
    sys.exit(run_main(main))

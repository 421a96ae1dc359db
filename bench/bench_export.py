"""P4: inference of an exported sparse CNN vs the dense network (issue #7).

Every conv and linear weight is magnitude-pruned to the same density (``strlowrank.pruning``,
uniform per layer; depthwise convs stay dense, as in STR's MobileNetV1 budgets), then
``strlowrank.export.export_sparse_cnn`` replaces each conv (groups 1) / linear layer by a CSR
product where timing that layer at this batch size says it is faster. Both networks run in
eval mode under no_grad with the same BN.
Target: >= 1.5x at 95% sparsity, batch 1, ResNet-50 and MobileNetV1.
Run: python bench/bench_export.py [--models resnet50 mobilenet_v1] [--batch 1 16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_common_args, interleaved, print_table, setup, summarize, write_json
from strlowrank.export import export_sparse_cnn, file_bytes
from strlowrank.pruning import apply_masks, remove_masks, set_layer_densities, uniform_densities
from vision.models import build_model


def pruned(name: str, sparsity: float) -> nn.Module:
    """``name`` (1000 classes, seed 0) with every conv/linear at 1 - ``sparsity`` density."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=1000)
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear)) and getattr(m, "groups", 1) == 1
    ]
    apply_masks(model, include=names)
    set_layer_densities(model, uniform_densities(names, 1.0 - sparsity))
    remove_masks(model)
    return model.eval()


def run_case(name: str, batch: int, sparsity: float, args: argparse.Namespace) -> dict:
    dense = pruned(name, 0.0)
    model = pruned(name, sparsity)
    x = torch.randn(batch, 3, 224, 224)
    exported, choices = export_sparse_cnn(model, x, repeats=args.layer_repeats)
    with torch.no_grad():
        ref = model(x)
        err = float((exported(x) - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
        stats = summarize(
            interleaved(
                {"dense": lambda: dense(x), "sparse": lambda: exported(x)},
                args.repeats,
                args.warmup,
            ),
            "dense",
        )
    speedup = 1.0 / stats["sparse"]["ratio"]
    target = 1.5 if sparsity == 0.95 and batch == 1 else None
    return {
        "model": name, "batch": batch, "sparsity": sparsity, "dense_ms": stats["dense"]["ms"],
        "sparse_ms": stats["sparse"]["ms"], "speedup": speedup,
        "speedup_min": stats["dense"]["min_ms"] / stats["sparse"]["min_ms"],
        "target": f">= {target}" if target else "", "met": "" if not target else speedup >= target,
        "sparse_layers": f"{sum(c.sparse for c in choices)}/{len(choices)}",
        "rel_err": err, "dense_MB": file_bytes(dense) / 2**20,
        "export_MB": file_bytes(exported) / 2**20,
        "layers": [vars(c) for c in choices],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser, repeats=5)
    parser.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v1"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1])
    parser.add_argument("--sparsity", nargs="+", type=float, default=[0.9, 0.95, 0.98])
    parser.add_argument("--layer-repeats", type=int, default=3, help="per-layer timing at export")
    args = parser.parse_args(argv)
    env = setup(args.threads)
    rows = [run_case(m, b, s, args) for m in args.models for b in args.batch for s in args.sparsity]
    cols = ["model", "batch", "sparsity", "dense_ms", "sparse_ms", "speedup", "speedup_min",
            "target", "met", "sparse_layers", "rel_err", "dense_MB", "export_MB"]  # fmt: skip
    print_table(rows, cols, "P4 sparse CNN inference: CSR export vs dense (cpu)")
    write_json("p4_sparse_cnn", env, rows, args.json)
    return rows


if __name__ == "__main__":
    main()

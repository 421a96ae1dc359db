"""P5: inference of a channel-pruned (structured) CNN, exported smaller, vs the dense network

Each case times four candidates interleaved in one run, in eval mode under no_grad: the dense
network and the smaller one (``strlowrank.export.structured_export.export_pruned_cnn``: dead
channels removed, stock convs with fewer channels) in eager torch, and both exported to ONNX
(``strlowrank.export.export_onnx``: BN folded) in ONNX Runtime, all at the same thread count.
``x_torch`` = dense_ms / small_ms in torch, ``x_ort`` = ort_dense_ms / ort_small_ms (median
over rounds of the per-round ratio; ``*_min``: ratio of the fastest rounds).

Widths:
- ``resnet20``: the learned widths and weights of a structured STR run (``--run DIR``, a run
  folder of ``vision/train.py --method.granularity structured``) at its input size (the
  default data: 28 px, 1 channel); without ``--run``, a fixed keep fraction (below).
- ``resnet50`` and ``mobilenet_v1`` (224 px, 1000 classes, random weights): no learned
  ImageNet widths exist, so every coupled channel group keeps the same fraction, chosen by
  torch-pruning's group-norm pruner to ``--macs`` of the dense MACs (the MACs fraction the
  ResNet-20 run learned, when ``--run`` is given).
``--round-to 8``: the small network's widths rounded up to multiples of 8 (zero channels kept;
ONNX Runtime's blocked convs run other widths slowly).
Run: python -m bench.bench_structured --threads 1 [--run RUN_DIR] [--batch 1 64] [--round-to 8]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from bench.common import add_common_args, interleaved, print_table, setup, summarize, write_json
from strlowrank import budget_table, totals
from strlowrank.export.structured_export import export_pruned_cnn
from vision.data import input_size
from vision.method import prune_to_macs, sparsify, structured_source
from vision.models import build_model, first_last_layer_names


def learned_resnet20(
    run: Path, round_to: int | None = None
) -> tuple[nn.Module, nn.Module, tuple[int, ...]]:
    """(dense ResNet-20, the run's exported smaller network, input shape [C, H, W])."""
    cfg = structured_source(str(run / "checkpoint.pt"))
    if cfg is None:
        raise SystemExit(f"--run {run}: not a structured STR run (--method.granularity structured)")
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    size = input_size(cfg.data.name, cfg.data.image_size)
    stem = next(v for k, v in state["model"].items() if k.startswith("conv1.") and v.dim() == 4)
    shape = (stem.shape[1], size, size)
    classes = state["model"]["fc.weight"].shape[0]
    model = build_model(cfg.model.name, classes, in_chans=shape[0], width=cfg.model.width)
    dense = build_model(cfg.model.name, classes, in_chans=shape[0])
    sparsify(model, cfg, torch.randn(1, *shape))  # its thresholds (soft or hard gate)
    model.load_state_dict(state["model"])
    return dense.eval(), export_pruned_cnn(model, torch.randn(1, *shape), round_to), shape


def kept_fraction(
    name: str, macs: float, size: int, round_to: int | None = None
) -> tuple[nn.Module, nn.Module, tuple]:
    """(dense ``name``, a copy pruned to ``macs`` of its MACs with one ratio in every group)."""
    torch.manual_seed(0)
    in_chans = 1 if name == "resnet20" else 3
    dense = build_model(name, 10 if name == "resnet20" else 1000, in_chans=in_chans).eval()
    small = build_model(name, 10 if name == "resnet20" else 1000, in_chans=in_chans)
    small.load_state_dict(dense.state_dict())
    x = torch.randn(1, in_chans, size, size)
    prune_to_macs(small, x, macs, (first_last_layer_names(small)[1],), round_to)
    return dense, small.eval(), (in_chans, size, size)


def _macs(model: nn.Module, x: torch.Tensor) -> float:
    return totals(budget_table(model, x))["macs_dense"]


def _ort(model: nn.Module, x: torch.Tensor):
    from strlowrank.export import export_onnx
    from strlowrank.export.onnx_export import ort_session

    session = ort_session(export_onnx(model, x), threads=torch.get_num_threads())
    feed = {"x": x.numpy()}
    return lambda: session.run(None, feed)


def run_case(name: str, dense: nn.Module, small: nn.Module, x: torch.Tensor, args) -> dict:
    macs = [_macs(m, x[:1]) for m in (dense, small)]
    with torch.no_grad():
        fns = {
            "dense": lambda: dense(x),
            "small": lambda: small(x),
            "ort_dense": _ort(dense, x),
            "ort_small": _ort(small, x),
        }
        times = interleaved(fns, args.repeats, args.warmup)
    torch_stats, ort_stats = summarize(times, "small"), summarize(times, "ort_small")
    return {
        "model": name,
        "batch": x.shape[0],
        "px": x.shape[-1],
        "macs_kept": macs[1] / macs[0],
        "dense_ms": torch_stats["dense"]["ms"],
        "small_ms": torch_stats["small"]["ms"],
        "x_torch": torch_stats["dense"]["ratio"],
        "x_torch_min": torch_stats["dense"]["min_ratio"],
        "ort_dense_ms": ort_stats["ort_dense"]["ms"],
        "ort_small_ms": ort_stats["ort_small"]["ms"],
        "x_ort": ort_stats["ort_dense"]["ratio"],
        "x_ort_min": ort_stats["ort_dense"]["min_ratio"],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser, repeats=5)
    parser.add_argument("--run", type=Path, help="a structured STR run folder (ResNet-20)")
    parser.add_argument("--macs", type=float, default=0.3, help="kept MACs without --run")
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet50", "mobilenet_v1"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--round-to", type=int, help="widths of the small network: multiples")
    args = parser.parse_args(argv)
    env = setup(args.threads)
    rows = []
    for name in args.models:
        if name == "resnet20" and args.run:
            dense, exact, shape = learned_resnet20(args.run)  # the MACs STR learned
            x = torch.randn(1, *shape)
            args.macs = _macs(exact, x) / _macs(dense, x)
            small = learned_resnet20(args.run, args.round_to)[1] if args.round_to else exact
        else:
            size = 28 if name == "resnet20" else 224
            dense, small, shape = kept_fraction(name, args.macs, size, args.round_to)
        for batch in args.batch:
            rows.append(run_case(name, dense, small, torch.randn(batch, *shape), args))
    cols = ["model", "batch", "px", "macs_kept", "dense_ms", "small_ms", "x_torch", "x_torch_min"]
    cols += ["ort_dense_ms", "ort_small_ms", "x_ort", "x_ort_min"]
    print_table(rows, cols, "P5 structured CNN inference: smaller dense network vs dense (cpu)")
    env["widths"] = f"resnet20 from {args.run}" if args.run else "fixed keep fraction"
    env["round_to"] = args.round_to
    write_json("p5_structured_cnn", env, rows, args.json)
    return rows


if __name__ == "__main__":
    main()

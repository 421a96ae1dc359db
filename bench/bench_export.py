"""P4: inference of an exported sparse CNN vs the dense network

Every conv and linear weight is magnitude-pruned to the same density (``strlowrank.method.pruning``,
uniform per layer; depthwise convs stay dense, as in STR's MobileNetV1 budgets), then
``strlowrank.export.export_sparse_cnn``: folds every BatchNorm into the conv before it, runs
max-pools through oneDNN (torch's NCHW max-pool is ~10x slower at one thread), and replaces
each conv (groups 1) / linear layer by CSR products (1x1 convs: one product on [C, HW]; k x k
convs: per-tap products on shifted windows of the padded input, or one product on
concatenated windows; see ``strlowrank.export.sparse_cnn_ops``) where timing that layer at this
batch size says the fastest CSR path beats the dense layer. All networks run in eval mode under
no_grad.

Columns: ``speedup`` = dense_ms / sparse_ms against the dense network as given (what users
have); ``speedup_vs_folded`` against the same dense network after the sparsity-independent
rewrites of the export (BN folded, oneDNN max-pool: ``sparse_cnn_ops.simplify_cnn``), i.e.
the part that comes from sparsity alone. ``paths``: how many layers took each path.
``ort_dense_ms``: the dense network exported to ONNX (``strlowrank.export.export_onnx``, BN
folded) in ONNX Runtime at the same thread count, timed in the same interleaved rounds;
``speedup_vs_ort`` = ort_dense_ms / sparse_ms. Where the export's time goes:
``conv_linear_ms`` is the sum over the exported model's conv/linear layers (dense, depthwise
or CSR) of their time inside a whole forward pass (forward hooks, fastest of 5 passes),
``rest_ms`` = sparse_ms - conv_linear_ms (pooling, ReLUs, residual adds, call overhead);
``top_layers`` the three slowest layers with their share of sparse_ms.
Targets: >= 1.5x at 95% sparsity, batch 1, ResNet-50 and MobileNetV1; ResNet-50 there also
>= 4x PyTorch dense and >= 2.5x ONNX Runtime dense.
Run: python -m bench.bench_export [--models resnet50 mobilenet_v1] [--batch 1 16]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import torch
from torch import nn

from bench.common import add_common_args, interleaved, print_table, setup, summarize, write_json
from strlowrank.export import export_sparse_cnn, file_bytes
from strlowrank.export.sparse_cnn_ops import SparseConv2d, SparseLinear, simplify_cnn
from strlowrank.method.pruning import (
    apply_masks,
    remove_masks,
    set_layer_densities,
    uniform_densities,
)
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


def _layer_ms(model: nn.Module, x: torch.Tensor, passes: int = 5) -> dict[str, float]:
    """ms of each conv/linear layer (dense or CSR) inside a forward pass: fastest of ``passes``."""
    kinds = (nn.Conv2d, nn.Linear, SparseConv2d, SparseLinear)
    times: dict[str, list[float]] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, kinds):

            def pre(mod, args, name=name):
                mod._t0 = time.perf_counter()

            def post(mod, args, out, name=name):
                times.setdefault(name, []).append((time.perf_counter() - mod._t0) * 1e3)

            hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        with torch.no_grad():
            for _ in range(passes):
                model(x)
    finally:
        for h in hooks:
            h.remove()
    return {name: min(ts) for name, ts in times.items()}


def _by_path(layer_ms: dict[str, float], choices: list) -> dict[str, float]:
    """In-situ ms summed per execution path (layers not timed at export count as "dense")."""
    path = {c.name: c.path for c in choices}
    out: dict[str, float] = {}
    for name, ms in layer_ms.items():
        out[path.get(name, "dense")] = out.get(path.get(name, "dense"), 0.0) + ms
    return out


def _ort(model: nn.Module, x: torch.Tensor):
    """A callable running ``model`` in ONNX Runtime on ``x`` (None without onnxruntime)."""
    try:
        from strlowrank.export import export_onnx
        from strlowrank.export.onnx_export import ort_session
    except ImportError:
        return None
    session = ort_session(export_onnx(model, x), threads=torch.get_num_threads())
    feed = {"x": x.numpy()}
    return lambda: session.run(None, feed)


def run_case(name: str, batch: int, sparsity: float, args: argparse.Namespace) -> dict:
    dense = pruned(name, 0.0)
    folded = simplify_cnn(dense)
    model = pruned(name, sparsity)
    x = torch.randn(batch, 3, 224, 224)
    exported, choices = export_sparse_cnn(model, x, repeats=args.layer_repeats)
    with torch.no_grad():
        ref = model(x)
        err = float((exported(x) - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
        ref = dense(x)
        err_folded = float((folded(x) - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
        fns = {
            "dense": lambda: dense(x),
            "folded": lambda: folded(x),
            "sparse": lambda: exported(x),
        }
        if (ort := _ort(dense, x)) is not None:
            fns["ort_dense"] = ort
        times = interleaved(fns, args.repeats, args.warmup)
    stats = summarize(times, "dense")
    vs_folded = summarize(times, "folded")["sparse"]
    speedup = 1.0 / stats["sparse"]["ratio"]
    paths = Counter(c.path for c in choices)
    layer_ms = _layer_ms(exported, x)
    top = sorted(layer_ms.items(), key=lambda kv: -kv[1])[:3]
    sparse_ms = stats["sparse"]["ms"]
    by_path = _by_path(layer_ms, choices)
    ort_x = stats["ort_dense"]["ratio"] / stats["sparse"]["ratio"] if "ort_dense" in stats else None
    target = 1.5 if sparsity == 0.95 and batch == 1 else None
    return {
        "model": name,
        "batch": batch,
        "sparsity": sparsity,
        "dense_ms": stats["dense"]["ms"],
        "sparse_ms": stats["sparse"]["ms"],
        "speedup": speedup,
        "speedup_min": stats["dense"]["min_ms"] / stats["sparse"]["min_ms"],
        "dense_folded_ms": stats["folded"]["ms"],
        "speedup_vs_folded": 1.0 / vs_folded["ratio"],
        "speedup_vs_folded_min": 1.0 / vs_folded["min_ratio"],
        "target": f">= {target}" if target else "",
        "met": "" if not target else speedup >= target,
        "sparse_layers": f"{sum(c.sparse for c in choices)}/{len(choices)}",
        "paths": " ".join(f"{k}:{v}" for k, v in sorted(paths.items())),
        "rel_err": err,
        "rel_err_folded": err_folded,
        "dense_MB": file_bytes(dense) / 2**20,
        "export_MB": file_bytes(exported) / 2**20,
        "ort_dense_ms": stats["ort_dense"]["ms"] if ort_x else float("nan"),
        "speedup_vs_ort": ort_x or float("nan"),
        "conv_linear_ms": sum(layer_ms.values()),
        "rest_ms": sparse_ms - sum(layer_ms.values()),
        "ms_by_path": " ".join(f"{k}:{v:.1f}" for k, v in sorted(by_path.items())),
        "top_layers": " ".join(f"{n}:{ms / sparse_ms:.0%}" for n, ms in top),
        "layers": [vars(c) for c in choices],
    }


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
    cols = [
        "model",
        "batch",
        "sparsity",
        "dense_ms",
        "dense_folded_ms",
        "ort_dense_ms",
        "sparse_ms",
        "speedup",
        "speedup_min",
        "speedup_vs_folded",
        "speedup_vs_ort",
        "target",
        "met",
        "conv_linear_ms",
        "rest_ms",
        "ms_by_path",
        "top_layers",
        "sparse_layers",
        "paths",
        "rel_err",
        "dense_MB",
        "export_MB",
    ]
    print_table(rows, cols, "P4 sparse CNN inference: CSR export vs dense (cpu)")
    write_json("p4_sparse_cnn", env, rows, args.json)
    return rows


if __name__ == "__main__":
    main()

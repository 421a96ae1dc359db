"""P1: training-step time of STR vs dense.

One step = forward, cross-entropy, backward, SGD (momentum) update, on random data. Candidates:
dense; ``str`` (``strlowrank.method.threshold.SoftThreshold``, the default fused autograd function:
two passes forward, only S saved); ``str_plain`` (the plain sign(w) relu(|w| - g(s)) autograd
expression, ``fused=False``). STR is applied to every conv and linear layer with a per-layer
threshold. Two floors show what any weight reparameterization costs: ``floor_param`` (an
identity parametrization: the machinery alone) and ``floor_1pass`` (W' = 1.0 * W: one
weight-sized pass and allocation per step, no backward work).
Target: str <= 1.05x dense.  Run: python -m bench.bench_str_overhead [--repeats 5]

GPU table (dense vs STR in both memory formats, bf16 autocast; ``x_dense`` is relative to dense
in the same format):
    python -m bench.bench_str_overhead --device cuda --amp bf16 --cases resnet50:256:224 \
        --formats contiguous channels_last --variants dense str
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from bench.common import add_common_args, interleaved, print_table, setup, summarize, write_json
from strlowrank.method.threshold import apply_soft_threshold, thresholded_modules
from vision.models import build_model

# (model, batch, image size); weights large relative to activations in the second
CASES = (("resnet50", 8, 224), ("resnet18", 32, 64))
VARIANTS = ("dense", "str_plain", "str", "floor_param", "floor_1pass")
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def make_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: torch.dtype | None = None
) -> Callable[[], None]:
    """A closure running one SGD training step of ``model`` on (x, y), under autocast to
    ``amp`` if given."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()

    return step


class _Identity(nn.Module):
    """Floor 1: the parametrization machinery alone (W' = W, no pass over the weights)."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w


class _OnePass(nn.Module):
    """Floor 2: one weight-sized pass and allocation per forward (W' = 1.0 * W), gradient
    passed through; any reparameterization that writes W' costs at least this."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * 1.0


def _parametrized(name: str, device: str, state: dict, kind: type[nn.Module]) -> nn.Module:
    model = build_model(name, num_classes=1000).to(device)
    model.load_state_dict(state)
    for module in list(model.modules()):
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            parametrize.register_parametrization(module, "weight", kind())
    return model


def variants(name: str, device: str) -> dict[str, nn.Module]:
    """dense, str (default, fused), str_plain and two floors (identity parametrization, one
    weight pass) built from the same initial network."""
    torch.manual_seed(0)
    dense = build_model(name, num_classes=1000).to(device)
    plain = build_model(name, num_classes=1000).to(device)
    plain.load_state_dict(dense.state_dict())
    apply_soft_threshold(plain, s_init=-6.0)
    for _, _, p in thresholded_modules(plain):
        p.fused = False  # the plain autograd expression, for reference
    fused = build_model(name, num_classes=1000).to(device)
    fused.load_state_dict(dense.state_dict())
    apply_soft_threshold(fused, s_init=-6.0)  # the default: fused autograd function
    state = dense.state_dict()
    return {
        "dense": dense,
        "str_plain": plain,
        "str": fused,
        "floor_param": _parametrized(name, device, state, _Identity),
        "floor_1pass": _parametrized(name, device, state, _OnePass),
    }


def run_case(
    name: str, batch: int, size: int, args: argparse.Namespace, fmt: str = "contiguous"
) -> list[dict]:
    """Rows of one (model, batch, px) case in memory format ``fmt``, variants interleaved."""
    memory_format = FORMATS[fmt]
    x = torch.randn(batch, 3, size, size, device=args.device)
    x = x.contiguous(memory_format=memory_format)
    y = torch.randint(0, 1000, (batch,), device=args.device)
    amp = {"off": None, "bf16": torch.bfloat16}[args.amp]
    models = variants(name, args.device)
    steps = {
        k: make_step(m.to(memory_format=memory_format), x, y, amp)
        for k, m in models.items()
        if k == "dense" or k in args.variants
    }
    stats = summarize(interleaved(steps, args.repeats, args.warmup, args.device), "dense")
    return [
        {
            "model": name,
            "batch": batch,
            "px": size,
            "format": fmt,
            "amp": args.amp,
            "variant": k,
            "ms": v["ms"],
            "img_s": 1e3 * batch / v["ms"],
            "x_dense": v["ratio"],
            "x_dense_min": v["min_ratio"],
            "target": "<= 1.05" if k == "str" else "",
        }
        for k, v in stats.items()
    ]


def _case(text: str) -> tuple[str, int, int]:
    """MODEL:BATCH:PX, e.g. resnet50:256:224."""
    name, batch, size = text.split(":")
    return name, int(batch), int(size)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser, repeats=5)
    parser.add_argument("--models", nargs="+", default=None, help="only these models' cases")
    parser.add_argument(
        "--cases",
        nargs="+",
        type=_case,
        default=CASES,
        metavar="MODEL:BATCH:PX",
        help="cases to time instead of the default ones, e.g. resnet50:256:224",
    )
    parser.add_argument(
        "--formats",
        nargs="+",
        default=["contiguous"],
        choices=tuple(FORMATS),
        help="memory formats of weights and inputs (one table each)",
    )
    parser.add_argument("--amp", default="off", choices=("off", "bf16"), help="autocast dtype")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=VARIANTS,
        choices=VARIANTS,
        help="variants to time (dense, the baseline, always)",
    )
    args = parser.parse_args(argv)
    env = setup(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # as the engine does on CUDA
    rows = []
    for name, batch, size in args.cases:
        if args.models is None or name in args.models:
            for fmt in args.formats:
                rows += run_case(name, batch, size, args, fmt)
    cols = [
        "model",
        "batch",
        "px",
        "format",
        "amp",
        "variant",
        "ms",
        "img_s",
        "x_dense",
        "x_dense_min",
        "target",
    ]
    print_table(rows, cols, f"P1 STR training-step overhead ({args.device}, {args.threads} thr)")
    write_json("p1_str_overhead", env, rows, args.json)
    return rows


if __name__ == "__main__":
    main()

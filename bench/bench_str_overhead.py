"""P1: training-step time of STR vs dense (issue #7).

One step = forward, cross-entropy, backward, SGD (momentum) update, on random data. Candidates:
dense; ``str`` (``strlowrank.threshold.SoftThreshold``, the default fused autograd function:
two passes forward, only S saved); ``str_plain`` (the plain sign(w) relu(|w| - g(s)) autograd
expression, ``fused=False``). STR is applied to every conv and linear layer with a per-layer
threshold. Two floors show what any weight reparameterization costs: ``floor_param`` (an
identity parametrization: the machinery alone) and ``floor_1pass`` (W' = 1.0 * W: one
weight-sized pass and allocation per step, no backward work).
Target: str <= 1.05x dense.  Run: python bench/bench_str_overhead.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_common_args, interleaved, print_table, setup, summarize, write_json
from strlowrank.threshold import apply_soft_threshold, thresholded_modules
from vision.models import build_model

# (model, batch, image size) of the issue: weights large relative to activations in the second
CASES = (("resnet50", 8, 224), ("resnet18", 32, 64))


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """A closure running one SGD training step of ``model`` on (x, y)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
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
    return {"dense": dense, "str_plain": plain, "str": fused,
            "floor_param": _parametrized(name, device, state, _Identity),
            "floor_1pass": _parametrized(name, device, state, _OnePass)}  # fmt: skip


def run_case(name: str, batch: int, size: int, args: argparse.Namespace) -> list[dict]:
    x = torch.randn(batch, 3, size, size, device=args.device)
    y = torch.randint(0, 1000, (batch,), device=args.device)
    steps = {k: make_step(m, x, y) for k, m in variants(name, args.device).items()}
    stats = summarize(interleaved(steps, args.repeats, args.warmup, args.device), "dense")
    return [
        {"model": name, "batch": batch, "px": size, "variant": k, "ms": v["ms"],
         "x_dense": v["ratio"], "x_dense_min": v["min_ratio"],
         "target": "<= 1.05" if k == "str" else ""}
        for k, v in stats.items()
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser, repeats=5)
    parser.add_argument("--models", nargs="+", default=[c[0] for c in CASES])
    args = parser.parse_args(argv)
    env = setup(args.threads)
    rows = []
    for name, batch, size in CASES:
        if name in args.models:
            rows += run_case(name, batch, size, args)
    cols = ["model", "batch", "px", "variant", "ms", "x_dense", "x_dense_min", "target"]
    print_table(rows, cols, f"P1 STR training-step overhead ({args.device}, {args.threads} thr)")
    write_json("p1_str_overhead", env, rows, args.json)
    return rows


if __name__ == "__main__":
    main()

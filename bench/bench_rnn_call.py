"""The fused GRU recurrence through torch._VF.gru vs torch.func.functional_call on nn.GRU.

A training step (forward, mean-pool + linear cross-entropy, backward) of the default
learned-rank GRU of the speech track (``SpeechModelConfig()``: STR matrices, H=128) at B=64,
T=99, I=32. The layer's effective W [3H, I], U [3H, H] and biases go to one of:

- ``_VF``: ``torch._VF.gru`` (private; the call inside ``nn.GRU.forward``);
- ``functional_call``: ``torch.func.functional_call`` on a stock ``nn.GRU`` built on the meta
  device at every call (public; reaches the same fused kernel);
- ``RNNLayer``: the library's own ``RNNLayer.forward`` (whichever of the two it uses);
- ``_VF again``: ``_VF`` a second time in the same rounds, the noise floor of the ratios.

Timed interleaved (``strlowrank.export.timing.interleaved``); prints each candidate's time and its
ratio to ``_VF`` (median over rounds of the per-round ratio, < 1: faster than ``_VF``), then the
fixed cost of one call: a forward of one frame (B=1, T=1, no grad) through each call.
Run: OMP_NUM_THREADS=1 python -m bench.bench_rnn_call --threads 1 (about 15 s).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bench.common import add_common_args, interleaved, print_table, setup, summarize, write_json
from speech.models import SpeechModelConfig, matrix_specs
from strlowrank.method.rnn import RNNLayer

STEPS, FEATURES, BATCH, CLASSES = 99, 32, 64, 12
GRU_NAMES = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
Recurrence = Callable[[torch.Tensor, list[torch.Tensor], torch.Tensor], torch.Tensor]


def vf_gru(x: torch.Tensor, weights: list[torch.Tensor], h0: torch.Tensor) -> torch.Tensor:
    """Outputs [B, T, H] of torch._VF.gru on x [B, T, I], h0 [1, B, H], [W, U, b_ih, b_hh]."""
    return torch._VF.gru(x, h0, weights, True, 1, 0.0, True, False, True)[0]


def functional_gru(x: torch.Tensor, weights: list[torch.Tensor], h0: torch.Tensor) -> torch.Tensor:
    """The same outputs through torch.func.functional_call on a meta-device nn.GRU."""
    gru = nn.GRU(x.shape[2], h0.shape[2], batch_first=True, device="meta")
    return torch.func.functional_call(gru, dict(zip(GRU_NAMES, weights)), (x, h0))[0]


def training_steps(hidden: int, device: str) -> dict[str, Callable[[], None]]:
    """{candidate: one forward + backward step} on one shared layer, head and batch."""
    torch.manual_seed(0)
    spec_w, spec_u = matrix_specs(SpeechModelConfig())
    layer = RNNLayer("gru", FEATURES, hidden, spec=spec_w, spec_u=spec_u).to(device).train()
    head = nn.Linear(hidden, CLASSES).to(device)
    x = torch.randn(BATCH, STEPS, FEATURES, device=device)
    y = torch.randint(0, CLASSES, (BATCH,), device=device)
    h0 = torch.zeros(1, BATCH, hidden, device=device)
    params = [*layer.parameters(), *head.parameters()]

    def step_with(recurrence: Recurrence) -> Callable[[], None]:
        def step() -> None:
            for p in params:
                p.grad = None
            out = recurrence(x, [*layer.stacked_weights(), layer.bias_ih, layer.bias_hh], h0)
            F.cross_entropy(head(out.mean(dim=1)), y).backward()

        return step

    return {
        "_VF": step_with(vf_gru),
        "functional_call": step_with(functional_gru),
        "RNNLayer": step_with(lambda x, weights, h0: layer(x)[0]),
        "_VF again": step_with(vf_gru),
    }


def call_cost(hidden: int, repeats: int, calls: int = 100) -> list[dict]:
    """ms per forward of one frame (B=1, T=1, no grad): the fixed cost of each call."""
    torch.manual_seed(0)
    weights = [
        torch.randn(3 * hidden, FEATURES),
        torch.randn(3 * hidden, hidden),
        torch.randn(3 * hidden),
        torch.randn(3 * hidden),
    ]
    x, h0 = torch.randn(1, 1, FEATURES), torch.zeros(1, 1, hidden)

    def repeated(recurrence: Recurrence) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                for _ in range(calls):
                    recurrence(x, weights, h0)

        return run

    fns = {"_VF": repeated(vf_gru), "functional_call": repeated(functional_gru)}
    stats = summarize(interleaved(fns, repeats, 1), "_VF")
    return [
        {
            "H": hidden,
            "B": 1,
            "T": 1,
            "call": name,
            "ms_per_call": s["ms"] / calls,
            "min_ms_per_call": s["min_ms"] / calls,
        }
        for name, s in stats.items()
    ]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser, repeats=50)
    parser.add_argument("--hidden", type=int, default=128)
    args = parser.parse_args(argv)
    env = setup(args.threads)
    steps = training_steps(args.hidden, args.device)
    stats = summarize(interleaved(steps, args.repeats, args.warmup, args.device), "_VF")
    rows = [
        {
            "H": args.hidden,
            "B": BATCH,
            "T": STEPS,
            "I": FEATURES,
            "call": name,
            "ms": s["ms"],
            "min_ms": s["min_ms"],
            "x_VF": s["ratio"],
            "x_VF_min": s["min_ratio"],
        }
        for name, s in stats.items()
    ]
    print_table(rows, list(rows[0]), f"GRU training step, recurrence call ({args.device})")
    print(
        f"functional_call / _VF = {stats['functional_call']['ratio']:.3f} (median ratio), "
        f"{stats['functional_call']['min_ratio']:.3f} (fastest rounds)"
    )
    cost = call_cost(args.hidden, max(args.repeats // 5, 3))
    print_table(cost, list(cost[0]), "Fixed cost of one call (one frame, no grad, cpu)")
    write_json("rnn_call", env, {"step": rows, "call_cost": cost}, args.json)
    return rows


if __name__ == "__main__":
    main()

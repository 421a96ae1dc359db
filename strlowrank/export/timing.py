"""Wall-clock timing of candidates side by side: the one implementation shared by the export's
per-layer path choice (``strlowrank.export``) and the benchmarks (``bench/``).

Candidates run interleaved (A B C A B C ...) after warm-up rounds, so a change of machine load
hits all of them alike; on CUDA each call is bracketed by a synchronize.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def sync(device: str) -> None:
    """Wait for queued CUDA work (no-op on CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, device: str = "cpu"
) -> dict[str, list[float]]:
    """Time every fn once per round, rounds interleaved; returns {name: [ms per round]}."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return times

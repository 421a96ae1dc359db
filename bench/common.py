"""Shared helpers of the benchmarks: fixed threads, interleaved timing, tables, JSON.

Every benchmark times its candidates interleaved (A B C A B C ...) after warm-up calls, so a
change of machine load hits all of them alike, and reports per candidate the median time and
per pair the median of the per-round ratios baseline / candidate (> 1: the candidate is faster).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from strlowrank.export.timing import interleaved  # noqa: F401 (re-exported: the benchmarks' timing)

REPO = Path(__file__).resolve().parents[1]


def add_common_args(parser: argparse.ArgumentParser, repeats: int = 5) -> None:
    """--threads, --repeats, --warmup, --device, --json (the flags every benchmark shares)."""
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed rounds (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--json", default=None, help="write results here (default bench/out/)")


def setup(threads: int) -> dict:
    """Fix the thread count and return a description of the machine and the moment."""
    torch.set_num_threads(threads)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": platform.node(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "load_avg_start": [round(x, 2) for x in load],
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def summarize(times: dict[str, list[float]], baseline: str) -> dict[str, dict[str, float]]:
    """{name: {ms: median, min_ms: fastest, ratio: median over rounds of t_name / t_baseline,
    min_ratio: min t_name / min t_baseline}}."""
    base = times[baseline]
    return {
        name: {
            "ms": statistics.median(ts),
            "min_ms": min(ts),
            "ratio": statistics.median(t / b for t, b in zip(ts, base)),
            "min_ratio": min(ts) / min(base),
        }
        for name, ts in times.items()
    }


def print_table(rows: Sequence[dict], columns: Sequence[str], title: str) -> None:
    """A plain fixed-width table of ``columns`` (floats with 3 significant decimals)."""

    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print(f"\n## {title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    sys.stdout.flush()


def write_json(name: str, env: dict, results: object, path: str | None = None) -> Path:
    """Write {"env": env (+ load at the end), "results": results} to bench/out/NAME.json."""
    env = dict(env)
    if hasattr(os, "getloadavg"):
        env["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    out = Path(path) if path else REPO / "bench" / "out" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env, "results": results}, indent=1, default=str))
    print(f"\nwrote {out}  (load avg {env.get('load_avg_start')} -> {env.get('load_avg_end')})")
    return out

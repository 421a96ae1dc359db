"""Run every benchmark in one process and write bench/out/all.json.

P1 (STR training-step overhead), P2/P3 (GRU training, low-rank GRU export), P4 (sparse CNN
export at batch 1 and 16), data throughput. Takes 10-20 minutes on 2 CPU threads; ``--quick``
runs a reduced set (3 rounds, P4 at batch 1 only) in a few minutes.
Run: python -m bench.run_all [--threads 2] [--device cpu] [--quick]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench import bench_data, bench_export, bench_rnn, bench_str_overhead
from bench.common import REPO, setup


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cuda: P1, P2 only (P3, P4 are CPU)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(REPO / "bench" / "out"))
    args = parser.parse_args(argv)
    env = setup(args.threads)
    common = ["--threads", str(args.threads), "--device", args.device]
    common += ["--repeats", "3" if args.quick else "5"]
    out = Path(args.out)
    results: dict = {"env": env}
    results["p1"] = bench_str_overhead.main(common + ["--json", str(out / "p1.json")])
    rnn_parts = ["p2", "p3"] if args.device == "cpu" else ["p2"]
    rnn = bench_rnn.main(common + ["--part", *rnn_parts, "--json", str(out / "p2_p3.json")])
    results.update(rnn)
    if args.device == "cpu":
        batches = ["1"] if args.quick else ["1", "16"]
        p4_args = common + ["--batch", *batches, "--json", str(out / "p4.json")]
        results["p4"] = bench_export.main(p4_args)
        results["data"] = bench_data.main(common + ["--json", str(out / "data.json")])
    out.mkdir(parents=True, exist_ok=True)
    (out / "all.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"\nwrote {out / 'all.json'}")
    return results


if __name__ == "__main__":
    main()

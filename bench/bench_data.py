"""Data throughput: the speech feature pipeline and the espeak clip generator

- features: ``speech.features.feature_extractor()`` (32 log-mel, 25 ms / 10 ms) on random waves
  [N, 16000], clips per second (median of rounds);
- synthesis: ``speech.synth.render_clip`` (espeak-ng word, warp, room, channel, noise, level),
  clips per second in one process (the generator runs ``SynthConfig.workers`` processes);
  skipped with a note when espeak-ng is not importable.
Run: python -m bench.bench_data [--clips 512]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from bench.common import add_common_args, interleaved, print_table, setup, write_json


def features(clips: int, args: argparse.Namespace) -> dict:
    from speech.features import feature_extractor

    extract = feature_extractor()
    waves = torch.rand(clips, 16000) * 2 - 1
    shape = tuple(extract(waves[:2]).shape[1:])
    ms = statistics.median(interleaved({"f": lambda: extract(waves)}, args.repeats)["f"])
    return {
        "stage": f"features [N,16000] -> [N,{shape[0]},{shape[1]}]",
        "N": clips,
        "ms": ms,
        "clips_per_s": clips / ms * 1e3,
    }


def synthesis(clips: int) -> dict:
    try:
        from speech.synth import SynthConfig, make_speakers, render_clip

        cfg = SynthConfig(n_speakers=4)
        speakers = make_speakers(cfg)
        rng = np.random.default_rng(0)
        render_clip(speakers[0], "yes", rng, cfg)  # warm-up: espeak start, noise pools
    except (ImportError, OSError, RuntimeError) as err:
        return {"stage": "synthesis (render_clip)", "N": 0, "note": f"skipped: {err}"}
    start = time.perf_counter()
    for i in range(clips):
        speaker = speakers[i % len(speakers)]
        render_clip(speaker, speaker.takes[i % len(speaker.takes)][0], rng, cfg)
    ms = (time.perf_counter() - start) * 1e3
    return {
        "stage": "synthesis (render_clip, 1 process)",
        "N": clips,
        "ms": ms,
        "clips_per_s": clips / ms * 1e3,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser, repeats=5)
    parser.add_argument("--clips", type=int, default=512, help="waves per feature batch")
    parser.add_argument("--synth-clips", type=int, default=40, help="clips rendered (0: skip)")
    args = parser.parse_args(argv)
    env = setup(args.threads)
    rows = [features(args.clips, args)]
    if args.synth_clips:
        rows.append(synthesis(args.synth_clips))
    print_table(rows, ["stage", "N", "ms", "clips_per_s", "note"], "Data throughput (cpu)")
    write_json("data_throughput", env, rows, args.json)
    return rows


if __name__ == "__main__":
    main()

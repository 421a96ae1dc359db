"""Caches under concurrent processes (strlowrank.method.cache): real processes start together on one
cold cache and all end with the same data; a builder killed with SIGKILL mid-build leaves a cache
that the next run repairs. Trees are tiny, so each test takes seconds."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from strlowrank.method.cache import (
    MARKER,
    build_once,
    cache_lock,
    is_built,
    temp_siblings,
    write_atomic,
)

ROOT = Path(__file__).resolve().parents[1]
N_PROCESSES = 3
TINY_SPEECH = dict(
    n_speakers=3,
    keywords_per_speaker=3,
    others_per_speaker=1,
    repeat_prob=0.0,
    noise_seconds=2.0,
    workers=1,
)  # 12 clips, 2 s noise files

DIGEST = """
import hashlib
from pathlib import Path

def digest(root):
    h = hashlib.sha256()
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + b"\\0" + p.read_bytes())
    return h.hexdigest()
"""


def tree_digest(root: Path) -> str:
    """SHA-256 over the relative paths and bytes of every file under root."""
    scope: dict = {}
    exec(DIGEST, scope)
    return scope["digest"](root)


def start(code: str, *args: str) -> subprocess.Popen:
    """python -c code args..., with the repository importable; stdout and stderr piped."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish_all(procs: list[subprocess.Popen], timeout: float = 240) -> list[str]:
    """Wait for every process; assert each exited 0; return their stdouts."""
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-3000:]
        outs.append(out)
    return outs


def wait_for(predicate, what: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# --------------------------------------------------------------------------- the primitive

BUILDER = """
import os, sys, time
from pathlib import Path
from strlowrank.method.cache import build_once

def build(tmp):
    (tmp / "part1").write_text(str(os.getpid()))
    print("building", flush=True)
    time.sleep(float(sys.argv[2]))
    (tmp / "part2").write_text(str(os.getpid()))

root = build_once(Path(sys.argv[1]), build, key="v1")
print("result", (root / "part1").read_text(), (root / "part2").read_text(), flush=True)
"""


def test_build_once_builds_once_for_concurrent_processes(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "thing"
    procs = [start(BUILDER, str(target), "1.0") for _ in range(N_PROCESSES)]
    outs = finish_all(procs, timeout=240)
    results = [line for out in outs for line in out.splitlines() if line.startswith("result")]
    assert len(set(results)) == 1  # every process read the one tree
    assert sum("building" in out for out in outs) == 1  # built exactly once
    builder = results[0].split()[1]
    assert results[0] == f"result {builder} {builder}"  # both parts from the same build
    assert is_built(target, "v1") and not temp_siblings(target)


def test_build_once_repairs_a_build_killed_halfway(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "thing"
    proc = start(BUILDER, str(target), "60")
    assert proc.stdout.readline().strip() == "building"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not target.exists()  # a reader sees nothing, never the half-built tree
    assert len(temp_siblings(target)) == 1
    with cache_lock(target):  # the kernel released the killed builder's lock
        pass
    build_once(target, lambda tmp: (tmp / "part1").write_text("fresh"), key="v1")
    assert (target / "part1").read_text() == "fresh" and not (target / "part2").exists()
    assert not temp_siblings(target)  # the killed build's leftovers are gone


def test_build_once_replaces_other_key_and_unmarked_folder(tmp_path: Path) -> None:
    target = tmp_path / "thing"
    target.mkdir()
    (target / "old").write_text("from an interrupted writer without the primitive")
    build_once(target, lambda tmp: (tmp / "new").write_text("1"), key="a")
    assert sorted(p.name for p in target.iterdir()) == [MARKER, "new"]
    calls = []
    build_once(target, calls.append, key="a")  # complete with this key: reused
    assert calls == []
    build_once(target, lambda tmp: (tmp / "newer").write_text("2"), key="b")
    assert sorted(p.name for p in target.iterdir()) == [MARKER, "newer"]
    assert is_built(target, "b") and not is_built(target, "a")
    assert not temp_siblings(target)


def test_write_atomic_text_bytes_and_writer(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "f.bin"
    write_atomic(path, "héllo")
    assert path.read_text(encoding="utf-8") == "héllo"
    write_atomic(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    write_atomic(path, lambda f: f.write(b"abc"))
    assert path.read_bytes() == b"abc" and not temp_siblings(path)
    with pytest.raises(RuntimeError):
        write_atomic(path, lambda f: (f.write(b"partial"), (_ for _ in ()).throw(RuntimeError)))
    assert path.read_bytes() == b"abc" and not temp_siblings(path)  # old file kept, temp removed


# --------------------------------------------------------------------------- the real caches

DATA_WORKER = (
    DIGEST
    + f"""
import json, sys
import vision.data
from speech.features import load_features
from speech.synth import SynthConfig, generate_dataset

cache, asset = Path(sys.argv[1]), Path(sys.argv[2])
vision.data.ASSET = asset  # a tiny stand-in for the shipped subset
fashion = vision.data.ensure_fashion_mnist_tree(cache)
speech = generate_dataset(cache / "speech", SynthConfig(**{TINY_SPEECH!r}), progress=False)
sets = load_features(speech, cache_dir=cache, progress=False)
features = hashlib.sha256(b"".join(s.x.numpy().tobytes() for s in sets.values())).hexdigest()
print(json.dumps({{"fashion": digest(fashion), "speech": digest(speech), "features": features}}))
"""
)


def tiny_fashion_asset(path: Path) -> Path:
    """An npz in the shipped subset's format: 10 classes x 3 train and 1 test image."""
    rng = np.random.default_rng(0)
    classes = np.array([f"{c}_class" for c in range(10)])
    np.savez_compressed(
        path,
        classes=classes,
        x_train=rng.integers(0, 256, (30, 28, 28), dtype=np.uint8),
        y_train=np.repeat(np.arange(10, dtype=np.uint8), 3),
        x_test=rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
        y_test=np.arange(10, dtype=np.uint8),
    )
    return path


def test_processes_on_a_cold_cache_get_identical_data(tmp_path: Path) -> None:
    pytest.importorskip("espeakng_loader")
    cache, asset = tmp_path / "cache", tiny_fashion_asset(tmp_path / "tiny.npz")
    procs = [start(DATA_WORKER, str(cache), str(asset)) for _ in range(N_PROCESSES)]
    results = [json.loads(out.splitlines()[-1]) for out in finish_all(procs)]
    assert all(r == results[0] for r in results), results
    assert results[0]["fashion"] == tree_digest(cache / "fashion_mnist_subset")
    assert results[0]["speech"] == tree_digest(cache / "speech")
    assert len(list((cache / "features").glob("*.pt"))) == 1  # computed once
    assert not [p for p in cache.rglob(".*.tmp-*")]  # no temporary sibling left anywhere


SPEECH_BUILDER = """
import sys
from pathlib import Path
from speech.synth import SynthConfig, generate_dataset

generate_dataset(Path(sys.argv[1]), SynthConfig(n_speakers=12, workers=1), progress=False)
"""


def test_speech_tree_killed_mid_build_is_redone(tmp_path: Path) -> None:
    pytest.importorskip("espeakng_loader")
    from speech.synth import SynthConfig, generate_dataset, is_complete

    root = tmp_path / "speech"
    proc = start(SPEECH_BUILDER, str(root))
    wait_for(lambda: any(t.rglob("*_nohash_*.wav") for t in temp_siblings(root)), "first clip")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not root.exists()  # the half-written tree is never where readers look
    cfg = SynthConfig(**TINY_SPEECH)
    generate_dataset(root, cfg, progress=False)
    assert is_complete(root, cfg) and len(list(root.glob("*/*_nohash_*.wav"))) == 12
    assert not temp_siblings(root)


GRU_WORKER = """
import hashlib, sys
import torch
from strlowrank.export import gru_cpp

if not gru_cpp.available():
    print("unavailable:", gru_cpp.unavailable_reason())
    sys.exit(0)
g = torch.Generator().manual_seed(0)
x, h0 = torch.randn(2, 5, 6, generator=g), torch.randn(2, 4, generator=g)
weights = (torch.randn(3, 12, generator=g), torch.randn(6, 3, generator=g),
           torch.randn(2, 12, generator=g), torch.randn(4, 2, generator=g),
           torch.randn(12, generator=g), torch.randn(12, generator=g))
out, h = gru_cpp.gru_forward(x, h0, weights, True, True)
so = (gru_cpp.cache_dir() / "strlowrank_gru.so").read_bytes()
print(hashlib.sha256(so).hexdigest(), hashlib.sha256(out.numpy().tobytes()).hexdigest())
"""


def test_compiled_gru_built_once_by_concurrent_processes(tmp_path_factory) -> None:
    # The session's cache: when this test runs first (it sorts before test_gru_cpp) the cache
    # is cold and test_gru_cpp then reuses this build instead of compiling again.
    from strlowrank.export import gru_cpp

    procs = [start(GRU_WORKER) for _ in range(N_PROCESSES)]
    texts = finish_all(procs, timeout=600)
    if any(t.startswith("unavailable") for t in texts):
        pytest.skip(f"compiled GRU {texts[0].strip()}")
    outs = [t.split()[-2:] for t in texts]
    assert all(o == outs[0] for o in outs), outs
    folder = gru_cpp.cache_dir()
    assert is_built(folder) and not temp_siblings(folder)
    assert hashlib.sha256((folder / "strlowrank_gru.so").read_bytes()).hexdigest() == outs[0][0]

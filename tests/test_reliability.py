"""Reliability: interrupted runs, hostile files, bad inputs and numerical faults.

Runs vision/train.py for real on a tiny ImageFolder tree: a subprocess is stopped with SIGTERM
and SIGKILL at several points (one kill lands inside a checkpoint write) and resumed until it
finishes with weights bit-identical to an uninterrupted run. The other cases go through
``run_main`` in this process, which is what the entry script runs: one ``error:`` line on stderr
and a non-zero status. docs/RELIABILITY.md lists every case, including those tested elsewhere.
"""

from __future__ import annotations

import ast
import errno
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from speech import train_gru
from strlowrank.training.checkpoint import load_checkpoint
from strlowrank.training.cli import run_main
from vision.train import main

ROOT = Path(__file__).resolve().parents[1]
# 3 epochs of 10 steps (38 training images, batch 4): long enough to stop a run mid-epoch
FAST = [
    "--train.progress=false",
    "--train.batch_size=4",
    "--data.image_size=16",
    "--data.name=imagefolder",
    "--data.augment=false",
    "--device=cpu",
    "--epochs",
    "3",
]
DEADLINE_S = 120.0


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread, as in the subprocesses (OMP_NUM_THREADS=1): equal floating point
    results, and no thread contention on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_tree(root: Path, classes: int = 3) -> Path:
    """train/ (12 RGB images a class, plus one grayscale and one RGBA PNG) and val/ (4 a class)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 4)):
        for c in range(classes):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(n):
                img = (rng.random((16, 16, 3)) * 80 + c * 80).astype(np.uint8)
                Image.fromarray(img).save(root / split / f"class{c}" / f"{i}.png")
    gray = (rng.random((16, 16)) * 255).astype(np.uint8)
    Image.fromarray(gray, "L").save(root / "train" / "class0" / "gray.png")
    rgba = (rng.random((16, 16, 4)) * 255).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(root / "train" / "class1" / "rgba.png")
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return write_tree(tmp_path_factory.mktemp("reliability_tree"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tree) -> Path:
    """The uninterrupted run (in this process, one thread); returns its run folder."""
    out = tmp_path_factory.mktemp("reference") / "run"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(["--out", str(out), "--data-dir", str(tree), *FAST])
    finally:
        torch.set_num_threads(before)
    return out


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run vision/train.py's main as the script does; (status, stdout, stderr)."""
    capsys.readouterr()
    rc = run_main(main, list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line(rc: int, err: str, expected_rc: int = 2, *needles: str) -> None:
    assert rc == expected_rc, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, err)


# ------------------------------------------------------------------------- interrupted runs


class Run:
    """vision/train.py as a subprocess with stdout and stderr in files (polled, never piped)."""

    def __init__(self, log_dir: Path, name: str, args: list[str]) -> None:
        self.stdout, self.stderr = log_dir / f"{name}.out", log_dir / f"{name}.err"
        env = os.environ | {
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
        with self.stdout.open("w") as out, self.stderr.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "vision/train.py", *args],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=err,
            )
        self.pid = self.proc.pid

    def text(self) -> str:
        return self.stdout.read_text() + self.stderr.read_text()

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait_until(self, cond: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while not cond():
            if self.poll() is not None:
                raise AssertionError(
                    f"run ended (status {self.poll()}) before {what}:\n{self.text()[-2000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {DEADLINE_S} s:\n{self.text()[-2000:]}")
            time.sleep(0.01)

    def wait_for_line(self, text: str) -> None:
        self.wait_until(lambda: text in self.stdout.read_text(), f"{text!r} on stdout")

    def stop(self, sig: int) -> int:
        os.kill(self.pid, sig)
        return self.wait()

    def wait(self) -> int:
        """Exit status as subprocess gives it (-N: killed by signal N); kills it after the
        deadline."""
        deadline = time.monotonic() + DEADLINE_S
        while (status := self.poll()) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if status is None:
            self.kill()
            raise AssertionError(f"run did not end within {DEADLINE_S} s:\n{self.text()[-2000:]}")
        return status

    def kill(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            while self.poll() is None:
                time.sleep(0.01)


class ForkedRun(Run):
    """The same entry point, ``run_main(main, args)``, in a fork of this process.

    A real process that signals stop at any moment, without paying ~5 s of CPU for importing
    torch and torchvision again. ``slow_fsync`` stands in for a slow disk: every checkpoint write
    stalls after writing the temporary file and before renaming it.
    """

    def __init__(self, log_dir: Path, name: str, args: list[str], slow_fsync: bool = False):
        self.stdout, self.stderr = log_dir / f"{name}.out", log_dir / f"{name}.err"
        self.status: int | None = None
        self.stdout.write_text("")
        self.stderr.write_text("")
        self.pid = os.fork()
        if self.pid == 0:  # the child never returns into pytest
            rc = 70
            try:
                for fd, path in ((1, self.stdout), (2, self.stderr)):
                    os.dup2(os.open(path, os.O_WRONLY), fd)
                sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
                sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
                if slow_fsync:
                    os.fsync = lambda fd: time.sleep(600)
                rc = run_main(main, args)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(rc)

    def poll(self) -> int | None:
        if self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
        return self.status


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_killed_and_resumed_run_matches_uninterrupted_run(tmp_path, tree, reference):
    out = tmp_path / "run"
    ckpt = out / "checkpoint.pt"
    args = ["--out", str(out), "--data-dir", str(tree), *FAST]
    resume = [*args, "--resume", str(ckpt)]
    runs: list[Run] = []

    def start(name: str, argv: list[str], slow_fsync: bool = False) -> Run:
        runs.append(ForkedRun(tmp_path, name, argv, slow_fsync))
        return runs[-1]

    try:
        # 1. SIGTERM to the script as training starts: a checkpoint of the position inside
        # epoch 1, status 143
        runs.append(run := Run(tmp_path, "1_sigterm", args))
        run.wait_for_line("optimizer groups")
        assert run.stop(signal.SIGTERM) == 143, run.text()
        err = run.stderr.read_text().strip().splitlines()
        assert len(err) == 1 and err[0].startswith("interrupted: signal 15"), err
        state = load_checkpoint(ckpt)
        assert state["epoch"] == 0 and state["batch_in_epoch"] >= 1

        # 2. SIGKILL at a random moment after resuming: the last complete checkpoint stays
        run = start("2_sigkill_random", resume)
        run.wait_for_line("resumed from")
        delay = random.Random(os.getpid()).uniform(0.0, 0.2)
        time.sleep(delay)
        assert run.stop(signal.SIGKILL) == -signal.SIGKILL, f"delay {delay:.3f} s"
        load_checkpoint(ckpt)

        # 3. SIGKILL inside a checkpoint write (temporary file created, not yet renamed)
        before, old_tmp = sha256(ckpt), set(out.glob(".checkpoint.pt.tmp-*"))
        run = start("3_sigkill_in_write", resume, slow_fsync=True)
        run.wait_until(lambda: set(out.glob(".checkpoint.pt.tmp-*")) - old_tmp, "checkpoint write")
        assert run.stop(signal.SIGKILL) == -signal.SIGKILL
        assert sha256(ckpt) == before  # untouched, and still loads
        load_checkpoint(ckpt)

        # 4. SIGTERM right after an epoch's checkpoint replaced the old one: stops mid-epoch
        inode = ckpt.stat().st_ino
        run = start("4_sigterm_after_epoch", resume)
        run.wait_until(lambda: ckpt.stat().st_ino != inode, "a new checkpoint")
        assert run.stop(signal.SIGTERM) == 143, run.text()
        state = load_checkpoint(ckpt)
        assert 1 <= state["epoch"] < 3 and state["batch_in_epoch"] >= 1

        # 5. resume to the end
        run = start("5_finish", resume)
        assert run.wait() == 0, run.text()
    finally:
        for r in runs:
            r.kill()

    final = load_checkpoint(ckpt)["model"]
    expected = load_checkpoint(reference / "checkpoint.pt")["model"]
    assert final.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(final[name], tensor), name
    assert (out / "metrics.csv").read_text() == (reference / "metrics.csv").read_text()
    assert (out / "summary.json").is_file()


# ------------------------------------------------------------------------- hostile files


class Payload:
    """Unpickling this calls open(marker, "w"): proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_checkpoint_is_refused_without_running(tmp_path, capsys, tree):
    marker = tmp_path / "payload_ran"
    evil = tmp_path / "evil.pt"
    torch.save({"model": Payload(marker), "epoch": 0}, evil)
    base = ["--out", str(tmp_path / "run"), "--data-dir", str(tree), *FAST]
    for extra in ([], ["--test-only"]):
        rc, _, err = cli(capsys, *base, "--resume", str(evil), *extra)
        assert_one_line(rc, err, 2, str(evil), "cannot be loaded safely")
        assert not marker.exists()
    torch.load(evil, weights_only=False)  # the payload is live: an unsafe load runs it
    assert marker.exists()


def test_yaml_python_tag_is_refused(tmp_path, capsys):
    marker = tmp_path / "payload_ran"
    config = tmp_path / "evil.yaml"
    config.write_text(f"out: !!python/object/apply:builtins.open ['{marker}', 'w']\n")
    rc, _, err = cli(capsys, "--config", str(config), "--out", str(tmp_path / "run"))
    assert_one_line(rc, err, 2, str(config), "not valid YAML")
    assert not marker.exists()


def _unsafe_loads(tree: ast.AST) -> list[str]:
    """Calls that can unpickle or construct arbitrary objects."""
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
        call = f"{owner}.{node.func.attr}"
        kw = {k.arg: k.value for k in node.keywords}
        safe_torch = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value
        pickles_np = isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value
        if (
            (call == "torch.load" and not safe_torch)
            or call
            in (
                "yaml.load",
                "yaml.unsafe_load",
                "yaml.full_load",
                "pickle.load",
                "pickle.loads",
                "torch.jit.load",
            )
            or (call == "np.load" and pickles_np)
        ):
            found.append(f"{call} at line {node.lineno}")
    return found


def test_every_load_in_the_code_is_safe():
    files = [p for d in ("strlowrank", "vision", "speech") for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 10
    bad = {
        str(p.relative_to(ROOT)): hits
        for p in files
        if (hits := _unsafe_loads(ast.parse(p.read_text())))
    }
    assert not bad, bad
    assert _unsafe_loads(ast.parse("torch.load(p)\nyaml.load(t)\nnp.load(p, allow_pickle=True)"))


# ------------------------------------------------------------------------- output folder


def test_unwritable_output_folder(tmp_path, capsys, tree):
    # tests run as root, where chmod does not stop writes: a path below a regular file cannot be
    # created by anyone
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    target = blocker / "run"
    rc, _, err = cli(capsys, "--out", str(target), "--data-dir", str(tree), *FAST)
    assert_one_line(rc, err, 2, f"cannot write the run folder {target}")
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        rc, _, err = cli(capsys, "--out", str(locked / "run"), "--data-dir", str(tree), *FAST)
        assert_one_line(rc, err, 2, "cannot write the run folder", "Permission denied")


def _fail_second_fsync(monkeypatch) -> None:
    """The disk fills up during the second checkpoint write (end of epoch 2); other files'
    fsyncs (metrics.csv, ...) pass."""
    real, calls = os.fsync, []

    def fsync(fd: int) -> None:
        if ".checkpoint.pt.tmp-" in os.readlink(f"/proc/self/fd/{fd}"):
            calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_full_disk_keeps_last_checkpoint(tmp_path, capsys, tree, monkeypatch):
    out = tmp_path / "run"
    _fail_second_fsync(monkeypatch)
    rc, _, err = cli(capsys, "--out", str(out), "--data-dir", str(tree), *FAST)
    assert_one_line(rc, err, 2, "No space left on device")
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1  # epoch 1's, intact
    assert not list(out.glob(".checkpoint.pt.*"))  # the partial file was removed


def test_full_disk_error_names_the_checkpoint(tmp_path, capsys, tree, monkeypatch):
    out = tmp_path / "run"
    _fail_second_fsync(monkeypatch)
    rc, _, err = cli(capsys, "--out", str(out), "--data-dir", str(tree), *FAST)
    assert_one_line(rc, err, 2, str(out / "checkpoint.pt"))


# ------------------------------------------------------------------------- bad inputs


def test_bad_image_files(tmp_path, capsys):
    root = write_tree(tmp_path / "tree")
    good = (root / "train" / "class0" / "0.png").read_bytes()
    (root / "train" / "class0" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "train" / "class2" / "empty.png").write_bytes(b"")
    bad = (
        str(root / "train" / "class0" / "truncated.png"),
        str(root / "train" / "class2" / "empty.png"),
    )
    base = ["--out", str(tmp_path / "run"), "--data-dir", str(root), *FAST, "--epochs", "1"]
    for workers in (0, 1):  # a worker re-raises with the worker's traceback in the message
        rc, _, err = cli(capsys, *base, f"--train.workers={workers}")
        assert_one_line(rc, err, 2, "cannot read image")
        assert any(path in err for path in bad), err
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable images under .*train"):
        rc, out, err = cli(capsys, *base, "--data.skip_bad_images=true")
    assert rc == 0, err
    assert "epoch 1/1" in out  # grayscale and RGBA files trained along


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda r: (r / "train" / "empty").mkdir(), "empty holds no image files"),
        (lambda r: (r / "val" / "class2").rename(r / "val" / "class9"), "class folders differ"),
        (lambda r: shutil.rmtree(r / "val"), "missing split folder"),
    ],
)
def test_bad_image_trees(tmp_path, capsys, damage, message):
    root = write_tree(tmp_path / "tree")
    damage(root)
    rc, _, err = cli(capsys, "--out", str(tmp_path / "run"), "--data-dir", str(root), *FAST)
    assert_one_line(rc, err, 2, message)


def test_checkpoint_of_another_model_shape_or_format(tmp_path, capsys, reference):
    ckpt = str(reference / "checkpoint.pt")
    two_classes = write_tree(tmp_path / "tree2", classes=2)
    base = ["--out", str(tmp_path / "run"), "--data-dir", str(two_classes), *FAST]
    rc, _, err = cli(capsys, *base, "--resume", ckpt)
    assert_one_line(rc, err, 2, ckpt, "another model", "shape (3")  # 3 classes, not 2
    rc, _, err = cli(capsys, *base, "--resume", ckpt, "--model.name=mobilenet_v1_small")
    assert_one_line(rc, err, 2, ckpt, "another model")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((reference / "checkpoint.pt").read_bytes()[:100_000])
    rc, _, err = cli(capsys, *base, "--resume", str(truncated))
    assert_one_line(rc, err, 2, str(truncated), "cannot be loaded safely")
    foreign = tmp_path / "weights.pt"
    torch.save(torch.zeros(3), foreign)
    rc, _, err = cli(capsys, *base, "--resume", str(foreign))
    assert_one_line(rc, err, 2, str(foreign), "not a strlowrank checkpoint")


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--train.weight_decay=-0.1"], "train.weight_decay: must be >= 0.0"),
        (["--train.threshold_decay=-1"], "train.threshold_decay: must be >= 0.0"),
        (["--target-sparsity", "-0.5"], "controller.target: must be >= 0.0"),
        (["--train.batch_size=0"], "train.batch_size: must be >= 1"),
        (["--data.image_size=4"], "data.image_size: must be >= 8"),
        (["--train.momentum=fast"], "train.momentum: expected float"),
        (["--method.colour=red"], "unknown config key 'method.colour'"),
    ],
)
def test_bad_config_values(tmp_path, capsys, flags, message):
    rc, _, err = cli(capsys, "--out", str(tmp_path / "run"), *FAST, *flags)
    assert_one_line(rc, err, 2, message)


@pytest.mark.parametrize("flags", [["--target-sparsity", "150"], ["--target-params", "1e12"]])
def test_impossible_budget_targets(tmp_path, capsys, tree, flags):
    rc, _, err = cli(
        capsys,
        "--out",
        str(tmp_path / "run"),
        "--data-dir",
        str(tree),
        *FAST,
        "--epochs",
        "1",
        "--train.batch_size=16",
        *flags,
    )
    assert_one_line(rc, err, 2, "controller.target")


# ------------------------------------------------------------------------- numerical faults


def test_non_finite_loss_from_the_command_line(tmp_path, capsys, tree):
    out = tmp_path / "run"
    rc, _, err = cli(capsys, "--out", str(out), "--data-dir", str(tree), *FAST, "--train.lr=1e12")
    assert_one_line(rc, err, 1, "non-finite loss", "at epoch 1, step ")


def test_dead_layers_are_reported(tmp_path, capsys, tree):
    out = tmp_path / "run"
    rc, stdout, err = cli(
        capsys,
        "--out",
        str(out),
        "--data-dir",
        str(tree),
        *FAST,
        "--epochs",
        "1",
        "--train.batch_size=16",
        "--method.s_init=10",
        "--train.threshold_decay=0",
    )
    assert rc == 0, err
    budget = pd.read_csv(out / "budget.csv").set_index("name").drop("total")
    assert (budget["nnz"] == 0).all() and (budget["sparsity"] == 1.0).all()
    assert f"warning: {len(budget)} layer(s) entirely zero: conv1," in stdout


def test_thresholds_that_remove_every_singular_value_are_dead_layers():
    from strlowrank.method.budget import budget_table, dead_layers
    from strlowrank.method.lowrank import MatrixSpec
    from strlowrank.method.rnn import RNNLayer

    layer = RNNLayer("gru", 4, 3, MatrixSpec("str", s_init=20.0))  # g(s) ~ 1: every sigma cut
    table = budget_table(layer, torch.randn(1, 5, 4))
    assert dead_layers(table) == ["W", "U"]
    assert list(table.set_index("name").loc[["W", "U"], "rank"]) == [0, 0]
    assert (
        dead_layers(
            budget_table(
                RNNLayer("gru", 4, 3, MatrixSpec("str", s_init=-20.0)), torch.randn(1, 5, 4)
            )
        )
        == []
    )


# ------------------------------------------------------------------------- speech track


@pytest.fixture(scope="module")
def speech_tree(tmp_path_factory) -> Path:
    """Speech Commands layout: 4 words x 3 speakers of 1 s int16 noise, one background file,
    split lists (speaker b: validation, speaker c: testing)."""
    from scipy.io import wavfile

    root, rng = tmp_path_factory.mktemp("speech_tree"), np.random.default_rng(0)
    words, speakers = ("yes", "no", "up", "cat"), ("aaaa0001", "bbbb0002", "cccc0003")
    for word in words:
        (root / word).mkdir()
        for spk in speakers:
            noise = rng.normal(0, 3000, 16000).astype(np.int16)
            wavfile.write(root / word / f"{spk}_nohash_0.wav", 16000, noise)
    (root / "_background_noise_").mkdir()
    noise = rng.normal(0, 3000, 48000).astype(np.int16)
    wavfile.write(root / "_background_noise_" / "noise.wav", 16000, noise)
    for name, spk in (("validation", "bbbb0002"), ("testing", "cccc0003")):
        (root / f"{name}_list.txt").write_text("".join(f"{w}/{spk}_nohash_0.wav\n" for w in words))
    return root


@pytest.mark.parametrize(
    "flags,field",
    [
        (["--model.hidden=0"], "model.hidden"),  # today: ZeroDivisionError traceback
        (["--model.layers=0"], "model.layers"),  # today: RuntimeError traceback in the forward
        (["--model.param=lowrank", "--model.rank_w=100"], "model.rank_w"),  # "rank 100 outside"
        (["--target-rank", "1000"], "controller.target"),  # today: accepted, trains full rank
    ],
)
def test_bad_speech_model_sizes(tmp_path, capsys, speech_tree, flags, field):
    capsys.readouterr()
    rc = run_main(
        train_gru.main,
        [
            "--out",
            str(tmp_path / "run"),
            "--data-dir",
            str(speech_tree),
            "--epochs",
            "1",
            "--train.progress=false",
            "--device=cpu",
            "--model.hidden=8",
            *flags,
        ],
    )
    assert_one_line(rc, capsys.readouterr().err, 2, field)

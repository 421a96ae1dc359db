"""Sweep launchers (strlowrank.analysis.launch): --jobs 2 gives the same results.csv as --jobs 1
with the real vision trainer; submitit's local and debug executors write the same run folders as
local processes; a restarted parallel sweep runs only what is missing."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml
from test_report_sweep import _grid

from strlowrank.analysis import launch, sweep
from vision.data import write_toy_tree

# columns that legitimately differ between two sweeps of the same grid: where, and how long
VARIABLE = ("path", "time", "seconds", "throughput")


def comparable(results: Path) -> pd.DataFrame:
    table = pd.read_csv(results)
    return table.drop(columns=[c for c in table if any(v in c for v in VARIABLE)])


def test_jobs_2_equals_jobs_1_with_the_real_trainer(tmp_path: Path) -> None:
    toy = write_toy_tree(tmp_path / "toy", classes=3, train_per_class=8, val_per_class=4, size=12)
    spec = {
        "base": {
            "epochs": 1,
            "data.name": "imagefolder",
            "data.root": str(toy),
            "data.image_size": 12,
            "model.name": "resnet20",
            "train.batch_size": 8,
            "train.device": "cpu",
            "train.progress": False,
            "train.plots": False,
        },
        "grid": {"method.name": ["dense", "str"]},
    }
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(spec))
    tables = []
    for jobs in (1, 2):
        out = tmp_path / f"jobs{jobs}"
        args = [
            "--track",
            "vision",
            "--grid",
            str(grid),
            "--out",
            str(out),
            "--seeds",
            "0",
            "--jobs",
            str(jobs),
            "--threads",
            "1",
        ]
        assert sweep.main(args) == 0, (out / "method.name=dense__seed=0" / "train.log").read_text()
        tables.append(comparable(out / "results.csv"))
    assert list(tables[0]["status"]) == ["ok", "ok"] and "val_acc" in tables[0]
    pd.testing.assert_frame_equal(tables[0], tables[1], check_exact=True)


def run_folders(out: Path) -> dict[str, list[str]]:
    """Run folder -> sorted file names, without the launchers' own logs."""
    folders = [d for d in sorted(out.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    return {d.name: sorted(p.name for p in d.iterdir() if p.name != "train.log") for d in folders}


def test_submitit_executors_write_the_same_run_folders(tmp_path: Path) -> None:
    pytest.importorskip("submitit")
    spec = {"base": {"epochs": 2}, "grid": {"train.threshold_decay": [0.1, 0.2]}}
    grid, command = _grid(tmp_path, spec)
    common = ["--grid", grid, "--command", command, "--seeds", "0", "1"]
    assert sweep.main([*common, "--out", str(tmp_path / "local"), "--jobs", "2"]) == 0
    assert (
        sweep.main(
            [
                *common,
                "--out",
                str(tmp_path / "debug"),
                "--launcher",
                "submitit",
                "--cluster",
                "debug",
            ]
        )
        == 0
    )
    runs = sweep.expand(yaml.safe_load(Path(grid).read_text()), [0, 1])
    cmd = [sys.executable, str(tmp_path / "fake_trainer.py")]
    cluster = launch.ClusterConfig(
        cluster="local", cpus_per_task=1, timeout_min=5, poll_seconds=0.2
    )
    sweep.run_sweep(
        runs, tmp_path / "slurm_like", cmd, spec["base"], progress=False, cluster=cluster
    )
    expected = comparable(tmp_path / "local" / "results.csv")
    assert list(expected["status"]) == ["ok"] * 4
    for name in ("debug", "slurm_like"):
        out = tmp_path / name
        assert run_folders(out) == run_folders(tmp_path / "local"), name
        pd.testing.assert_frame_equal(comparable(out / "results.csv"), expected)
        assert "--epochs 2" in (out / runs[0].name / "train.log").read_text()
    assert list((tmp_path / "slurm_like" / ".submitit").iterdir())  # submitit's own job logs


def test_parallel_restart_runs_only_what_is_missing(tmp_path: Path) -> None:
    spec = {"grid": {"train.threshold_decay": [0.1, 0.2, 0.3]}}
    grid, command = _grid(tmp_path, spec)
    out = tmp_path / "sweep"
    args = ["--grid", grid, "--out", str(out), "--command", command, "--jobs", "3"]
    assert sweep.main(args) == 0
    first = pd.read_csv(out / "results.csv")
    assert list(first["train.threshold_decay"]) == [0.1, 0.2, 0.3]  # grid order, not finish order
    (out / first["run"][2] / "summary.json").unlink()
    assert sweep.main(args) == 0
    calls = (out / "calls.txt").read_text().split()
    assert len(calls) == 4 and calls[-1] == first["run"][2]
    assert list(pd.read_csv(out / "results.csv")["status"]) == ["done", "done", "ok"]


def test_threads_and_torchrun_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(launch, "available_cpus", lambda: 16)
    assert [launch.threads_per_run(j) for j in (1, 3, 16, 32)] == [16, 5, 1, 1]
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert launch.threads_per_run(2) == 4
    line = launch.torchrun_line(["python", "vision/train.py", "--epochs", "1"], 8)
    assert line == [
        "python",
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=8",
        "--standalone",
        "vision/train.py",
        "--epochs",
        "1",
    ]
    multi = launch.torchrun_line(["python", "t.py"], 4, nodes=2, node_rank=1, master="n0")
    assert multi[4:7] == ["--nnodes=2", "--node_rank=1", "--master_addr=n0"]
    with pytest.raises(ValueError, match="cluster"):
        launch.ClusterConfig(cluster="pbs")


class _Threads:
    """A stand-in for a submitit executor: every job starts at once in its own thread."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=4)

    def update_parameters(self, **kwargs) -> None:
        pass

    def submit(self, fn):
        future = self.pool.submit(fn)
        return SimpleNamespace(done=future.done, result=future.result, job_id="t")


@pytest.mark.parametrize("ordered", [True, False])
def test_a_run_starts_after_the_run_it_starts_from(
    tmp_path: Path, ordered: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With two slots (and with jobs that all start at once), a launch whose ``after`` names
    another starts once that one has finished (it reads the file the other writes last);
    without ``after`` both start at once and it fails. The sweep fills ``after`` from the
    ``{sweep}/<run>/`` references."""
    first, second = tmp_path / "a", tmp_path / "b"
    write = f"import time, pathlib; time.sleep(1.5); pathlib.Path({str(first / 'x')!r}).touch()"
    read = f"import pathlib, sys; sys.exit(0 if pathlib.Path({str(first / 'x')!r}).exists() else 3)"
    launches = [
        launch.Launch("a", [sys.executable, "-c", write], first),
        launch.Launch("b", [sys.executable, "-c", read], second, ("a",) if ordered else ()),
    ]
    status = dict(launch.run_local(launches, jobs=2, threads=1))
    assert status == {"a": 0, "b": 0 if ordered else 3}
    (first / "x").unlink()
    monkeypatch.setattr(launch, "executor", lambda folder, cfg: _Threads())
    cluster = launch.ClusterConfig(poll_seconds=0.05)
    assert dict(launch.run_submitit(launches, tmp_path / "jobs", cluster)) == status
    runs = sweep.expand(
        {
            "runs": [
                {"method.name": "dense"},
                {"model.init_from": "{sweep}/name=dense__seed={seed}/c.pt"},
            ]
        },
        seeds=[4],
    )
    assert sweep._references(runs[1]) == ("name=dense__seed=4",) and not sweep._references(runs[0])

"""The report CLI on mixed vision and speech fake runs; the sweep with a fake trainer command."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_analysis import write_run

from strlowrank.analysis import report, sweep, tracks

FAKE_TRAINER = """
import json, sys
from pathlib import Path
args = sys.argv[1:]
pairs = dict(zip(args[0::2], args[1::2]))
out = Path(pairs.pop("--out"))
out.mkdir(parents=True, exist_ok=True)
with open(out.parent / "calls.txt", "a") as f:
    f.write(out.name + "\\n")
if pairs.get("--fail") == "true":
    sys.exit(3)
lam = float(pairs.get("--train.threshold_decay", 0))
summary = {"epochs": int(pairs.get("--epochs", 1)), "val_acc": 0.9 - lam, "sparsity": lam,
           "track": "speech", "method": pairs.get("--model.param", "str"), "ranks": {"W": 4}}
(out / "summary.json").write_text(json.dumps(summary))
print("trained", pairs)
"""


@pytest.fixture()
def mixed_runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    write_run(root / "v_str", method="str", sparsity=0.6, acc=0.8)
    write_run(root / "v_gmp", method="gmp", sparsity=0.6, acc=0.78)
    write_run(root / "s_str", "speech", "str", acc=0.86, ranks={"rnn.0.W": 10, "rnn.0.U": 14})
    return root


def test_report_writes_applicable_figures_and_table(mixed_runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert report.main([str(mixed_runs / "v_str"), str(mixed_runs), "--out", str(out)]) == 0
    top = {p.name for p in out.glob("*.png")}
    assert top == {
        "vision_budget.png",
        "vision_training.png",
        "vision_sparsity_accuracy.png",
        "vision_macs_accuracy.png",
        "speech_budget.png",
        "speech_training.png",
        "speech_rank_accuracy.png",
    }
    assert not list((out / "runs" / "v_str").glob("spectra.png"))  # no spectra for vision
    assert (out / "runs" / "s_str" / "spectra.png").is_file()
    assert (out / "runs" / "s_str" / "ranks.png").is_file()
    table = (out / "summary.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 3  # header + one row per run (v_str given twice, loaded once)
    assert "| s_str | speech | str |" in table and "10/14" in table and "86.00" in table
    assert len(pd.read_csv(out / "runs.csv")) == 3
    assert str(out.resolve()) in capsys.readouterr().out


def test_report_only_vision_and_errors(mixed_runs, tmp_path, capsys):
    out = tmp_path / "report"
    runs = [str(mixed_runs / "v_str"), str(mixed_runs / "v_gmp")]
    assert report.main([*runs, "--out", str(out), "--no-per-run"]) == 0
    assert not any("speech" in p.name for p in out.glob("*.png")) and not (out / "runs").exists()
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty"), "--out", str(out)]) == 2
    assert report.main([str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "error" in capsys.readouterr().err


def test_expand_grid_runs_and_seeds():
    spec = {
        "base": {"epochs": 2},
        "runs": [{"model.param": "full"}, {"model.param": "str"}],
        "grid": {"train.threshold_decay": [1e-4, 3e-4], "train.lr": [0.1]},
    }
    runs = sweep.expand(spec, seeds=[0, 1])
    assert len(runs) == 2 * 2 * 1 * 2
    assert runs[0].overrides == {
        "model.param": "full",
        "train.threshold_decay": 1e-4,
        "train.lr": 0.1,
        "seed": 0,
    }
    assert runs[0].name == "param=full__threshold_decay=0.0001__lr=0.1__seed=0"
    assert len({r.name for r in runs}) == len(runs)
    assert [r.name for r in sweep.expand(spec, [0, 1])] == [r.name for r in runs]  # stable
    assert sweep.expand({}, None)[0].name == "base"
    # same leaf in two sections keeps the full key; odd characters become '-'
    assert sweep.run_name({"a.x": 1, "b.x": "p q/r"}) == "a.x=1__b.x=p-q-r"
    path = {"budget": "/tmp/sweeps/str_0.9/budget.csv"}  # a path keeps its last two parts
    assert sweep.run_name(path) == "budget=str_0.9-budget.csv"
    assert len(sweep.run_name({f"k{i}": "v" * 20 for i in range(10)})) <= sweep.MAX_NAME
    assert sweep.format_value([1, 2]) == "[1, 2]" and sweep.format_value(True) == "true"
    with pytest.raises(ValueError, match="identical"):
        sweep.expand({"runs": [{"a": 1}, {"a": 1}]})


def _grid(tmp_path: Path, spec: dict) -> tuple[str, str]:
    trainer = tmp_path / "fake_trainer.py"
    trainer.write_text(textwrap.dedent(FAKE_TRAINER))
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(spec))
    return str(grid), f"{sys.executable} {trainer}"


def test_sweep_runs_skips_finished_and_writes_results(tmp_path, capsys):
    spec = {"base": {"epochs": 2}, "grid": {"train.threshold_decay": [0.1, 0.2]}}
    grid, command = _grid(tmp_path, spec)
    out = tmp_path / "sweep"
    args = ["--grid", grid, "--out", str(out), "--command", command, "--seeds", "0", "1"]
    assert sweep.main(args) == 0
    results = pd.read_csv(out / "results.csv")
    assert len(results) == 4 and set(results["status"]) == {"ok"}
    assert sorted(results["train.threshold_decay"]) == [0.1, 0.1, 0.2, 0.2]
    assert set(results["seed"]) == {0, 1} and set(results["epochs"]) == {2}
    assert results["val_acc"].round(3).tolist() == [0.8, 0.8, 0.7, 0.7]
    assert "ranks.W" in results and (out / "sweep.yaml").is_file()
    assert "--epochs 2" in (out / results["run"][0] / "train.log").read_text()
    # restart: finished runs are skipped, a deleted one is run again
    (out / results["run"][1] / "summary.json").unlink()
    assert sweep.main(args) == 0
    calls = (out / "calls.txt").read_text().split()
    assert len(calls) == 5 and calls[-1] == results["run"][1]
    assert sorted(pd.read_csv(out / "results.csv")["status"]) == ["done", "done", "done", "ok"]
    assert "3 skipped" in capsys.readouterr().out


def test_sweep_only_runs_part_of_the_grid_and_lists_all(tmp_path, capsys):
    spec = {"grid": {"train.threshold_decay": [0.1, 0.2, 0.3]}}
    grid, command = _grid(tmp_path, spec)
    out = tmp_path / "sweep"
    args = ["--grid", grid, "--out", str(out), "--command", command, "--seeds", "0", "1"]
    assert sweep.main(args + ["--only", "decay=0.1__", "--only", "0.3__seed=1"]) == 0
    status = pd.read_csv(out / "results.csv").set_index("run")["status"]
    assert len(status) == 6 and (status == "ok").sum() == 3
    assert status["threshold_decay=0.2__seed=0"] == "not selected"
    assert status["threshold_decay=0.3__seed=1"] == "ok"
    assert "3 not selected (--only)" in capsys.readouterr().out
    assert sweep.main(args + ["--only", "decay=0.2"]) == 0  # the second part, same folder
    status = pd.read_csv(out / "results.csv").set_index("run")["status"]
    assert sorted(status) == ["done"] * 3 + ["not selected"] + ["ok"] * 2
    assert len((out / "calls.txt").read_text().split()) == 5
    assert sweep.main(args + ["--only", "("]) == 2  # a bad pattern is a one-line error
    assert "error: --only '(': not a regular expression" in capsys.readouterr().err


def test_sweep_failure_dry_run_and_bad_grid(tmp_path, capsys):
    spec = {"runs": [{"fail": True}, {"fail": False}]}
    grid, command = _grid(tmp_path, spec)
    out = tmp_path / "sweep"
    assert sweep.main(["--grid", grid, "--out", str(out), "--command", command, "--dry-run"]) == 0
    assert not out.exists() and "--fail true" in capsys.readouterr().out
    assert sweep.main(["--grid", grid, "--out", str(out), "--command", command]) == 1
    status = pd.read_csv(out / "results.csv").set_index("run")["status"]
    assert status["fail=true"] == "failed (3)" and status["fail=false"] == "ok"
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({"grid": {"a": 1}}))
    assert sweep.main(["--grid", str(bad), "--out", str(out), "--track", "speech"]) == 2
    assert "grid.a" in capsys.readouterr().err
    bad.write_text("runs: [{model.param: full\n")  # unclosed: one line naming file and line
    assert sweep.main(["--grid", str(bad), "--out", str(out), "--track", "speech"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {bad}: not valid YAML at line 2") and "\n" not in err
    missing = tmp_path / "missing.yaml"
    assert sweep.main(["--grid", str(missing), "--out", str(out), "--track", "speech"]) == 2
    assert f"{missing}: cannot read the grid file" in capsys.readouterr().err
    assert sweep.default_command("vision")[-1].endswith("vision/train.py")
    assert sweep.main(["--grid", grid, "--out", str(out), "--track", "no_such_track"]) == 2
    assert "unknown track 'no_such_track'" in capsys.readouterr().err


def test_tracks_are_reached_through_their_modules():
    """strlowrank.analysis.tracks: a track's entry point is its package's ENTRY_POINT, else
    <track>.train (found, not run); its report part is <track>.report; neither is written in the
    core."""
    import speech
    import speech.report

    assert tracks.entry_script("speech") == Path(speech.__file__).parent / "train_gru.py"
    assert tracks.entry_script("vision").name == "train.py"
    assert tracks.report_part("speech") is speech.report
    assert tracks.report_part("vision") is None and tracks.report_part("") is None
    assert tracks.track_module("no_such_track", "report") is None
    for bad in ("no_such_track", "json", "../speech", ""):
        with pytest.raises(ValueError, match="track"):
            tracks.entry_script(bad)


def test_sweep_placeholders_references_and_points(tmp_path):
    ref = "{sweep}/tag=full__seed={seed}/checkpoint.pt"
    spec = {"runs": [{"tag": "full"}, {"tag": "svd", "model.init_from": ref}]}
    grid, command = _grid(tmp_path, spec)
    out = tmp_path / "sweep"
    assert (
        sweep.main(["--grid", grid, "--out", str(out), "--command", command, "--seeds", "0", "1"])
        == 0
    )
    results = pd.read_csv(out / "results.csv")
    assert list(results["point"]) == ["tag=full"] * 2 + [results["point"][2]] * 2
    log = (out / results["run"][3] / "train.log").read_text()
    assert f"--model.init_from {out}/tag=full__seed=1/checkpoint.pt" in log  # seed 1's own run
    points = pd.read_csv(out / "points.csv")
    assert list(points["n"]) == [2, 2] and list(points["mean"].round(3)) == [0.9, 0.9]
    with pytest.raises(ValueError, match="not an earlier run"):
        sweep.expand({"runs": [spec["runs"][1], spec["runs"][0]]}, seeds=[0])
    with pytest.raises(ValueError, match="needs a seed"):
        sweep.command_line(["x"], out / "r", {"model.init_from": ref})

"""speech/train_gru.py end to end on a tiny tree: run folder, ranks, spectra, export, resume."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_speech_data import make_tree

from speech.config import SpeechConfig
from speech.frontier import frontier_gaps, frontier_points
from speech.models import build_model
from speech.train_gru import main
from strlowrank.training.checkpoint import load_checkpoint
from strlowrank.training.config import load_config, to_dict

FAST = [
    "--epochs",
    "1",
    "--train.progress=false",
    "--train.plots=false",  # plots cost about 2 s a run; the tests that check them turn them on
    "--model.hidden=16",
    "--device=cpu",
    "--data.silence_fraction=0.5",
]


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("sc") / "tree")


@pytest.mark.parametrize("param", ["str", "lowrank", "full"])
def test_one_epoch_run_folder(tmp_path, tiny_tree, param):
    out = tmp_path / param
    main(
        [
            "--out",
            str(out),
            "--data-dir",
            str(tiny_tree),
            *FAST,
            f"--model.param={param}",
            "--model.rank_w=4",
            "--model.rank_u=4",
            "--train.plots=true",
        ]
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["track"] == "speech" and summary["method"] == param
    assert {"test_acc", "val_acc", "params", "ranks"} <= set(summary)
    budget = pd.read_csv(out / "budget.csv").set_index("name")
    assert budget.loc["rnns.0.U", "full_rank"] == 16
    assert summary["ranks"]["rnns.0.U"] == budget.loc["rnns.0.U", "rank"]
    if param == "lowrank":
        assert summary["ranks"] == {"rnns.0.W": 4, "rnns.0.U": 4}
        assert summary["params"] == 4 * (48 + 32) + 4 * (48 + 16)
    spectra = pd.read_csv(out / "spectra.csv")
    assert set(spectra["stage"]) == {"init", "final"} and set(spectra["matrix"]) == {"W", "U"}
    assert (out / "plots" / "spectra.png").is_file()


def test_checkpoint_exports_to_equal_compact_model(tmp_path, tiny_tree):
    out = tmp_path / "str"
    main(["--out", str(out), "--data-dir", str(tiny_tree), *FAST])
    state = load_checkpoint(out / "checkpoint.pt")
    cfg = load_config(SpeechConfig, out / "config.yaml")
    assert state["config"] == to_dict(cfg)
    model = build_model(cfg.model, 32, 12)
    model.load_state_dict(state["model"])
    model.eval()
    compact = model.export()
    x = torch.randn(3, 99, 32)
    with torch.no_grad():
        torch.testing.assert_close(compact(x), model(x), rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in compact.rnns.parameters()) <= sum(
        p.numel() for p in model.rnns.parameters()
    )


def test_resume_and_test_only(tmp_path, tiny_tree):
    out = tmp_path / "run"
    args = ["--out", str(out), "--data-dir", str(tiny_tree), *FAST]
    main(args)
    trained = main([*args, "--epochs", "2", "--resume", str(out / "checkpoint.pt")])
    assert list(pd.read_csv(out / "metrics.csv")["epoch"]) == [1, 2]
    tested = main([*args, "--resume", str(out / "checkpoint.pt"), "--test-only"])
    # the checkpoint evaluates to the accuracies at the end of training, to the digit
    for key in ("test_acc", "test_loss", "val_acc"):
        assert tested[key] == trained[key], key
    assert json.loads((out / "summary.json").read_text())["test_acc"] == trained["test_acc"]


def test_target_params_lands_within_five_percent(tmp_path, tiny_tree):
    out = tmp_path / "target"
    main(
        [
            "--out",
            str(out),
            "--data-dir",
            str(tiny_tree),
            *FAST,
            "--epochs",
            "2",
            "--target-params",
            "1200",
            "--train.plots=true",
        ]
    )
    budget = pd.read_csv(out / "budget.csv").set_index("name")
    assert budget.loc["total", "numel"] > 2 * 1200  # the request is well below the model
    assert abs(budget.loc["total", "nnz"] - 1200) / 1200 < 0.05
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics["target_params"].iloc[-1] == pytest.approx(1200)
    assert metrics["achieved_params"].iloc[-1] == pytest.approx(budget.loc["total", "nnz"])
    assert (out / "plots" / "controller.png").is_file()


def test_a_target_run_starts_from_the_controller_decay_not_the_default(tmp_path, tiny_tree):
    """With a target the controller steers the decay on s from controller.decay_init, so the
    untargeted default (train.threshold_decay) does not change a targeted run; without a
    target it does."""

    def metrics(name, *extra):
        out = tmp_path / name
        main(["--out", str(out), "--data-dir", str(tiny_tree), *FAST, "--epochs", "2", *extra])
        return pd.read_csv(out / "metrics.csv")

    target = ["--target-params", "1200"]
    a = metrics("a", *target)
    b = metrics("b", *target, "--train.threshold_decay", "0.05")
    pd.testing.assert_frame_equal(a, b)
    plain = metrics("plain")
    other = metrics("other", "--train.threshold_decay", "0.05")
    assert not plain.equals(other)


def test_per_gate_two_layer_lstm_reports_every_rank(tmp_path, tiny_tree):
    out = tmp_path / "lstm"
    main(
        [
            "--out",
            str(out),
            "--data-dir",
            str(tiny_tree),
            *FAST,
            "--model.cell=lstm",
            "--model.layers=2",
            "--model.split=per_gate",
            "--train.plots=true",
        ]
    )
    names = [f"rnns.{layer}.{side}_{gate}" for layer in (0, 1) for side in "WU" for gate in "ifgo"]
    budget = pd.read_csv(out / "budget.csv")
    assert list(budget["name"][budget["rank"].notna()]) == names
    assert list(json.loads((out / "summary.json").read_text())["ranks"]) == names
    spectra = pd.read_csv(out / "spectra.csv")
    assert len(spectra.drop_duplicates(["layer", "matrix"])) == 16
    history = pd.read_csv(out / "budget_history.csv")
    assert set(names) <= set(history["name"])
    assert {"ranks.png", "spectra.png"} <= {p.name for p in (out / "plots").glob("*.png")}


FRONTIER_GRID = """
base: {epochs: 1, train.progress: false, train.plots: false, model.hidden: 16, device: cpu,
       data.silence_fraction: 0.5, data.root: TREE}
runs:
  - {tag: full, model.param: full}
  - {tag: b1, model.param: str, controller.metric: params, controller.target: 992}
  - {tag: b2, model.param: str, controller.metric: params, controller.target: 1592}
  - {tag: b1, model.param: lowrank, model.rank_w: 3, model.rank_u: 8}
  - {tag: b1, model.param: lowrank, model.rank_w: 5, model.rank_u: 6}
  - {tag: b2, model.param: lowrank, model.rank_w: 9, model.rank_u: 10}
  - {tag: b1, model.param: lowrank, model.rank_w: 5, model.rank_u: 6,
     model.init_from: "{sweep}/tag=full__param=full__seed={seed}/checkpoint.pt"}
  - {tag: b2, model.param: str, controller.metric: params, controller.target: 1592,
     model.init_from: "{sweep}/tag=full__param=full__seed={seed}/checkpoint.pt"}
"""


def test_reduced_frontier_protocol(tmp_path, tiny_tree, monkeypatch):
    """The frontier sweep end to end (1 seed, 2 budgets, 1 epoch): stage 1 full rank, SVD
    baselines from its checkpoint, points.csv, the report's frontier table. Trainer calls run
    in this process (same command line) to keep the test fast."""
    import subprocess

    from strlowrank.analysis import launch, report, sweep

    def in_process(line, **kwargs):
        assert line[1].endswith("speech/train_gru.py")
        main(line[2:])
        return subprocess.CompletedProcess(line, 0)

    monkeypatch.setattr(launch.subprocess, "run", in_process)
    grid = tmp_path / "frontier.yaml"
    grid.write_text(FRONTIER_GRID.replace("TREE", str(tiny_tree)))
    out = tmp_path / "sweep"
    assert (
        sweep.main(["--track", "speech", "--grid", str(grid), "--out", str(out), "--seeds", "0"])
        == 0
    )
    results = pd.read_csv(out / "results.csv")
    assert len(results) == 8 and set(results["status"]) == {"ok"}
    full_ckpt = str(out / "tag=full__param=full__seed=0" / "checkpoint.pt")
    assert (results["init_from"] == full_ckpt).sum() == 2
    assert len(pd.read_csv(out / "points.csv")) == 8
    frontier = frontier_points(results).set_index(["method", "budget"])
    assert sorted(frontier.index) == [
        ("full", "full"),
        ("lowrank", "b1"),
        ("lowrank", "b2"),
        ("str", "b1"),
        ("str", "b2"),
        ("svd-lowrank", "b1"),
        ("svd-str", "b2"),
    ]
    assert frontier.loc[("lowrank", "b1"), "split"] in ("3/8", "5/6")
    assert frontier.loc[("lowrank", "b1"), "splits"].count(":") == 2  # both splits reported
    assert frontier.loc[("svd-lowrank", "b1"), "params"] == 5 * (48 + 32) + 6 * (48 + 16)
    assert frontier.loc[("str", "b2"), "params"] < frontier.loc[("full", "full"), "params"]
    assert report.main([str(out), "--out", str(tmp_path / "report"), "--no-per-run"]) == 0
    table = (tmp_path / "report" / "frontier.md").read_text()
    assert (
        "| svd-str | stacked | b2 |" in table
        and (tmp_path / "report" / "speech_frontier.png").is_file()
    )
    gaps = pd.read_csv(tmp_path / "report" / "frontier_gaps.csv").set_index(["method", "budget"])
    assert ("str", "b1") in gaps.index and "minus the chosen fixed split" in table


def test_reduced_equal_compute_protocol(tmp_path, tiny_tree, monkeypatch):
    """configs/sweep_speech_equal_compute.yaml reduced (1 seed, the GRU's first 2 budgets,
    hidden 16, 2 + 2 or 2 + 1 + 1 epochs against 4): every method is labelled apart (STR stacked
    and per gate, the truncated SVD, energy, greedy, STR from the SVD with the cost unit, STR then
    fine-tuned at its learned ranks), every method is charged the same compute, and the gaps
    pair each with the truncated SVD."""
    import subprocess

    import yaml

    from strlowrank.analysis import launch, sweep

    def in_process(line, **kwargs):
        main(line[2:])
        return subprocess.CompletedProcess(line, 0)

    monkeypatch.setattr(launch.subprocess, "run", in_process)
    grid = yaml.safe_load(open("configs/sweep_speech_equal_compute.yaml"))
    targets, rank_w, rank_u = {6536: 992, 11536: 1592}, {6: 5, 7: 9}, {5: 6, 14: 10}
    runs = []
    for run in grid["runs"]:
        if run["tag"] not in ("full", "b05k", "b10k"):
            continue
        if "epochs" in run:  # the full-rank source trains the base's 2: everything costs 4
            run = dict(run, epochs={30: 4, 10: 2, 5: 1}[run["epochs"]])
        if "model.fixed_epochs" in run:
            run["model.fixed_epochs"] = 1
        if "controller.target" in run:
            run["controller.target"] = targets[run["controller.target"]]
        if "model.rank_w" in run:
            run["model.rank_w"] = rank_w[run["model.rank_w"]]
            run["model.rank_u"] = rank_u[run["model.rank_u"]]
        for old, new in targets.items():  # an STR source's name carries its target
            if "model.init_from" in run:
                run["model.init_from"] = run["model.init_from"].replace(f"={old}_", f"={new}_")
        runs.append(run)
    base = {"epochs": 2, "train.plots": False, "model.hidden": 16, "device": "cpu"}
    base |= {"data.silence_fraction": 0.5, "data.root": str(tiny_tree)}
    path = tmp_path / "equal.yaml"
    path.write_text(yaml.safe_dump({"base": grid["base"] | base, "runs": runs}, sort_keys=False))
    out = tmp_path / "sweep"
    argv = ["--track", "speech", "--grid", str(path), "--out", str(out), "--seeds", "0"]
    assert sweep.main(argv) == 0
    results = pd.read_csv(out / "results.csv")
    assert len(results) == 19 and set(results["status"]) == {"ok"}
    points = frontier_points(results).set_index(["method", "layout", "budget"])
    methods = {(m, lay) for m, lay, b in points.index if b == "b05k"}
    assert methods == {
        ("str", "stacked"),
        ("str", "per_gate"),
        ("svd-lowrank", "stacked"),
        ("svd-energy", "stacked"),
        ("svd-greedy", "stacked"),
        ("svd-str-cost", "stacked"),
        ("str-fixed", "stacked"),
        ("svd-str-fixed", "stacked"),
    }
    costs = points.drop(index="full", level="budget")["cost_epochs"]
    assert set(costs.drop(index=["str"], level="method")) == {4}  # the STR sources cost 2
    fixed = results[results["allocation"] == "learned"]
    assert len(fixed) == 4
    for init_from, params in zip(fixed["init_from"], fixed["params"]):  # learned ranks kept
        source = json.loads((Path(init_from).parent / "summary.json").read_text())
        assert source["method"] == "str" and source["params"] == params
    gaps = frontier_gaps(results, baseline="svd-lowrank")
    assert len(gaps) == 2 * 8 and (gaps["n"] == 1).all()  # STR at 20 and 30 epochs apart
    from strlowrank.analysis import report

    assert report.main([str(out), "--out", str(tmp_path / "report"), "--no-per-run"]) == 0
    table = (tmp_path / "report" / "frontier.md").read_text()
    assert "minus the truncated SVD at its chosen split" in table
    assert "| str-fixed | stacked | b05k | 4 |" in table
    written = pd.read_csv(tmp_path / "report" / "frontier_gaps_svd.csv")
    assert len(written) == len(gaps) + 2  # the report also finds the STR parts in <run>/str


def test_fixed_epochs_is_the_str_run_then_its_ranks_fine_tuned(tmp_path, tiny_tree):
    """--model.fixed_epochs N: one command equals the two runs it stands for (STR, then
    --model.allocation learned from its checkpoint for N epochs), bit for bit; the STR part is
    kept in <out>/str and not run again; another param is refused with one line."""
    common = ["--data-dir", str(tiny_tree), *FAST, "--target-params", "1200"]
    one = main(["--out", str(tmp_path / "one"), *common, "--model.fixed_epochs", "1"])
    main(["--out", str(tmp_path / "a"), *common])
    two = main(
        [
            "--out",
            str(tmp_path / "b"),
            *common,
            "--model.param",
            "lowrank",
            "--model.allocation",
            "learned",
            "--init-from",
            str(tmp_path / "a" / "checkpoint.pt"),
        ]
    )
    keys = ("test_acc", "val_acc", "params", "ranks", "cost_epochs", "method", "allocation")
    assert {k: one[k] for k in keys} == {k: two[k] for k in keys}
    assert one["cost_epochs"] == 2 and one["allocation"] == "learned"
    learned = json.loads((tmp_path / "one" / "str" / "summary.json").read_text())
    assert learned["method"] == "str" and learned["params"] == one["params"]
    stamp = (tmp_path / "one" / "str" / "summary.json").stat().st_mtime_ns
    main(["--out", str(tmp_path / "one"), *common, "--model.fixed_epochs", "1"])
    assert (tmp_path / "one" / "str" / "summary.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="^model.fixed_epochs: needs model.param str"):
        main(
            [
                "--out",
                str(tmp_path / "c"),
                *common[:-2],
                "--model.param",
                "full",
                "--model.fixed_epochs",
                "1",
            ]
        )


def test_auto_param_is_str_or_from_a_trained_model_the_energy_allocation(tmp_path, tiny_tree):
    """model.param auto (the default): STR; with --init-from and --target-params the trained
    model's ranks allocated by energy and fine-tuned; an explicit --model.param str keeps STR
    fine-tuning from the SVD. The resolved choice is what config.yaml and summary.json record."""
    common = ["--data-dir", str(tiny_tree), *FAST]
    assert main(["--out", str(tmp_path / "str"), *common])["method"] == "str"
    main(["--out", str(tmp_path / "full"), *common, "--model.param", "full"])
    start = ["--init-from", str(tmp_path / "full" / "checkpoint.pt"), "--target-params", "1200"]
    auto = main(["--out", str(tmp_path / "auto"), *common, *start])
    assert (auto["method"], auto["allocation"]) == ("lowrank", "energy")
    assert auto["params"] + 16 * 12 <= 1200  # recurrent + classifier within the target
    assert load_config(SpeechConfig, tmp_path / "auto" / "config.yaml").model.param == "lowrank"
    kept = main(["--out", str(tmp_path / "kept"), *common, *start, "--model.param", "str"])
    assert (kept["method"], kept["allocation"]) == ("str", "fixed")
    ranked = main(["--out", str(tmp_path / "r"), *common, *start[:2], "--target-rank", "10"])
    assert ranked["method"] == "str"

"""vision/train.py end to end on a tiny ImageFolder tree: STR, baselines, transfer, DDP, resume."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from vision.train import main

ROOT = Path(__file__).resolve().parents[1]
FAST = [
    "--epochs",
    "1",
    "--train.progress=false",
    "--train.plots=false",  # plots cost about 2 s a run; the tests that check them turn them on
    "--train.batch_size=16",
    "--data.image_size=16",
    "--data.name=imagefolder",
    "--data.augment=false",
]


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_images")
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 4)):
        for c in range(3):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(n):
                img = (rng.random((16, 16, 3)) * 80 + c * 80).astype(np.uint8)
                Image.fromarray(img).save(root / split / f"class{c}" / f"{i}.png")
    return root


def run(tmp_path, tiny_tree, *extra) -> dict:
    out = tmp_path / "run"
    main(["--out", str(out), "--data-dir", str(tiny_tree), *FAST, *extra])
    return json.loads((out / "summary.json").read_text())


def test_str_run_folder(tmp_path, tiny_tree):
    summary = run(tmp_path, tiny_tree, "--method.s_init=-2.5", "--train.plots=true")
    out = tmp_path / "run"
    for name in ("config.yaml", "metrics.csv", "budget.csv", "budget_history.csv", "checkpoint.pt"):
        assert (out / name).is_file(), name
    budget = pd.read_csv(out / "budget.csv")
    assert len(budget) == 22 + 1 and set(budget["param"][:-1]) == {"str"}  # resnet20: 21 conv + fc
    assert summary["method"] == "str" and 0 < summary["sparsity"] < 1
    assert list((out / "plots").glob("*.png"))


@pytest.mark.parametrize(
    "method,scope", [("gmp", "global"), ("gmp", "layer"), ("uniform", "layer")]
)
def test_magnitude_baselines_hit_final_sparsity(tmp_path, tiny_tree, method, scope):
    summary = run(
        tmp_path,
        tiny_tree,
        f"--method.name={method}",
        f"--method.gmp_scope={scope}",
        "--method.final_sparsity=0.8",
        "--method.update_every=1",
    )
    assert summary["sparsity"] == pytest.approx(0.8, abs=0.005)


def test_budget_transfer_reproduces_densities(tmp_path, tiny_tree):
    run(tmp_path / "a", tiny_tree, "--method.s_init=-2.0")
    source = pd.read_csv(tmp_path / "a" / "run" / "budget.csv").set_index("name")
    run(
        tmp_path / "b",
        tiny_tree,
        "--method.name=transfer",
        "--method.update_every=1",
        f"--method.budget={tmp_path / 'a' / 'run' / 'budget.csv'}",
    )
    target = pd.read_csv(tmp_path / "b" / "run" / "budget.csv").set_index("name")
    for name in source.index.drop("total"):
        assert target.loc[name, "nnz"] == pytest.approx(source.loc[name, "nnz"], abs=1), name


def test_dense_and_resume_and_test_only(tmp_path, tiny_tree):
    out = tmp_path / "dense"
    args = ["--out", str(out), "--data-dir", str(tiny_tree), *FAST, "--method.name=dense"]
    main(args)
    trained = main([*args, "--epochs", "2", "--resume", str(out / "checkpoint.pt")])
    assert list(pd.read_csv(out / "metrics.csv")["epoch"]) == [1, 2]
    assert json.loads((out / "summary.json").read_text())["sparsity"] == 0.0
    assert not (out / "plots").exists()  # --train.plots=false
    tested = main([*args, "--resume", str(out / "checkpoint.pt"), "--test-only"])
    # the checkpoint evaluates to the accuracy at the end of training (vision's held-out set is val)
    assert tested["val_acc"] == trained["val_acc"] and tested["val_loss"] == trained["val_loss"]
    assert json.loads((out / "summary.json").read_text())["val_acc"] == trained["val_acc"]


def test_bad_inputs_give_one_line(tmp_path, tiny_tree):
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    cases = [
        (["--data-dir", str(tmp_path / "nope")], "does not exist"),
        (["--train.lr", "fast"], "train.lr: expected float"),
        (["--method.final_sparsity", "1.5"], "method.final_sparsity: must be <= 0.999"),
        (["--method.name", "transfer"], "needs an STR run's budget.csv"),
    ]
    line = [sys.executable, "vision/train.py", "--out", str(tmp_path / "bad"), *FAST]
    procs = [  # all at once: each is mostly interpreter and torch start-up
        subprocess.Popen(
            [*line, "--data-dir", str(tiny_tree), *extra],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for extra, _ in cases
    ]
    for proc, (_, message) in zip(procs, cases):
        _, stderr = proc.communicate()
        assert proc.returncode == 2, stderr
        assert message in stderr and "Traceback" not in stderr
        assert len(stderr.strip().splitlines()) == 1, stderr


def test_ddp_two_processes_agree(tmp_path, tiny_tree):
    out = tmp_path / "ddp"
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        "vision/train.py",
        "--out",
        str(out),
        "--data-dir",
        str(tiny_tree),
        *FAST,
        "--device=cpu",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["replicas_in_sync"] is True
    assert proc.stdout.count("optimizer groups") == 1  # only rank 0 logs


@pytest.mark.parametrize("gate", ["soft", "hard"])
def test_structured_str_reaches_macs_target(tmp_path, tiny_tree, gate):
    """Structured STR with a MACs target (soft threshold or hard gate): the structured budget
    (channels kept, MACs of the smaller network) ends on the target, and the run's checkpoint
    exports to that network."""
    pytest.importorskip("torch_pruning")  # structured STR's optional dependency
    import torch

    from strlowrank import budget_table, totals
    from strlowrank.export.structured_export import export_pruned_cnn
    from strlowrank.method.group_threshold import group_thresholds
    from vision.config import VisionConfig
    from vision.method import smaller_network, sparsify, structured_source
    from vision.models import build_model

    summary = run(
        tmp_path,
        tiny_tree,
        "--method.granularity=structured",
        "--target-macs=0.5",
        f"--method.gate={gate}",
    )
    budget = pd.read_csv(tmp_path / "run" / "budget.csv")
    convs = budget[budget["kind"].str.contains("conv")]
    assert set(convs["param"]) == {"group"} and (convs["channels"] < convs["channels_dense"]).any()
    assert summary["macs_sparse"] / summary["macs_dense"] == pytest.approx(0.5, abs=0.03)
    assert summary["method"] == "str_structured"
    model = build_model("resnet20", 3)
    x = torch.randn(2, 3, 16, 16)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    source = structured_source(str(ckpt))
    assert isinstance(source, VisionConfig) and structured_source(str(ckpt) + ".x") is None
    sparsify(model, source, x[:1])
    assert {p.hard for _, _, p in group_thresholds(model)} == {gate == "hard"}
    model.load_state_dict(torch.load(ckpt)["model"])
    small = export_pruned_cnn(model, x[:1])
    assert totals(budget_table(small, x[:1]))["macs_dense"] == summary["macs_sparse"]
    with torch.no_grad():
        torch.testing.assert_close(small(x), model.eval()(x), rtol=1e-4, atol=1e-5)
    # P5 (bench/bench_structured.py) times the same smaller network against the dense one
    from bench.bench_structured import learned_resnet20
    from bench.bench_structured import main as bench_main

    bench_small = learned_resnet20(tmp_path / "run")[1]
    with torch.no_grad():
        torch.testing.assert_close(bench_small(x), small(x))
    flags = ["--threads", "1", "--repeats", "1", "--batch", "2", "--models", "resnet20"]
    (row,) = bench_main(
        [*flags, "--run", str(tmp_path / "run"), "--json", str(tmp_path / "p5.json")]
    )
    assert row["macs_kept"] == pytest.approx(summary["macs_sparse"] / summary["macs_dense"])
    # --init-from the structured run: the smaller network it learned, then trained as it is
    learned = smaller_network(build_model("resnet20", 3), source, str(ckpt), x[:1])
    assert learned.training and all(p.requires_grad for p in learned.parameters())
    with torch.no_grad():
        torch.testing.assert_close(learned.eval()(x), model(x), rtol=1e-4, atol=1e-5)
    tuned = run(tmp_path / "ft", tiny_tree, "--method.name=dense", f"--init-from={ckpt}")
    assert tuned["macs_dense"] == summary["macs_sparse"] and tuned["method"] == "dense"
    ft = pd.read_csv(tmp_path / "ft" / "run" / "budget.csv")
    sizes = [m.weight.numel() for m in learned.modules() if isinstance(m, torch.nn.Conv2d)]
    assert ft[ft["kind"].str.contains("conv")]["numel"].tolist() == sizes


def test_init_from_dense_run_and_group_norm_baseline(tmp_path, tiny_tree):
    """--init-from a dense run's checkpoint: structured STR starts from its weights; the
    group-norm baseline prunes it once to at most method.final_macs of its MACs; a plain
    state_dict loads too, a classifier for another number of classes excepted."""
    pytest.importorskip("torch_pruning")  # structured STR's optional dependency
    import torch

    from vision.models import build_model, load_pretrained

    dense = run(tmp_path / "dense", tiny_tree, "--method.name=dense")
    ckpt = tmp_path / "dense" / "run" / "checkpoint.pt"
    pruned = run(
        tmp_path / "gn",
        tiny_tree,
        "--method.name=group_norm",
        "--method.final_macs=0.4",
        f"--init-from={ckpt}",
    )
    assert 0.3 < pruned["macs_sparse"] / dense["macs_sparse"] <= 0.4
    run(tmp_path / "st", tiny_tree, "--method.granularity=structured", f"--init-from={ckpt}")
    state = torch.load(ckpt, weights_only=True)["model"]
    model = build_model("resnet20", 3)
    assert load_pretrained(model, ckpt) == []
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    plain = tmp_path / "state_dict.pt"  # a plain state_dict with another number of classes
    torch.save(build_model("resnet20", 5).state_dict(), plain)
    assert load_pretrained(model, plain) == ["fc.weight", "fc.bias"]


def test_structured_str_on_the_inner_widths_only(tmp_path, tiny_tree):
    """``--method.streams keep``: the convs that write a residual stream (found from the
    channel coupling) keep every channel (no threshold), the blocks' inner convs carry the
    thresholds, and the MACs target is met by the inner widths alone. On ResNet-20 it is
    ``--method.dense_layers`` with the streams' writers by name, run for run."""
    pytest.importorskip("torch_pruning")
    streams = '["conv1", "*.conv2", "*.downsample.*"]'
    flags = ["--method.granularity=structured", "--target-macs=0.5"]
    summary = run(tmp_path, tiny_tree, *flags, "--method.streams=keep")
    by_name = run(tmp_path / "names", tiny_tree, *flags, f"--method.dense_layers={streams}")
    assert summary["val_acc"] == by_name["val_acc"] and summary["nnz"] == by_name["nnz"]
    budget = pd.read_csv(tmp_path / "run" / "budget.csv")
    convs = budget[budget["kind"].str.contains("conv")].set_index("name")
    stream = convs.index.str.endswith(("conv2", "downsample.0")) | (convs.index == "conv1")
    assert (convs.loc[stream, "param"] == "dense").all()
    assert (convs.loc[stream, "channels"] == convs.loc[stream, "channels_dense"]).all()
    assert (convs.loc[~stream, "param"] == "group").all()
    assert (convs.loc[~stream, "channels"] < convs.loc[~stream, "channels_dense"]).any()
    assert summary["macs_sparse"] / summary["macs_dense"] == pytest.approx(0.5, abs=0.03)


def test_group_regularization_then_group_norm_prune(tmp_path, tiny_tree):
    """torch-pruning's sparse training (``--method.name group_reg``) from a dense run: at
    coefficient 0 it is that run trained on, weight for weight; at a large one the BatchNorm
    scales shrink, the least important channels most; a ``group_norm`` run started from it
    prunes to the MACs asked for."""
    pytest.importorskip("torch_pruning")
    import torch

    run(tmp_path / "dense", tiny_tree, "--method.name=dense")
    ckpt = tmp_path / "dense" / "run" / "checkpoint.pt"
    start = f"--init-from={ckpt}"
    states = {}
    for name, extra in [
        ("plain", ["--method.name=dense"]),
        ("reg0", ["--method.name=group_reg", "--method.group_reg=0"]),
        ("reg", ["--method.name=group_reg", "--method.group_reg=0.05"]),
    ]:
        summary = run(tmp_path / name, tiny_tree, start, *extra)
        states[name] = torch.load(tmp_path / name / "run" / "checkpoint.pt")["model"]
    assert summary["method"] == "group_reg"
    assert all(torch.equal(v, states["reg0"][k]) for k, v in states["plain"].items())
    gammas = {
        n: torch.cat([v.abs() for k, v in s.items() if "bn" in k and k.endswith("weight")])
        for n, s in states.items()
    }
    low = gammas["plain"] < gammas["plain"].median()
    shrink = gammas["reg"] / gammas["plain"]
    assert shrink.mean() < 1 and shrink[low].mean() < shrink[~low].mean()
    reg_ckpt = tmp_path / "reg" / "run" / "checkpoint.pt"
    pruned = run(
        tmp_path / "gn",
        tiny_tree,
        "--method.name=group_norm",
        "--method.final_macs=0.4",
        f"--init-from={reg_ckpt}",
    )
    assert 0.3 < pruned["macs_sparse"] / summary["macs_sparse"] <= 0.4


def test_structured_bad_inputs_give_one_line(tmp_path, tiny_tree, capsys):
    """A wrong --init-from file, another architecture's checkpoint, a structured target the
    model cannot reach: one line each, exit status 2 (in process: `run_main` is what the
    script's __main__ calls)."""
    pytest.importorskip("torch_pruning")  # structured STR's optional dependency
    import torch

    from strlowrank.training.cli import run_main
    from vision.models import build_model

    (tmp_path / "notes.txt").write_text("not a checkpoint")
    other = tmp_path / "mobilenet.pt"
    torch.save(build_model("mobilenet_v1_small", 3, width=0.25).state_dict(), other)
    cases = [
        ([f"--init-from={tmp_path / 'notes.txt'}"], "is no checkpoint"),
        ([f"--init-from={other}"], "checkpoint is for another model"),
        (
            [
                "--method.granularity=structured",
                "--method.keep_first_dense=true",
                "--target-macs=0.01",
            ],
            "out of reach of this structured model",
        ),
        (["--method.gate=hard"], "method.gate hard: a channel option"),
        (["--method.streams=keep"], "method.streams keep: a channel option"),
        (
            ['--method.dense_layers=["*.conv9"]'],
            "method.dense_layers: '*.conv9' matches no conv or linear layer",
        ),
    ]
    line = ["--out", str(tmp_path / "bad"), "--data-dir", str(tiny_tree), *FAST]
    for extra, message in cases:
        assert run_main(main, [*line, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err

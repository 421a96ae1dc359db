"""The budget controller: schedule, exact threshold shift, metrics, training to a target, resume."""

import math

import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from strlowrank import apply_soft_threshold
from strlowrank.budget import budget_table, layers, totals
from strlowrank.controller import (
    BudgetController,
    ControllerConfig,
    build_controller,
    expand_target_flags,
    from_reduction,
    macs_metric,
    rank_metric,
    schedule_value,
    shift_thresholds,
    sparsity_metric,
    threshold_parameters,
    to_reduction,
    unit_scale,
)
from strlowrank.distributed import DistInfo
from strlowrank.engine import Interrupted, Task, TrainConfig, Trainer, seed_everything
from strlowrank.rnn import RNNLayer


def make_task(seed: int = 0) -> Task:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(320, 16, generator=g)
    y = (x @ torch.randn(16, 4, generator=g)).argmax(1)
    seed_everything(seed)
    model = nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(),
                          nn.Linear(48, 4))  # fmt: skip
    apply_soft_threshold(model, s_init=-5.0)
    return Task(model=model, train_set=TensorDataset(x[:256], y[:256]),
                val_set=TensorDataset(x[256:], y[256:]), example_input=x[:2])  # fmt: skip


TRAIN = dict(epochs=12, batch_size=32, lr=0.1, weight_decay=1e-4, progress=False)  # 96 steps


def make_trainer(out, target: float, seed: int = 0, **ctl) -> tuple[Trainer, BudgetController]:
    task = make_task(seed)
    cfg = ControllerConfig(target=target, every=4, **ctl)
    controller = build_controller(cfg, task.model)
    task.callbacks.append(controller)
    trainer = Trainer(task, TrainConfig(**TRAIN), out, DistInfo())
    controller.bind(trainer.optimizer)
    return trainer, controller


def group_decay(trainer: Trainer, role: str) -> float:
    return next(g["weight_decay"] for g in trainer.optimizer.param_groups if g["role"] == role)


# ----------------------------------------------------------------------------- pieces
def test_schedule_shapes():
    assert schedule_value(0.0, 0.1, 0.9, 0.1, 0.7) == pytest.approx(0.1)
    assert schedule_value(0.1, 0.1, 0.9, 0.1, 0.7) == pytest.approx(0.1)
    assert schedule_value(0.4, 0.1, 0.9, 0.1, 0.7) == pytest.approx(0.9 - 0.8 * 0.5**3)
    assert schedule_value(0.4, 0.1, 0.9, 0.1, 0.7, "linear") == pytest.approx(0.5)
    assert schedule_value(0.7, 0.1, 0.9, 0.1, 0.7) == pytest.approx(0.9)
    assert schedule_value(1.0, 0.1, 0.9, 0.1, 0.7) == pytest.approx(0.9)


@pytest.mark.parametrize("target", [0.3, 0.9])
def test_shift_hits_target_and_keeps_relative_thresholds(target):
    model = make_task().model
    with torch.no_grad():  # different thresholds per layer
        for p, v in zip(threshold_parameters(model), (-4.0, -5.0, -3.5)):
            p.fill_(v)
    before = [float(p.detach()) for p in threshold_parameters(model)]
    delta, y = shift_thresholds(model, sparsity_metric(), target)
    after = [float(p.detach()) for p in threshold_parameters(model)]
    assert abs(y - target) < 1e-3
    assert y == pytest.approx(totals(budget_table(model))["sparsity"])
    for b, a in zip(before, after):
        assert a - b == pytest.approx(delta, abs=1e-5)


def test_metrics_are_the_budget_table():
    task = make_task()
    table = budget_table(task.model, task.example_input)
    tot = totals(table)
    assert sparsity_metric()(task.model) == pytest.approx(tot["sparsity"])
    macs = macs_metric(task.example_input)(task.model)
    assert macs == pytest.approx(1 - tot["macs_sparse"] / tot["macs_dense"])


def test_rank_metric_on_str_matrices_and_shift():
    torch.manual_seed(0)
    layer = RNNLayer("gru", 8, 16, kind="str", s_init=-4.0)
    rows = layers(budget_table(layer))
    full = float(rows["full_rank"].sum())
    target = to_reduction("rank", 10, unit_scale("rank", layer))  # 10 ranks in total
    assert target == pytest.approx(1 - 10 / full)
    _, y = shift_thresholds(layer, rank_metric(), target)
    assert float(layers(budget_table(layer))["rank"].sum()) == pytest.approx(10, abs=1)
    assert y == pytest.approx(target, abs=1.0 / full)


def test_target_units_and_flags():
    model = make_task().model
    assert to_reduction("sparsity", 0.9) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="controller.target: a sparsity target is a fraction"):
        to_reduction("sparsity", 90)
    assert to_reduction("macs", 0.1) == pytest.approx(0.9)
    assert from_reduction("macs", 0.9) == pytest.approx(0.1)
    numel = totals(budget_table(model))["numel"]
    assert unit_scale("params", model) == numel
    assert to_reduction("params", numel / 4, numel) == pytest.approx(0.75)
    assert from_reduction("params", 0.75, numel) == pytest.approx(numel / 4)
    with pytest.raises(ValueError, match="low-rank"):
        unit_scale("rank", model)
    argv = ["--out", "r", "--target-sparsity", "0.9", "--target-params=5000"]
    assert expand_target_flags(argv) == [
        "--out", "r", "--controller.metric", "sparsity", "--controller.target", "0.9",
        "--controller.metric", "params", "--controller.target", "5000",
    ]  # fmt: skip
    assert build_controller(ControllerConfig(), model) is None


def test_bind_needs_threshold_group_and_order_checked():
    dense = nn.Linear(3, 3)
    opt = torch.optim.SGD([{"params": dense.parameters(), "role": "weight"}], lr=0.1)
    ctl = BudgetController(ControllerConfig(target=0.5), sparsity_metric())
    with pytest.raises(ValueError, match="threshold"):
        ctl.bind(opt)
    with pytest.raises(RuntimeError, match="bind"):
        ctl.on_train_start(dense, 1, 1)
    with pytest.raises(ValueError, match="start"):
        BudgetController(ControllerConfig(target=0.5, start=0.8, end=0.5), sparsity_metric())


# ----------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def run_80(tmp_path_factory) -> tuple[Trainer, BudgetController]:
    """One uninterrupted run to 80% (shared by the target and the resume tests)."""
    torch.set_num_threads(2)
    trainer, ctl = make_trainer(tmp_path_factory.mktemp("full"), 0.8)
    trainer.fit()
    return trainer, ctl


@pytest.fixture(params=[0.5, 0.8])
def finished(request, tmp_path, run_80) -> tuple[Trainer, BudgetController, float]:
    if request.param == 0.8:
        return (*run_80, 0.8)
    trainer, ctl = make_trainer(tmp_path, request.param)
    trainer.fit()
    return trainer, ctl, request.param


def test_training_reaches_target_through_threshold_decay(finished):
    trainer, ctl, target = finished
    final = totals(trainer.budget())["sparsity"]
    assert abs(final - target) < 0.005
    trace = ctl.trace_frame()
    ramp = trace[trace["step"] <= 0.75 * 96]
    # the decay alone (no correction during the ramp here) moves the total toward the target
    assert ramp["measured"].iloc[-1] > ramp["measured"].iloc[len(ramp) // 2] > ramp["measured"][0]
    assert abs(ramp["measured"].iloc[-1] - target) < 0.1
    assert group_decay(trainer, "weight") == TRAIN["weight_decay"]  # only the s decay moves
    assert group_decay(trainer, "threshold") == ctl.decay != pytest.approx(1e-4)
    per_layer = layers(trainer.budget())["sparsity"]
    assert per_layer.max() - per_layer.min() > 0.05  # the allocation is still learned per layer
    metrics = pd.read_csv(trainer.out / "metrics.csv")
    assert {"target_sparsity", "achieved_sparsity", "threshold_decay"} <= set(metrics.columns)
    assert metrics["target_sparsity"].iloc[-1] == pytest.approx(target)
    assert metrics["achieved_sparsity"].iloc[-1] == pytest.approx(final)
    assert (metrics["achieved_sparsity"] - metrics["sparsity"]).abs().max() < 1e-9


def test_resume_keeps_controller_state(tmp_path, run_80):
    full, full_ctl = run_80
    half, half_ctl = make_trainer(tmp_path / "half", 0.8)
    orig = half._train_step

    def step_then_stop(x, y):
        out = orig(x, y)
        if half.step == 42:  # mid-epoch, mid-ramp, between two controller updates
            half._stop_signal = 15
        return out

    half._train_step = step_then_stop
    with pytest.raises(Interrupted):
        half.fit()
    assert len(half_ctl.trace) > 0
    resumed, resumed_ctl = make_trainer(tmp_path / "half", 0.8, seed=99)
    resumed.fit(resume=tmp_path / "half" / "checkpoint.pt")
    assert resumed_ctl.trace == full_ctl.trace
    assert resumed_ctl.state_dict() == full_ctl.state_dict()
    assert (full.out / "metrics.csv").read_text() == (
        tmp_path / "half" / "metrics.csv").read_text()
    assert not math.isnan(resumed_ctl.decay)

"""The budget controller: schedule, exact threshold shift, metrics, training to a target, resume."""

import math

import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from helpers import make_task
from strlowrank.method.budget import budget_table, layers, totals
from strlowrank.method.lowrank import MatrixSpec
from strlowrank.method.pruning import ramp
from strlowrank.method.rnn import RNNLayer
from strlowrank.training.cli import expand_target_flags
from strlowrank.training.controller import BudgetController, ControllerConfig, build_controller
from strlowrank.training.distributed import DistInfo
from strlowrank.training.engine import Interrupted, Task, Trainer
from strlowrank.training.measures import (
    from_reduction,
    macs_metric,
    rank_metric,
    sparsity_metric,
    to_reduction,
    unit_scale,
)
from strlowrank.training.threshold_shift import shift_thresholds, threshold_parameters
from strlowrank.training.train_config import TrainConfig

# the task of these tests: 16 features, 4 classes, a 48-48 MLP, 256 + 64 examples
TASK = dict(sizes=(16, 48, 48, 4), batchnorm=False, samples=(256, 64), data_seed=1, s_init=-5.0)


TRAIN = dict(epochs=12, batch_size=32, lr=0.1, weight_decay=1e-4, progress=False)  # 96 steps


def make_trainer(out, target: float, seed: int = 0, **ctl) -> tuple[Trainer, BudgetController]:
    task = make_task(seed, **TASK)
    cfg = ControllerConfig(target=target, every=4, **({"start": 0.0} | ctl))
    controller = build_controller(cfg, task.model)
    task.callbacks.append(controller)
    trainer = Trainer(task, TrainConfig(**TRAIN), out, DistInfo())
    controller.bind(trainer.optimizer)
    return trainer, controller


def group_decay(trainer: Trainer, role: str) -> float:
    return next(g["weight_decay"] for g in trainer.optimizer.param_groups if g["role"] == role)


# ----------------------------------------------------------------------------- pieces
def test_schedule_shapes():
    # the controller's target ramp (t, start, end, y0, target)
    assert ramp(0.0, 0.1, 0.7, 0.1, 0.9) == pytest.approx(0.1)
    assert ramp(0.1, 0.1, 0.7, 0.1, 0.9) == pytest.approx(0.1)
    assert ramp(0.4, 0.1, 0.7, 0.1, 0.9) == pytest.approx(0.9 - 0.8 * 0.5**3)
    assert ramp(0.4, 0.1, 0.7, 0.1, 0.9, "linear") == pytest.approx(0.5)
    assert ramp(0.7, 0.1, 0.7, 0.1, 0.9) == pytest.approx(0.9)
    assert ramp(1.0, 0.1, 0.7, 0.1, 0.9) == pytest.approx(0.9)


@pytest.mark.parametrize("target", [0.3, 0.9])
def test_shift_hits_target_and_keeps_relative_thresholds(target):
    model = make_task(**TASK).model
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


def _thresholded_weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight.detach().clone() for m in model if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("target", [0.2, 0.8])  # lower, raise the thresholds (start: ~0.5)
def test_compensated_shift_keeps_survivors_and_changes_only_crossers(target):
    model = make_task(**TASK).model
    shift_thresholds(model, sparsity_metric(), 0.5, compensate=False)
    before = _thresholded_weights(model)
    delta, y = shift_thresholds(model, sparsity_metric(), target)
    after = _thresholded_weights(model)
    assert abs(y - target) < 2e-3 and y == pytest.approx(sparsity_metric()(model))
    assert (delta > 0) == (target > 0.5)
    for b, a in zip(before, after):
        both = (b != 0) & (a != 0)
        assert both.sum() > 0
        assert torch.equal(a[both], b[both]) or (a[both] - b[both]).abs().max() < 1e-6
        crossed = (b != 0) != (a != 0)
        if target > 0.5:  # only pruned: every zero of before is still zero
            assert not ((b == 0) & (a != 0)).any()
        else:  # only revived, each with a value below the threshold change
            assert not ((b != 0) & (a == 0)).any()
        assert crossed.sum() > 0 or b.numel() < 100


def test_plain_shift_moves_every_survivor():
    model = make_task(**TASK).model
    shift_thresholds(model, sparsity_metric(), 0.5, compensate=False)
    before = _thresholded_weights(model)
    shift_thresholds(model, sparsity_metric(), 0.3, compensate=False)
    after = _thresholded_weights(model)
    both = [(a - b)[(a != 0) & (b != 0)].abs().min() for a, b in zip(after, before)]
    assert min(both) > 1e-4  # a lower threshold makes every kept weight larger


def test_compensated_rank_shift_keeps_kept_singular_values():
    torch.manual_seed(0)
    layer = RNNLayer("gru", 8, 16, MatrixSpec("str", s_init=-4.0, threshold_scale="init"))
    before = [m.spectrum().detach().clone() for m in (layer.W, layer.U)]
    full = float(layers(budget_table(layer))["full_rank"].sum())
    shift_thresholds(layer, rank_metric(), to_reduction("rank", 10, full))
    after = [m.spectrum().detach() for m in (layer.W, layer.U)]
    assert sum(int((a > 0).sum()) for a in after) == 10
    for b, a in zip(before, after):
        kept = (a > 0) & (b > 0)
        assert torch.allclose(a[kept], b[kept], atol=1e-6)


def test_metrics_are_the_budget_table():
    task = make_task(**TASK)
    table = budget_table(task.model, task.example_input)
    tot = totals(table)
    assert sparsity_metric()(task.model) == pytest.approx(tot["sparsity"])
    macs = macs_metric(task.example_input)(task.model)
    assert macs == pytest.approx(1 - tot["macs_sparse"] / tot["macs_dense"])


def test_rank_metric_on_str_matrices_and_shift():
    torch.manual_seed(0)
    layer = RNNLayer("gru", 8, 16, MatrixSpec("str", s_init=-4.0))
    rows = layers(budget_table(layer))
    full = float(rows["full_rank"].sum())
    target = to_reduction("rank", 10, unit_scale("rank", layer))  # 10 ranks in total
    assert target == pytest.approx(1 - 10 / full)
    _, y = shift_thresholds(layer, rank_metric(), target)
    assert float(layers(budget_table(layer))["rank"].sum()) == pytest.approx(10, abs=1)
    assert y == pytest.approx(target, abs=1.0 / full)


def test_target_units_and_flags():
    model = make_task(**TASK).model
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
        "--out",
        "r",
        "--controller.metric",
        "sparsity",
        "--controller.target",
        "0.9",
        "--controller.metric",
        "params",
        "--controller.target",
        "5000",
    ]
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


@pytest.mark.parametrize("mode", ["hold", "track"])
def test_track_follows_the_ramp_when_the_decay_is_saturated(tmp_path, mode):
    """A decay bound far too low to reach 0.9 sparsity: 'hold' lags the schedule through the
    whole ramp and corrects only after it; 'track' shifts onto the schedule whenever it lags
    by more than the overshoot band with the decay at its bound."""
    trainer, ctl = make_trainer(tmp_path, 0.9, decay_max=1e-4, correction=mode)
    trainer.fit()
    trace = ctl.trace_frame()
    ramp = trace[(trace["step"] < 0.75 * 96) & (trace["step"] > 8)]
    lag = ramp["target"] - ramp["achieved"]
    assert ramp["decay"].min() == pytest.approx(1e-4)  # saturated: the decay can do no more
    if mode == "hold":
        assert lag.max() > 0.3
    else:
        assert lag.max() <= ctl.cfg.overshoot + 1e-6
        assert (ramp["measured"] < ramp["achieved"] - 1e-9).any()  # corrections did it
    assert abs(totals(trainer.budget())["sparsity"] - 0.9) < 0.005  # both end on the target
    corrected = int((trace["measured"] != trace["achieved"]).sum())
    logged = pd.read_csv(trainer.out / "metrics.csv")["corrections"]
    assert logged.iloc[-1] == ctl.corrections >= corrected >= (1 if mode == "hold" else 3)


def test_plain_str_until_start_then_ramp_from_there(tmp_path):
    trainer, ctl = make_trainer(tmp_path, 0.8, start=0.4)
    trainer.fit()
    trace = ctl.trace_frame()
    before, after = trace[trace["step"] < 0.4 * 96], trace[trace["step"] >= 0.4 * 96]
    assert len(before) >= 8 and before["target"].isna().all()
    assert list(before["decay"]) == pytest.approx([1e-4] * len(before))
    assert (before["measured"] == before["achieved"]).all()  # no correction before start
    assert before["measured"].iloc[-1] > before["measured"].iloc[0]  # STR prunes on its own
    first = after.iloc[0]  # the ramp starts from the total measured at the start
    assert first["measured"] == pytest.approx(ctl.y0)
    assert first["target"] == pytest.approx(ramp(first["step"] / 96, 0.4, 0.75, ctl.y0, 0.8))
    assert after["decay"].iloc[1:].ne(1e-4).all()
    assert abs(totals(trainer.budget())["sparsity"] - 0.8) < 0.005
    metrics = pd.read_csv(trainer.out / "metrics.csv")
    assert metrics["target_sparsity"].isna().sum() == 4  # epochs 1-4 of 12 end before t = 0.4


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
    assert (full.out / "metrics.csv").read_text() == (tmp_path / "half" / "metrics.csv").read_text()
    assert not math.isnan(resumed_ctl.decay)


def test_controller_plot_shows_target_and_achieved(run_80):
    from strlowrank import analysis
    from strlowrank.analysis import plotting

    trainer, _ = run_80
    metrics = pd.read_csv(trainer.out / "metrics.csv")
    figs = plotting.run_figures(analysis.load_run(trainer.out))
    assert "controller" in figs
    achieved, target = figs["controller"].axes[0].get_lines()[:2]
    assert list(achieved.get_ydata()) == pytest.approx(list(metrics["achieved_sparsity"]))
    assert list(target.get_ydata()) == pytest.approx(list(metrics["target_sparsity"]))
    with pytest.raises(ValueError, match="target_"):
        plotting.plot_controller(metrics.drop(columns=["target_sparsity"]))


def test_unreachable_target_leaves_thresholds_alone():
    model = make_task(**TASK).model
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):  # |W| >= 2 > sigmoid(s) for every s: nothing prunable
                w = m.parametrizations.weight.original
                w.copy_(torch.sign(w) * (2.0 + w.abs()))
    before = [p.detach().clone() for p in threshold_parameters(model)]
    weights = _thresholded_weights(model)
    delta, y = shift_thresholds(model, sparsity_metric(), 0.5, compensate=False)
    assert delta == 0.0 and y == 0.0  # out of reach of s: nothing moves
    assert all(torch.equal(p, b) for p, b in zip(threshold_parameters(model), before))
    assert all(torch.equal(a, b) for a, b in zip(_thresholded_weights(model), weights))
    # compensated: s stays, the entries with the smallest margins go to the threshold instead
    delta, y = shift_thresholds(model, sparsity_metric(), 0.5)
    assert delta == 0.0 and abs(y - 0.5) < 2e-3
    assert all(torch.equal(p, b) for p, b in zip(threshold_parameters(model), before))
    for a, b in zip(_thresholded_weights(model), weights):
        kept = a != 0
        assert torch.equal(a[kept], b[kept])  # survivors untouched
        assert b[~kept].abs().max() <= b[kept].abs().min()  # the smallest were pruned


def test_boundary_move_prunes_ranks_past_the_threshold_ceiling():
    torch.manual_seed(0)
    layer = RNNLayer("gru", 8, 16, MatrixSpec("str", s_init=-4.0, threshold_scale="init"))
    full = float(layers(budget_table(layer))["full_rank"].sum())
    with torch.no_grad():  # tau at its ceiling (sigma_ref) and spectra grown past it
        for m in (layer.W, layer.U):
            m.s.fill_(60.0)
            m.sigma.mul_(3.0)
    before = [m.spectrum().detach().clone() for m in (layer.W, layer.U)]
    kept_before = sum(int((b > 0).sum()) for b in before)
    assert kept_before > 6
    delta, y = shift_thresholds(layer, rank_metric(), to_reduction("rank", kept_before - 4, full))
    after = [m.spectrum().detach() for m in (layer.W, layer.U)]
    assert delta == 0.0 and float(layer.W.s) == 60.0  # s saturated: the boundary moved instead
    assert sum(int((a > 0).sum()) for a in after) == kept_before - 4
    for b, a in zip(before, after):
        kept = a > 0
        assert torch.allclose(a[kept], b[kept])  # survivors keep their values


@pytest.mark.parametrize("role", ["spectrum", "threshold+spectrum"])
def test_spectrum_role_steers_the_singular_value_decay(tmp_path, role):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(96, 6, 4, generator=g), torch.randint(0, 3, (96,), generator=g)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            spec = MatrixSpec("str", s_init=-4.0, threshold_scale="init")
            self.rnn = RNNLayer("gru", 4, 16, spec)
            self.fc = nn.Linear(16, 3)

        def forward(self, x):
            return self.fc(self.rnn(x)[0][:, -1])

    task = Task(
        model=Net(), train_set=TensorDataset(x[:64], y[:64]), val_set=TensorDataset(x[64:], y[64:])
    )
    full = unit_scale("params", task.model)
    cfg = ControllerConfig(target=0.4 * full, metric="params", role=role, every=2, start=0.0)
    ctl = build_controller(cfg, task.model)
    task.callbacks.append(ctl)
    train = TrainConfig(
        epochs=4,
        batch_size=16,
        lr=0.01,
        optimizer="adam",
        weight_decay=0.0,
        spectrum_decay=1e-3,
        threshold_decay=1e-2 if "+" in role else 0.0,
        role_optimizer={"spectrum": "sgd"},
        progress=False,
    )
    trainer = Trainer(task, train, tmp_path, DistInfo())
    ctl.bind(trainer.optimizer)
    trainer.fit()
    params = float(layers(trainer.budget())["nnz"].sum())
    assert abs(params - 0.4 * full) / (0.4 * full) < 0.05
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert "spectrum_decay" in metrics
    if role == "spectrum":
        assert group_decay(trainer, "spectrum") == ctl.decay != pytest.approx(1e-3)
        assert group_decay(trainer, "threshold") == pytest.approx(0.0)  # not steered
        assert "threshold_decay" not in metrics
    else:  # one factor for both: their configured ratio 1e-3 / 1e-2 is kept
        assert group_decay(trainer, "threshold") == ctl.decay != pytest.approx(1e-2)
        assert group_decay(trainer, "spectrum") == pytest.approx(0.1 * ctl.decay)
        ratio = metrics["spectrum_decay"] / metrics["threshold_decay"]
        assert list(ratio) == pytest.approx([0.1] * len(metrics))


def test_a_start_decay_of_its_own_keeps_the_other_roles_at_their_configured_decay(tmp_path):
    """decay_init moves s's decay only; spectrum starts at train.spectrum_decay, then scales with
    the same factor as s's."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 6, 4, generator=g), torch.randint(0, 3, (32,), generator=g)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = RNNLayer("gru", 4, 16, MatrixSpec("str", s_init=-4.0))
            self.fc = nn.Linear(16, 3)

        def forward(self, x):
            return self.fc(self.rnn(x)[0][:, -1])

    task = Task(model=Net(), train_set=TensorDataset(x, y), val_set=TensorDataset(x, y))
    cfg = ControllerConfig(
        target=1000.0, metric="params", role="threshold+spectrum", decay_init=2e-2
    )
    ctl = build_controller(cfg, task.model)
    train = TrainConfig(epochs=1, batch_size=16, threshold_decay=1e-2, spectrum_decay=1e-3)
    trainer = Trainer(task, train, tmp_path, DistInfo())
    ctl.bind(trainer.optimizer)
    ctl.on_train_start(task.model, steps_per_epoch=2, epochs=1)
    assert group_decay(trainer, "threshold") == pytest.approx(2e-2)
    assert group_decay(trainer, "spectrum") == pytest.approx(1e-3)
    ctl.decay = 4e-2  # the controller doubles s's decay: the spectrum's doubles too
    ctl._apply()
    assert group_decay(trainer, "spectrum") == pytest.approx(2e-3)

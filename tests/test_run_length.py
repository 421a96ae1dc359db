"""Budgets that do not depend on the run's length: thresholds on the run's clock
(``train.role_lr_per_run``), and the warnings printed when a run learned no budget."""

import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from strlowrank import apply_soft_threshold
from strlowrank.training.checkpoint import seed_everything
from strlowrank.training.config import ConfigError
from strlowrank.training.distributed import DistInfo
from strlowrank.training.engine import Task, Trainer
from strlowrank.training.measures import budget_warnings
from strlowrank.training.train_config import TrainConfig, role_lrs


def clusters(n: int, seed: int) -> TensorDataset:
    """Four Gaussian clusters in 16 dimensions (the centres are the same for every n and seed)."""
    centres = torch.randn(4, 16, generator=torch.Generator().manual_seed(99)) * 1.5
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    return TensorDataset(centres[y] + torch.randn(n, 16, generator=g), y)


def final_sparsity(n: int, epochs: int, clock: dict, tmp_path) -> float:
    seed_everything(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    apply_soft_threshold(model, s_init=-8.0)
    cfg = TrainConfig(
        epochs=epochs,
        batch_size=32,
        lr=0.5,
        weight_decay=5e-3,
        threshold_decay=0.05,
        progress=False,
        **clock,
    )
    task = Task(model=model, train_set=clusters(n, 0), val_set=clusters(128, 1))
    return Trainer(task, cfg, tmp_path / f"{n}_{epochs}_{len(clock)}", DistInfo()).fit()["sparsity"]


def test_run_clock_budget_moves_far_less_than_the_step_count(tmp_path):
    # 40 vs 640 optimizer steps (4x the data and 4x the epochs); the same threshold lr at 160 steps
    short, long = (256, 5), (1024, 20)
    per_step = {"role_lr": {"threshold": 0.1}}  # 0.05 per step at any length
    per_run = {"role_lr_per_run": {"threshold": 0.05 * 160}}
    step = [final_sparsity(*size, per_step, tmp_path) for size in (short, long)]
    run = [final_sparsity(*size, per_run, tmp_path) for size in (short, long)]
    # per step: the short run prunes almost nothing, the long one nearly everything
    assert step[1] - step[0] > 0.5
    assert min(run) > 0.5 and abs(run[0] - run[1]) < 0.25  # on the run's clock: a real budget both


def test_role_lrs_give_eta_over_the_run_length():
    cfg = TrainConfig(lr=0.1, role_lr={"spectrum": 10.0}, role_lr_per_run={"threshold": 60.0})
    for steps in (150, 600, 2400):
        lrs = role_lrs(cfg, steps)
        assert lrs["spectrum"] == 10.0  # absolute: not a multiple of train.lr
        assert lrs["threshold"] == pytest.approx(60.0 / steps)
    with pytest.raises(ConfigError, match="train.role_lr.threshold and train.role_lr_per_run"):
        TrainConfig(role_lr={"threshold": 1.0}, role_lr_per_run={"threshold": 60.0})
    # null takes a role off the run's clock (a YAML or command line cannot delete a default key)
    per_step = TrainConfig(role_lr={"threshold": 1.0}, role_lr_per_run={"threshold": None})
    assert role_lrs(per_step, 100) == {"threshold": 1.0}
    # the run's clock does not need train.lr (absolute, not stored as a multiplier)
    assert role_lrs(TrainConfig(lr=0.0, role_lr_per_run={"threshold": 60.0}), 600) == {
        "threshold": pytest.approx(0.1)
    }


def test_the_old_per_step_clock_is_one_override_away():
    from speech.config import SpeechConfig
    from strlowrank.training.cli import parse_config

    cfg, _ = parse_config(
        SpeechConfig,
        "",
        ["--train.role_lr_per_run", "{threshold: null}", "--train.role_lr", "{threshold: 0.1}"],
    )
    lrs = role_lrs(cfg.train, 1700)
    assert lrs["threshold"] == 0.1 and lrs["spectrum"] == 30.0


def test_trainer_threshold_group_uses_the_run_clock(tmp_path):
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    apply_soft_threshold(model, s_init=-8.0)
    cfg = TrainConfig(
        epochs=3, batch_size=32, lr=0.5, progress=False, role_lr_per_run={"threshold": 12.0}
    )
    trainer = Trainer(
        Task(model=model, train_set=clusters(320, 0), val_set=clusters(64, 1)),
        cfg,
        tmp_path,
        DistInfo(),
    )
    group = next(g for g in trainer.optimizer.param_groups if g["role"] == "threshold")
    assert trainer.steps_per_epoch == 10
    assert group["initial_lr"] == pytest.approx(12.0 / 30)


def table(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows)


def test_warnings_name_the_failure_and_the_remedy():
    cfg = TrainConfig(threshold_decay=0.008, spectrum_decay=3e-4)
    conv = {
        "name": "conv",
        "param": "str",
        "numel": 1000,
        "rank": float("nan"),
        "full_rank": float("nan"),
    }
    dense = {
        "name": "conv",
        "param": "dense",
        "numel": 1000,
        "nnz": 1000,
        "rank": float("nan"),
        "full_rank": float("nan"),
    }
    nothing = budget_warnings(table([{**conv, "nnz": 965}]), 0.9, 10, cfg, 110)
    assert len(nothing) == 1 and "3.5% sparsity after 110" in nothing[0]
    assert "--target-sparsity" in nothing[0] and "0.008" in nothing[0]
    assert budget_warnings(table([{**conv, "nnz": 100}]), 0.9, 10, cfg, 110) == []
    assert budget_warnings(table([dense]), 0.1, 10, cfg, 110) == []  # no STR: nothing to say
    collapsed = budget_warnings(table([{**conv, "nnz": 5}]), 0.15, 10, cfg, 110)
    assert len(collapsed) == 1 and "below 20.0% (a collapsed model)" in collapsed[0]
    binary = table([{**conv, "nnz": 5}])  # two classes: twice chance would be 100%
    assert budget_warnings(binary, 0.93, 2, cfg, 110) == []
    assert "below 75.0%" in budget_warnings(binary, 0.6, 2, cfg, 110)[0]
    mats = [
        {
            "name": "rnns.0.W",
            "param": "str",
            "numel": 4096,
            "nnz": 4096,
            "rank": 25,
            "full_rank": 32,
        },
        {
            "name": "rnns.0.U",
            "param": "str",
            "numel": 49152,
            "nnz": 49152,
            "rank": 114,
            "full_rank": 128,
        },
    ]
    ranks = budget_warnings(table(mats), 0.9, 12, cfg, 225)
    assert len(ranks) == 1 and "W 25/32, U 114/128" in ranks[0] and "--target-params" in ranks[0]
    mats[1]["rank"] = 60
    assert budget_warnings(table(mats), 0.9, 12, cfg, 225) == []


def test_bn_recalibration_gives_the_exact_mean_over_the_batches(tmp_path):
    seed_everything(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))
    data = clusters(128, 0)
    cfg = TrainConfig(epochs=1, batch_size=32, progress=False, bn_recalibration=4)
    trainer = Trainer(
        Task(model=model, train_set=data, val_set=clusters(64, 1)), cfg, tmp_path, DistInfo()
    )
    norm = model[1]
    norm.running_mean.fill_(5.0)  # stale statistics, as after weights moved under them
    assert trainer.recalibrate_norms(cfg.bn_recalibration)
    with torch.no_grad():
        hidden = model[0](data.tensors[0])  # 4 batches of 32 = the whole set, in some order
    torch.testing.assert_close(norm.running_mean, hidden.mean(0), rtol=1e-5, atol=1e-6)
    assert norm.momentum == 0.1 and norm.num_batches_tracked == 4
    assert not trainer.recalibrate_norms(0)


# optimizer steps per epoch at each track's default data size (speech 85 x 64 clips, vision
# 40 x 128 images)
DEFAULT_STEPS = {"speech": 85, "vision": 40}


def default_trainer(
    track: str, tmp_path, overrides: dict | None = None, scale: float = 1.0
) -> Trainer:
    """A Trainer with the track's default train config, real default model and ``scale`` times
    the default data size in optimizer steps per epoch (:data:`DEFAULT_STEPS`); no data is
    read."""
    from speech.config import SpeechConfig
    from speech.models import build_model as speech_model
    from strlowrank.training.config import load_config
    from vision.config import VisionConfig
    from vision.models import build_model as vision_model

    if track == "speech":
        cfg = load_config(SpeechConfig, None, overrides)
        model = speech_model(cfg.model, 32, 12)
    else:
        cfg = load_config(VisionConfig, None, overrides)
        model = vision_model(cfg.model.name, 10, 1)
        apply_soft_threshold(model, s_init=cfg.method.s_init)
    n = round(DEFAULT_STEPS[track] * scale) * cfg.train.batch_size
    data = TensorDataset(torch.zeros(n, 1), torch.zeros(n, dtype=torch.long))
    cfg.train.progress = False
    return Trainer(Task(model=model, train_set=data, val_set=data), cfg.train, tmp_path, DistInfo())


def lrs_after(trainer: Trainer, steps: int) -> dict[str, float]:
    """Each role's lr after ``steps`` scheduler steps (no gradients: the parameters stay)."""
    for _ in range(steps):
        trainer.optimizer.step()
        trainer.scheduler.step()
    return {g["role"]: g["lr"] for g in trainer.optimizer.param_groups}


@pytest.mark.parametrize("scale", [0.25, 1.0, 4.0])
@pytest.mark.parametrize("track", ["speech", "vision"])
def test_default_lrs_are_eta_over_the_run_length(track, scale, tmp_path):
    """At the track's defaults and 1/4, 1 and 4 times its data: a role on the run's clock
    (train.role_lr_per_run: eta) peaks at eta / T, T the run's optimizer steps; a role with its
    own train.role_lr at that lr, whatever T; every other role at train.lr. Warm-up and cosine
    shape them all alike."""
    import math

    trainer = default_trainer(track, tmp_path, scale=scale)
    train, per_epoch = trainer.cfg, round(DEFAULT_STEPS[track] * scale)
    total, warm = train.epochs * per_epoch, round(train.warmup_epochs * per_epoch)
    assert trainer.total_steps == total and trainer.warmup_steps == warm
    eta = {r: v for r, v in train.role_lr_per_run.items() if v is not None}
    own = {r: v for r, v in train.role_lr.items() if v is not None}
    assert eta and set(eta).isdisjoint(own)
    roles = [g["role"] for g in trainer.optimizer.param_groups]
    peaks = {r: eta[r] / total if r in eta else own.get(r, train.lr) for r in roles}
    assert lrs_after(trainer, 0) == pytest.approx({r: lr / warm for r, lr in peaks.items()})
    mid = 0.5 * (1 + math.cos(math.pi * (total // 2 - warm) / (total - warm)))  # cosine part
    assert lrs_after(trainer, total // 2) == pytest.approx({r: lr * mid for r, lr in peaks.items()})
    # another train.lr moves the groups without their own lr, and only those
    moved = default_trainer(track, tmp_path / "moved", {"train.lr": 0.5 * train.lr}, scale)
    assert {g["role"]: g["initial_lr"] for g in moved.optimizer.param_groups} == pytest.approx(
        {r: (lr if r in eta or r in own else 0.5 * train.lr) for r, lr in peaks.items()}
    )

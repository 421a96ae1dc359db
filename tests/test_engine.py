"""The training engine: run folder, exact resume, determinism, interruption, numerical faults."""

import json

import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from helpers import make_task
from strlowrank.training.checkpoint import CheckpointError, load_checkpoint
from strlowrank.training.config import ConfigError, load_config
from strlowrank.training.distributed import DistInfo
from strlowrank.training.engine import Interrupted, Task, Trainer, TrainingError
from strlowrank.training.train_config import TrainConfig, use_channels_last


def make_cfg(**kw) -> TrainConfig:
    base = dict(
        epochs=4,
        batch_size=16,
        lr=0.2,
        weight_decay=1e-3,
        threshold_decay=0.1,
        warmup_epochs=1,
        label_smoothing=0.1,
        clip_grad=5.0,
        progress=False,
    )
    return TrainConfig(**(base | kw))


def train(out, resume=None, **kw) -> Trainer:
    trainer = Trainer(make_task(), make_cfg(**kw), out, DistInfo())
    trainer.fit(resume=resume)
    return trainer


def test_run_folder_and_learning(tmp_path):
    trainer = train(tmp_path)
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert list(metrics["epoch"]) == [1, 2, 3, 4]
    assert metrics["sparsity"].iloc[-1] > metrics["sparsity"].iloc[0]  # decay on s prunes
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["val_acc"] > 0.5 and "test_acc" in summary
    budget = pd.read_csv(tmp_path / "budget.csv")
    assert list(budget["name"]) == ["0", "3", "total"]
    history = pd.read_csv(tmp_path / "budget_history.csv")
    assert len(history) == 4 * 2
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 4
    assert trainer.scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-9)


def test_resume_reproduces_uninterrupted_run(tmp_path):
    full = train(tmp_path / "full")
    half = Trainer(make_task(), make_cfg(), tmp_path / "half", DistInfo())
    # interrupt in the middle of epoch 2 (after batch 2 of 4)
    orig = half._train_step

    def step_then_stop(x, y):
        out = orig(x, y)
        if half.step == 6:
            half._stop_signal = 15
        return out

    half._train_step = step_then_stop
    with pytest.raises(Interrupted):
        half.fit()
    resumed = Trainer(make_task(seed=99), make_cfg(), tmp_path / "half", DistInfo())
    resumed.fit(resume=tmp_path / "half" / "checkpoint.pt")
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (tmp_path / "full" / "metrics.csv").read_text() == (
        tmp_path / "half" / "metrics.csv"
    ).read_text()


def test_same_seed_same_metrics(tmp_path):
    train(tmp_path / "a")
    train(tmp_path / "b")
    a, b = (tmp_path / r / "metrics.csv" for r in "ab")
    assert a.read_text() == b.read_text()


def test_nan_loss_stops_with_epoch_and_step(tmp_path):
    trainer = Trainer(make_task(), make_cfg(epochs=3), tmp_path, DistInfo())
    orig = trainer.task.model.forward

    def poisoned(x):
        out = orig(x)
        return out * float("nan") if trainer.epoch == 1 and trainer.batch_in_epoch == 1 else out

    trainer.task.model.forward = poisoned
    with pytest.raises(TrainingError, match=r"epoch 2, step 5"):
        trainer.fit()
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1  # last good one kept


def test_checkpoint_of_another_model(tmp_path):
    train(tmp_path / "a", epochs=1)
    other = make_task()
    other.model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
    trainer = Trainer(other, make_cfg(), tmp_path / "b", DistInfo())
    with pytest.raises(CheckpointError, match="another model"):
        trainer.load(tmp_path / "a" / "checkpoint.pt")


@pytest.mark.parametrize(
    "choice,device,dim,expected",
    [
        ("auto", "cuda", 4, True),  # image batches on a GPU: NHWC convolutions
        ("auto", "cuda:1", 4, True),
        ("auto", "cpu", 4, False),
        ("auto", "cuda", 3, False),  # sequences
        ("auto", "cuda", None, False),
        ("on", "cpu", 3, True),
        ("off", "cuda", 4, False),
        (True, "cpu", 4, True),
        (False, "cuda", 4, False),
    ],
)
def test_use_channels_last(choice, device, dim, expected):
    assert use_channels_last(choice, torch.device(device), dim) is expected


@pytest.mark.parametrize(
    "text,expected",
    [
        ("auto", "auto"),
        ("on", "on"),
        ("off", "off"),
        ("true", "on"),
        ("false", "off"),
        ("'on'", "on"),
    ],
)
def test_channels_last_config_values(tmp_path, text, expected):
    """YAML reads on/off/true/false as booleans: all four map to "on" / "off"."""
    path = tmp_path / "c.yaml"
    path.write_text(f"channels_last: {text}\n")
    assert load_config(TrainConfig, path).channels_last == expected
    assert load_config(TrainConfig, None, {"channels_last": expected}).channels_last == expected
    assert TrainConfig().channels_last == "auto"
    with pytest.raises(ConfigError, match="channels_last: must be one of"):
        load_config(TrainConfig, None, {"channels_last": "yes please"})


def test_trainer_channels_last_on_cpu(tmp_path):
    """ "auto" keeps a CPU run contiguous; "on" converts the model's 4-d weights."""
    conv = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 3))
    x, y = torch.randn(8, 2, 8, 8), torch.randint(0, 3, (8,))
    for choice, expected in (("auto", False), ("on", True)):
        task = Task(model=conv, train_set=TensorDataset(x, y), val_set=TensorDataset(x, y))
        trainer = Trainer(task, make_cfg(channels_last=choice), tmp_path, DistInfo())
        assert trainer.channels_last is expected
        assert conv[0].weight.is_contiguous(memory_format=torch.channels_last) is expected

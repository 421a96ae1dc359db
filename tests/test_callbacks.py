"""The callback protocol: optional hooks reach the loop through one dispatch; misspelt ones fail."""

import pandas as pd
import pytest

from helpers import make_task
from strlowrank.method.lowrank import Refactorize
from strlowrank.method.pruning import GMPCallback
from strlowrank.training.callbacks import (
    HOOKS,
    Bind,
    OnEpochEnd,
    OnStepEnd,
    OnTrainStart,
    Stateful,
    call_hook,
    check_callbacks,
)
from strlowrank.training.controller import BudgetController, ControllerConfig, build_controller
from strlowrank.training.distributed import DistInfo
from strlowrank.training.engine import Trainer
from strlowrank.training.train_config import TrainConfig

CFG = dict(epochs=2, batch_size=16, lr=0.1, progress=False)  # 4 steps per epoch


class StepCounter:
    """Two of the seven hooks: counts steps, reports the count as a metrics.csv column."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_step_end(self, model, step: int) -> None:
        self.steps.append(step)

    def on_epoch_end(self, model, epoch: int) -> dict[str, float]:
        return {"counted_steps": float(len(self.steps))}


class AllHooks(StepCounter):
    """All seven hooks; on_before_step sees every gradient of the step before the weights move."""

    def bind(self, optimizer) -> None:
        self.optimizer = optimizer
        self.before: list[bool] = []

    def on_before_step(self, model) -> None:
        # every gradient is there, and this step's on_step_end has not run yet
        grads = all(p.grad is not None for p in model.parameters() if p.requires_grad)
        self.before.append(grads and len(self.steps) == len(self.before))

    def on_train_start(self, model, steps_per_epoch: int, epochs: int) -> None:
        self.plan = (steps_per_epoch, epochs)

    def state_dict(self) -> dict:
        return {"steps": list(self.steps)}

    def load_state_dict(self, state: dict) -> None:
        self.steps = list(state["steps"])


def test_hooks_a_callback_lacks_are_skipped_and_the_others_called(tmp_path):
    task = make_task()
    partial, full = StepCounter(), AllHooks()
    task.callbacks += [partial, full]
    trainer = Trainer(task, TrainConfig(**CFG), tmp_path, DistInfo())
    assert full.optimizer is trainer.optimizer  # bind: once the optimizer exists
    trainer.fit()
    assert partial.steps == full.steps == list(range(8)) and full.plan == (4, 2)
    assert full.before == [True] * 8
    assert list(pd.read_csv(tmp_path / "metrics.csv")["counted_steps"]) == [4.0, 8.0]
    assert trainer.state_dict()["callbacks"] == [{}, {"steps": list(range(8))}]
    again = make_task()
    restored = AllHooks()
    again.callbacks += [StepCounter(), restored]
    Trainer(again, TrainConfig(**CFG), tmp_path / "b", DistInfo()).load(tmp_path / "checkpoint.pt")
    assert restored.steps == list(range(8))


def test_call_hook_returns_the_hooks_value_or_none():
    counter = StepCounter()
    assert call_hook(counter, "on_epoch_end", None, 0) == {"counted_steps": 0.0}
    assert call_hook(counter, "bind", None) is None  # no such method: skipped
    assert call_hook(counter, "state_dict") is None
    with pytest.raises(ValueError, match="unknown callback hook 'on_epoch_ends'"):
        call_hook(counter, "on_epoch_ends", None, 0)


def test_a_misspelt_hook_is_an_error_not_a_silent_skip(tmp_path):
    class Misspelt(StepCounter):
        def on_epoch_ends(self, model, epoch: int) -> dict:
            return {}

    class HalfState(StepCounter):
        def state_dict(self) -> dict:
            return {}

    check_callbacks([StepCounter(), AllHooks()])
    with pytest.raises(TypeError, match="Misspelt.on_epoch_ends is not a callback hook"):
        check_callbacks([StepCounter(), Misspelt()])
    task = make_task()
    task.callbacks.append(Misspelt())
    with pytest.raises(TypeError, match="on_epoch_ends"):
        Trainer(task, TrainConfig(**CFG), tmp_path, DistInfo())
    with pytest.raises(TypeError, match="HalfState: .* state_dict and load_state_dict"):
        check_callbacks([HalfState()])


def test_the_library_callbacks_follow_the_protocols():
    model = make_task().model
    controller = build_controller(ControllerConfig(target=0.5), model)
    gmp = GMPCallback(final_density=0.5)
    assert isinstance(controller, BudgetController)
    for protocol in (Bind, OnTrainStart, OnStepEnd, OnEpochEnd, Stateful):
        assert isinstance(controller, protocol)
    for protocol in (OnTrainStart, OnStepEnd, OnEpochEnd, Stateful):
        assert isinstance(gmp, protocol)
    refactorize = Refactorize(every_epochs=1)
    assert isinstance(refactorize, OnStepEnd) and isinstance(refactorize, OnEpochEnd)
    assert not isinstance(refactorize, Stateful)
    check_callbacks([controller, gmp, refactorize])
    # the dispatch table names each protocol's own methods, all seven hooks
    assert all(hasattr(protocol, hook) for hook, protocol in HOOKS.items())
    assert len(HOOKS) == 7

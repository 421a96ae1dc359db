"""The engine's callback protocol: seven optional hooks, one Protocol each, and one dispatch.

A callback is any object with some of these methods; the engine calls each one it has:

    bind(optimizer)                                    once the optimizer exists (it may steer it)
    on_train_start(model, steps_per_epoch, epochs)     before the first step (also on resume)
    on_before_step(model)                              after backward, gradients unscaled, before
                                                       optimizer.step() (a regularizer's gradient)
    on_step_end(model, step)                           after optimizer.step(); step counts from 0
    on_epoch_end(model, epoch) -> dict | None          extra metrics.csv columns of the epoch
    state_dict() -> dict, load_state_dict(state)       stored in and restored from the checkpoint

GMP mask updates, low-rank re-factorization, the budget controller and torch-pruning's group
regularization are callbacks. A public
name ``on_*`` that is no hook (a misspelt ``on_epoch_ends``) and a ``state_dict`` without its
``load_state_dict`` (or the reverse) are errors (:func:`check_callbacks`), never skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Bind(Protocol):
    def bind(self, optimizer: torch.optim.Optimizer) -> Any: ...


@runtime_checkable
class OnTrainStart(Protocol):
    def on_train_start(self, model: nn.Module, steps_per_epoch: int, epochs: int) -> None: ...


@runtime_checkable
class OnBeforeStep(Protocol):
    def on_before_step(self, model: nn.Module) -> None: ...


@runtime_checkable
class OnStepEnd(Protocol):
    def on_step_end(self, model: nn.Module, step: int) -> None: ...


@runtime_checkable
class OnEpochEnd(Protocol):
    def on_epoch_end(self, model: nn.Module, epoch: int) -> dict[str, float] | None: ...


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


Callback = Bind | OnTrainStart | OnBeforeStep | OnStepEnd | OnEpochEnd | Stateful

# every hook the engine calls -> the protocol that declares it
HOOKS: dict[str, type] = {
    "bind": Bind,
    "on_train_start": OnTrainStart,
    "on_before_step": OnBeforeStep,
    "on_step_end": OnStepEnd,
    "on_epoch_end": OnEpochEnd,
    "state_dict": Stateful,
    "load_state_dict": Stateful,
}


def check_callbacks(callbacks: Sequence[Callback]) -> None:
    """Raise TypeError for a callback with a public ``on_*`` attribute that is no hook, or with
    one of ``state_dict`` / ``load_state_dict`` but not the other."""
    for cb in callbacks:
        name = type(cb).__name__
        unknown = sorted(a for a in dir(cb) if a.startswith("on_") and a not in HOOKS)
        if unknown:
            hooks = ", ".join(HOOKS)
            raise TypeError(f"{name}.{unknown[0]} is not a callback hook (the hooks: {hooks})")
        if hasattr(cb, "state_dict") != hasattr(cb, "load_state_dict"):
            raise TypeError(f"{name}: a callback with state has state_dict and load_state_dict")


def call_hook(callback: Callback, hook: str, *args: Any) -> Any:
    """``callback.<hook>(*args)`` when the callback has that hook, else None (every hook is
    optional). ``hook`` must be one of :data:`HOOKS`."""
    if hook not in HOOKS:
        raise ValueError(f"unknown callback hook {hook!r} (the hooks: {', '.join(HOOKS)})")
    method = getattr(callback, hook, None)
    return None if method is None else method(*args)

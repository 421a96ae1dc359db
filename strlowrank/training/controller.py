"""Budget control: steer the decay on STR thresholds so that a run ends at a requested total.

STR has no sparsity loss: the decay lambda_s on the threshold parameters s is its sparsity knob.
Here lambda_s is a feedback variable (docs/METHOD.md section 4, docs/CONTROLLER.md). Every
``every`` steps the controller measures the total y (a fraction that rises with the thresholds;
strlowrank.training.measures) at training fraction t and compares it with a ramp from y_0 (measured
at t_start) to the target y_T (``strlowrank.method.pruning.ramp``, cubic as in Zhu & Gupta 2017):

    e_k = r(t_k) - y_k,   I_k = I_{k-1} + e_k (t_k - t_{k-1})
    lambda_s = clip(lambda_0 exp(k_p e_k + k_i I_k), lambda_min, lambda_max)

with the integral frozen while the decay is saturated in the error's direction. When decay
cannot do it (hold phase, overshoot, saturated lag, last step) one common shift of every s
lands y on r(t) exactly and keeps STR's per-layer allocation (strlowrank.training.threshold_shift).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
from torch import nn

from strlowrank.method.pruning import ramp
from strlowrank.training.controller_config import ControllerConfig
from strlowrank.training.measures import (
    Measure,
    from_reduction,
    make_measure,
    to_reduction,
    unit_scale,
)
from strlowrank.training.threshold_shift import shift_thresholds

TRACE_COLUMNS = ["step", "target", "measured", "achieved", "decay"]


class BudgetController:
    """Engine callback that steers the decay on s towards a requested total (module docstring).

    ``measure(model)`` returns the current total as a fraction non-decreasing in the thresholds
    (:func:`to_reduction` of ``cfg.target``; ``scale`` from :func:`unit_scale`). Call :meth:`bind`
    with the optimizer before training: the controller writes ``weight_decay`` of the optimizer's
    ``role == cfg.role`` groups. metrics.csv gets ``target_<metric>`` and ``achieved_<metric>``
    (user units), ``<role>_decay``, ``threshold_shift`` (the summed shifts of s) and
    ``corrections`` (how many so far: also those that moved the boundary, not s).
    """

    def __init__(self, cfg: ControllerConfig, measure: Measure, scale: float = 1.0) -> None:
        if cfg.end < cfg.start:
            raise ValueError(f"controller.end ({cfg.end}) must be >= start ({cfg.start})")
        if cfg.target is None:
            raise ValueError("BudgetController needs a target (controller.target)")
        self.cfg, self.measure, self.scale = cfg, measure, scale
        self.target = to_reduction(cfg.metric, cfg.target, scale)
        self.optimizer: torch.optim.Optimizer | None = None
        self.total_steps, self.done, self.last_update = 0, 0, 0
        self.started = self.warned = False
        self.y0 = self.log_decay0 = self.decay = self.achieved = math.nan
        self.roles = cfg.role.split("+")
        self.ratios: dict[str, float] = {}  # configured decay of each role / the start decay
        self.integral = self.shift = 0.0
        self.corrections = 0
        self.trace: list[list[float]] = []  # [steps, target, measured, achieved, decay]

    def bind(self, optimizer: torch.optim.Optimizer) -> BudgetController:
        """Use the optimizer's ``role == cfg.role`` param groups (there must be one)."""
        self.optimizer = optimizer
        if not self.groups():
            raise ValueError(
                f"budget controller: the optimizer has no {self.roles[0]!r} param "
                "group (controller.role)"
            )
        return self

    def groups(self, role: str | None = None) -> list[dict]:
        """The groups of the first steered role, looked up each time (``load_state_dict``
        replaces the dicts); ``role`` picks another role's."""
        groups = self.optimizer.param_groups if self.optimizer is not None else []
        return [g for g in groups if g.get("role") == (role or self.roles[0])]

    def schedule(self, steps_done: int) -> float:
        """r(t); NaN before the ramp has started (``y0`` is measured when it starts)."""
        t = steps_done / max(self.total_steps, 1)
        return ramp(t, self.cfg.start, self.cfg.end, self.y0, self.target, self.cfg.shape)

    def _ramp_started(self, steps_done: int) -> bool:
        return steps_done >= self.cfg.start * self.total_steps

    # ----------------------------------------------------------------------------- callback
    def on_train_start(self, model: nn.Module, steps_per_epoch: int, epochs: int) -> None:
        if not self.groups():
            raise RuntimeError("budget controller: call bind(optimizer) before training")
        self.total_steps = steps_per_epoch * epochs
        if not self.started:
            d0 = self.cfg.decay_init
            d0 = float(self.groups()[0]["weight_decay"]) if d0 is None else d0
            d0 = min(max(d0, self.cfg.decay_min, 1e-30), self.cfg.decay_max)
            self.log_decay0, self.decay = math.log(d0), d0
            # other roles start at their own configured decay and follow the factor of s's
            for role in self.roles[1:]:
                configured = [float(g["weight_decay"]) for g in self.groups(role)]
                self.ratios[role] = configured[0] / d0 if configured else 0.0
            self.achieved = self.measure(model)
            if self._ramp_started(0):
                self.y0 = self.achieved
            self.started = True
        self._apply()

    def on_step_end(self, model: nn.Module, step: int) -> None:
        self.done = step + 1
        last = self.done >= self.total_steps
        if self.done % self.cfg.every and not last:
            return
        if not self._ramp_started(self.done):  # plain STR: the configured decay, no correction
            self.achieved = self.measure(model)
            self.trace.append(
                [float(self.done), math.nan, self.achieved, self.achieved, self.decay]
            )
            return
        if math.isnan(self.y0):  # the ramp starts here, from the total STR reached on its own
            self.y0 = self.measure(model)
            self.last_update = self.done
        r = self.schedule(self.done)
        measured = y = self.measure(model)
        self._update_decay(r - y, (self.done - self.last_update) / max(self.total_steps, 1))
        self.last_update = self.done
        if self._corrects(r - y, last):
            delta, y = shift_thresholds(model, self.measure, r, compensate=self.cfg.compensate)
            self.shift += delta
            self.corrections += 1
            if abs(y - r) > 0.01 and not self.warned:
                self.warned = True
                warnings.warn(
                    f"budget controller: the target {r:.4f} is out of reach of a "
                    f"threshold shift (total {y:.4f}); relying on the decay alone",
                    RuntimeWarning,
                    stacklevel=2,
                )
        self.achieved = y
        self.trace.append([float(self.done), r, measured, y, self.decay])

    def on_epoch_end(self, model: nn.Module, epoch: int) -> dict[str, float]:
        self.achieved = self.measure(model)
        metric, scale = self.cfg.metric, self.scale
        return {
            f"target_{metric}": from_reduction(metric, self.schedule(self.done), scale),
            f"achieved_{metric}": from_reduction(metric, self.achieved, scale),
            **{f"{role}_decay": self._role_decay(role) for role in self.roles},
            "threshold_shift": self.shift,
            "corrections": float(self.corrections),
        }

    # ----------------------------------------------------------------------------- control law
    def _update_decay(self, error: float, dt: float) -> None:
        """PI step in log space with conditional integration (anti-windup)."""
        lo, hi = math.log(max(self.cfg.decay_min, 1e-30)), math.log(self.cfg.decay_max)
        integral = self.integral + error * dt
        u = self.log_decay0 + self.cfg.kp * error + self.cfg.ki * integral
        if (u > hi and error > 0) or (u < lo and error < 0):
            integral = self.integral  # saturated: do not wind up
            u = self.log_decay0 + self.cfg.kp * error + self.cfg.ki * integral
        self.integral = integral
        self.decay = math.exp(min(max(u, lo), hi))
        self._apply()

    def _corrects(self, error: float, last: bool) -> bool:
        mode = self.cfg.correction
        if mode == "off":
            return False
        if last:
            return True
        if mode not in ("hold", "track"):
            return False
        if self.done >= self.cfg.end * self.total_steps:
            return abs(error) > self.cfg.tolerance
        saturated = self.decay >= self.cfg.decay_max * (1 - 1e-9)
        lags = mode == "track" and saturated and error > self.cfg.overshoot
        return -error > self.cfg.overshoot or lags

    def _role_decay(self, role: str) -> float:
        if role == self.roles[0]:
            return self.decay
        decay = self.decay * self.ratios.get(role, 0.0)
        return min(max(decay, self.cfg.decay_min), self.cfg.decay_max) if decay > 0 else 0.0

    def _apply(self) -> None:
        for role in self.roles:
            for g in self.groups(role):
                g["weight_decay"] = self._role_decay(role)

    # ----------------------------------------------------------------------------- state
    STATE_KEYS = (
        "target total_steps done last_update started y0 log_decay0 decay achieved integral "
        "shift corrections ratios"
    ).split()

    def state_dict(self) -> dict[str, Any]:
        state = {k: getattr(self, k) for k in self.STATE_KEYS}
        return state | {"trace": [list(r) for r in self.trace]}

    def trace_frame(self) -> pd.DataFrame:
        """The per-update trajectory (measured: before any correction; achieved: after)."""
        return pd.DataFrame(self.trace, columns=TRACE_COLUMNS)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (an empty dict, from a run without controller, is a no-op)."""
        for k in self.STATE_KEYS:
            if k in state:
                setattr(self, k, state[k])
        self.trace = [list(r) for r in state.get("trace", self.trace)]
        if self.optimizer is not None and self.started:
            self._apply()


def build_controller(
    cfg: ControllerConfig,
    model: nn.Module,
    example_input=None,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
) -> BudgetController | None:
    """The controller for ``cfg`` (None when ``cfg.target`` is None); call ``bind`` next."""
    if cfg.target is None:
        return None
    scale = unit_scale(cfg.metric, model, include, exclude)
    measure = make_measure(cfg.metric, example_input, include, exclude)
    return BudgetController(cfg, measure, scale)

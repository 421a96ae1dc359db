"""The budget controller's settings: the ``controller.*`` section of both tracks' configs.

What each knob does is in docs/CONTROLLER.md; the law that uses them is
strlowrank.training.controller.
"""

from __future__ import annotations

from dataclasses import dataclass

from strlowrank.training.config import option
from strlowrank.training.measures import METRICS


@dataclass
class ControllerConfig:
    """Budget controller settings (the ``controller.*`` config section); off unless ``target``."""

    target: float | None = option(
        None,
        "requested final total, in the metric's unit: sparsity (a fraction), "
        "macs (sparse / dense MACs), params (count), rank (sum of learned ranks); None: off",
        min=0.0,
    )
    metric: str = option("sparsity", "what the target counts", choices=METRICS)
    start: float = option(
        0.2,
        "fraction of training where the controller takes over: before it plain STR runs "
        "with the configured decay; the ramp starts from the total measured then",
        min=0.0,
        max=1.0,
    )
    end: float = option(
        0.75, "fraction of training where the ramp reaches the target (then hold)", min=0.0, max=1.0
    )
    shape: str = option(
        "cubic", "ramp shape: cubic (Zhu & Gupta) | linear", choices=("cubic", "linear")
    )
    role: str = option(
        "threshold",
        "the parameter role(s) whose weight decay is steered: threshold (the decay "
        "on s, STR's sparsity knob) | spectrum (the decay on singular values, the rank knob of "
        "STR matrices with a fixed threshold unit) | threshold+spectrum (both, scaled by the "
        "same factor)",
        choices=("threshold", "spectrum", "threshold+spectrum"),
    )
    every: int = option(10, "update interval in optimizer steps", min=1)
    kp: float = option(10.0, "proportional gain: log-decay change per unit of error", min=0.0)
    ki: float = option(
        100.0, "integral gain: log-decay change per unit error x training fraction", min=0.0
    )
    decay_init: float | None = option(
        None, "initial decay; default: the steered group's configured decay", min=0.0
    )
    decay_min: float = option(1e-6, "lower bound of the decay on s", min=0.0)
    decay_max: float = option(0.1, "upper bound of the decay on s", min=0.0)
    correction: str = option(
        "hold",
        "exact common shift of all s: off | final (last step) | hold (after the ramp, when "
        "the error exceeds tolerance, and at the last step) | track (hold, and during the ramp "
        "also when the total lags the schedule by more than overshoot while the decay is at "
        "decay_max: the decay can do no more)",
        choices=("off", "final", "hold", "track"),
    )
    tolerance: float = option(0.001, "hold-phase error that triggers a correction", min=0.0)
    compensate: bool = option(
        True,
        "a correction keeps the thresholded value of every weight (singular value) that "
        "survives it: only those that cross the threshold change (no jump of the survivors)",
    )
    overshoot: float = option(
        0.02,
        "during the ramp, a total above the schedule by more than this is shifted back "
        "(decay cannot lower thresholds; fully pruned layers get no gradient to recover)",
        min=0.0,
    )

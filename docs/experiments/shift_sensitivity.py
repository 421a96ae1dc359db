"""How much a common threshold shift disturbs a trained STR network, plain or compensated.

Loads the final checkpoint of a vision run folder, shifts every threshold by one delta so that
the total sparsity lands at a few nearby values
(``strlowrank.training.threshold_shift.shift_thresholds``), with and without survivor compensation,
and prints the validation accuracy of each. Run (with the package installed, e.g. in .venv): python
docs/experiments/shift_sensitivity.py RUN_DIR   (docs/CONTROLLER.md)
"""

from __future__ import annotations

import copy
import sys

import torch

from strlowrank.method.budget import budget_table, totals
from strlowrank.training.checkpoint import load_checkpoint
from strlowrank.training.config import load_config
from strlowrank.training.measures import sparsity_metric
from strlowrank.training.threshold_shift import shift_thresholds
from vision.config import VisionConfig
from vision.data import build_datasets
from vision.method import sparsify
from vision.models import build_model


def main(run: str, offsets: tuple[float, ...] = (-0.002, -0.0006, 0.0006, 0.002)) -> None:
    cfg = load_config(VisionConfig, f"{run}/config.yaml")
    d = cfg.data
    _, val, classes, chans = build_datasets(d.name, d.root, d.image_size, augment=False)
    model = build_model(cfg.model.name, classes, chans, width=cfg.model.width)
    sparsify(model, cfg)
    model.load_state_dict(load_checkpoint(f"{run}/checkpoint.pt")["model"])
    model.eval()
    xs = torch.stack([val[i][0] for i in range(len(val))])
    ys = torch.tensor([val[i][1] for i in range(len(val))])

    def accuracy(m: torch.nn.Module) -> float:
        with torch.no_grad():
            return float((m(xs).argmax(1) == ys).float().mean())

    base = totals(budget_table(model))["sparsity"]
    print(f"final: sparsity {base:.4f}  val acc {accuracy(model):.3f}")
    for dy in offsets:
        for compensate in (False, True):
            m = copy.deepcopy(model)
            delta, y = shift_thresholds(m, sparsity_metric(), base + dy, compensate=compensate)
            print(
                f"to {base + dy:.4f} compensate={compensate}: delta {delta:+.4f} "
                f"sparsity {y:.4f} val acc {accuracy(m):.3f}"
            )


if __name__ == "__main__":
    main(sys.argv[1])

"""Helpers shared by test files (imported as ``from helpers import ...``; pytest puts tests/ on
the path)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from strlowrank import apply_soft_threshold
from strlowrank.training.checkpoint import seed_everything
from strlowrank.training.engine import Task


def make_task(
    seed: int = 0,
    *,
    sizes: tuple[int, ...] = (10, 32, 3),
    batchnorm: bool = True,
    samples: tuple[int, int] = (64, 32),
    data_seed: int = 123,
    s_init: float = -4.0,
) -> Task:
    """A small STR classification task for the engine.

    Inputs x ~ N(0, 1) with ``sizes[0]`` features and labels argmax(x W) of a random linear map
    to ``sizes[-1]`` classes, both drawn from ``data_seed`` (``samples``: training, held-out
    examples; the held-out ones are the val and the test set). The model, built after
    ``seed_everything(seed)``, is an MLP through ``sizes`` (BatchNorm after each hidden layer
    with ``batchnorm``) with a soft threshold at ``s_init`` on every linear weight.
    """
    g = torch.Generator().manual_seed(data_seed)
    n_train, n_held = samples
    x = torch.randn(n_train + n_held, sizes[0], generator=g)
    y = (x @ torch.randn(sizes[0], sizes[-1], generator=g)).argmax(1)
    seed_everything(seed)
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers += [nn.BatchNorm1d(n_out), nn.ReLU()] if batchnorm else [nn.ReLU()]
    model = nn.Sequential(*layers)
    apply_soft_threshold(model, s_init=s_init)
    held = TensorDataset(x[n_train:], y[n_train:])
    return Task(
        model=model,
        train_set=TensorDataset(x[:n_train], y[:n_train]),
        val_set=held,
        test_set=held,
        example_input=x[:2],
    )

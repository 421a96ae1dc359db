"""Shared test settings: a private cache folder, so tests never touch ~/.cache, and one thread
(CPU results are bit-identical only at equal thread counts; subprocesses inherit it)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _isolate(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("STRLOWRANK_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


@pytest.fixture
def random_bn_stats():
    """A function that gives a model non-trivial BN statistics and affine parameters and puts it
    in eval mode, so that BN folding in the exports is really tested."""

    def apply(model: torch.nn.Module) -> torch.nn.Module:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
        return model.eval()

    return apply

"""Shared test settings: a private cache folder, so tests never touch ~/.cache, and one thread
(CPU results are bit-identical only at equal thread counts; subprocesses inherit it)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _isolate(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("STRLOWRANK_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)

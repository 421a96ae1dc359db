"""Shared test settings: a private cache folder and few threads, so tests never touch ~/.cache."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _isolate(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("STRLOWRANK_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    torch.set_num_threads(2)

"""Keyword features (speech.features): shapes, training-set normalization, disk cache, augment."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from test_speech_data import make_tree

from speech import features
from speech.data import build_index, class_names, load_items
from speech.features import FeatureConfig, augment, feature_extractor, load_features


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "sc")


def test_extractor_shapes() -> None:
    cfg = FeatureConfig()
    assert (cfg.win_length, cfg.hop_length, cfg.n_frames(16000)) == (400, 160, 99)
    waves = torch.randn(3, 16000) * 0.1
    assert feature_extractor(cfg)(waves).shape == (3, 99, 32)
    mfcc = feature_extractor(FeatureConfig(kind="mfcc", n_mfcc=10))(waves)
    assert mfcc.shape == (3, 99, 10) and torch.isfinite(mfcc).all()
    with pytest.raises(ValueError, match="kind"):
        FeatureConfig(kind="spectrogram")


def test_extractor_frames_are_local() -> None:
    """Frame t sees samples [160 t, 160 t + 400): a click at sample 8000 can only light frames
    48..50 (it sits at the zero edge of frame 50's Hann window); the rest stay at log(offset)."""
    waves = torch.zeros(1, 16000)
    waves[0, 8000] = 1.0
    energy = feature_extractor()(waves)[0].max(dim=1).values
    lit = set(torch.nonzero(energy > np.log(1e-6) + 1e-3).flatten().tolist())
    assert {48, 49} <= lit <= {48, 49, 50}


def test_load_features_normalized_with_train_stats(tree: Path, tmp_path: Path) -> None:
    sets = load_features(tree, cache_dir=tmp_path / "cache", progress=False)
    index = build_index(tree)
    assert {k: len(v) for k, v in sets.items()} == {k: len(v) for k, v in index.items()}
    train, val = sets["train"], sets["val"]
    assert train.x.shape == (len(index["train"]), 99, 32) and train.x.dtype == torch.float32
    assert train.y.dtype == torch.int64 and train.class_names == class_names("google12")
    assert torch.allclose(train.x.mean(dim=(0, 1)), torch.zeros(32), atol=1e-4)
    assert torch.allclose(train.x.std(dim=(0, 1)), torch.ones(32), atol=1e-3)
    waves, _ = load_items([item for item, _ in index["val"]])
    raw = feature_extractor()(torch.from_numpy(waves))
    assert torch.allclose(val.x * train.std + train.mean, raw, atol=1e-4)
    assert val.y.tolist() == [y for _, y in index["val"]]


def test_second_call_uses_cache(tree: Path, tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    first = load_features(tree, cache_dir=cache, progress=False)
    assert len(list((cache / "features").glob("*.pt"))) == 1

    def refuse(cfg=None):
        raise AssertionError("features recomputed")

    monkeypatch.setattr(features, "feature_extractor", refuse)
    second = load_features(tree, cache_dir=cache, progress=False)
    assert torch.equal(first["test"].x, second["test"].x)
    clip = tree / "yes" / "aaaa0001_nohash_0.wav"
    os.utime(clip, ns=(clip.stat().st_atime_ns, clip.stat().st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="recomputed"):
        load_features(tree, cache_dir=cache, progress=False)  # a changed file -> new key


def test_unreadable_clip_is_skipped(tree: Path, tmp_path: Path) -> None:
    (tree / "yes" / "eeee0005_nohash_0.wav").write_bytes(b"RIFF\x00\x00")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        sets = load_features(tree, cache_dir=tmp_path / "cache", progress=False)
    assert len(sets["train"]) == len(build_index(tree)["train"]) - 1


def test_augment() -> None:
    x = torch.randn(4, 99, 32)
    assert torch.equal(augment(x), x)
    g = torch.Generator().manual_seed(0)
    y = augment(x, time_shift_frames=5, generator=g)
    assert y.shape == x.shape
    for i in range(4):  # each row is x shifted by some s in [-5, 5] with edges repeated
        assert any(torch.equal(y[i, 5:-5], x[i, 5 - s : 94 - s]) for s in range(-5, 6))
    z = augment(x, noise_std=0.1, generator=torch.Generator().manual_seed(1))
    assert 0.05 < (z - x).std() < 0.15

"""vision.data: shipped Fashion-MNIST subset, cached PNG tree, ImageFolder loading, errors."""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vision.data import (
    ASSET,
    FASHION_CLASSES,
    UnreadableImageError,
    build_datasets,
    build_subset_from_idx,
    ensure_fashion_mnist_tree,
    read_idx,
)


def test_shipped_subset_is_small_and_balanced() -> None:
    assert ASSET.is_file()
    assert ASSET.stat().st_size <= 5 * 1024 * 1024
    assert (ASSET.parent / "LICENSE-fashion-mnist.txt").is_file()
    with np.load(ASSET) as npz:
        assert npz["x_train"].shape == (5000, 28, 28) and npz["x_train"].dtype == np.uint8
        assert npz["x_test"].shape == (1000, 28, 28)
        assert np.bincount(npz["y_train"], minlength=10).tolist() == [500] * 10
        assert np.bincount(npz["y_test"], minlength=10).tolist() == [100] * 10
        assert len(np.unique(npz["train_index"])) == 5000
        assert tuple(npz["classes"]) == FASHION_CLASSES


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}i", *arr.shape)
    path.write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes()))


def test_build_subset_from_idx_roundtrip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for prefix, n in (("train", 60), ("t10k", 30)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    assert read_idx(tmp_path / "train-labels-idx1-ubyte.gz").shape == (60,)
    out = build_subset_from_idx(tmp_path, tmp_path / "s.npz", per_class_train=4, per_class_test=2)
    with np.load(out) as npz:
        x = read_idx(tmp_path / "train-images-idx3-ubyte.gz")
        assert np.array_equal(npz["x_train"], x[npz["train_index"]])
        assert np.bincount(npz["y_train"]).tolist() == [4] * 10
        assert npz["x_test"].shape == (20, 28, 28)


def test_default_dataset_goes_through_cached_tree(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("STRLOWRANK_CACHE", str(tmp_path))
    root = ensure_fashion_mnist_tree()
    assert root == tmp_path / "fashion_mnist_subset"
    for split, n in (("train", 500), ("val", 100)):
        folders = sorted(p for p in (root / split).iterdir())
        assert [p.name for p in folders] == list(FASHION_CLASSES)
        assert all(len(list(p.glob("*.png"))) == n for p in folders)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no temp dir left
    assert ensure_fashion_mnist_tree() == root  # second call: marker found, nothing rewritten
    train, val, num_classes, in_chans = build_datasets("fashion_mnist", None, 32)
    assert (len(train), len(val), num_classes, in_chans) == (5000, 1000, 10, 1)
    x, y = val[0]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and y == 0
    index = int(Path(val.samples[0][0]).stem)  # files are named by their row in the npz
    with np.load(ASSET) as npz:  # padding 28 -> 32 keeps the pixels (val has no augmentation)
        assert npz["y_test"][index] == 0
        first = torch.from_numpy(npz["x_test"][index] / 255.0).float()
    assert torch.allclose(x[0, 2:30, 2:30] * 0.3530 + 0.2860, first, atol=1e-5)


def _tiny_tree(root: Path) -> None:
    """train/ and val/ with two classes; RGB, grayscale, RGBA and palette PNGs/JPEGs."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            d = root / split / c
            d.mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(d / "rgb.png")
            Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(d / "gray.png")
            rgba = rng.integers(0, 256, (18, 18, 4), dtype=np.uint8)
            Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
            Image.fromarray(rgba[..., :3]).save(d / "photo.jpg")
            Image.new("P", (10, 12)).save(d / "palette.png")


def test_imagefolder_loads_mixed_modes(tmp_path: Path) -> None:
    _tiny_tree(tmp_path)
    train, val, num_classes, in_chans = build_datasets("imagefolder", str(tmp_path), 16)
    assert (len(train), len(val), num_classes, in_chans) == (10, 10, 2, 3)
    assert all(val[i][0].shape == (3, 16, 16) for i in range(len(val)))
    assert all(train[i][0].shape == (3, 16, 16) for i in range(len(train)))
    train, val, _, in_chans = build_datasets("imagefolder", tmp_path, 8, grayscale=True)
    assert in_chans == 1 and train[0][0].shape == (1, 8, 8)
    train, val, num_classes, in_chans = build_datasets("imagenet", tmp_path, 24)
    assert val[3][0].shape == (3, 24, 24) and val.classes == ["cat", "dog"]


def test_unreadable_image_is_named_or_skipped(tmp_path: Path) -> None:
    _tiny_tree(tmp_path)
    bad = tmp_path / "train" / "dog" / "broken.png"
    bad.write_bytes((tmp_path / "train" / "dog" / "rgb.png").read_bytes()[:60])  # truncated
    train, _, _, _ = build_datasets("imagefolder", tmp_path, 16)
    index = [p for p, _ in train.samples].index(str(bad))
    with pytest.raises(UnreadableImageError, match="broken.png"):
        train[index]
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        train, _, _, _ = build_datasets("imagefolder", tmp_path, 16, skip_bad_images=True)
    assert len(train) == 10 and len(train.targets) == 10


def test_clear_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match=f"data directory {missing} does not exist"):
        build_datasets("imagefolder", missing, 32)
    with pytest.raises(ValueError, match="does not exist"):
        build_datasets("cifar10", missing, 32)
    with pytest.raises(ValueError, match="CIFAR-10 not found"):
        build_datasets("cifar10", tmp_path, 32)
    (tmp_path / "c" / "cifar-10-batches-py").mkdir(parents=True)
    with pytest.raises(ValueError, match="incomplete or corrupted"):
        build_datasets("cifar10", tmp_path / "c", 32)
    with pytest.raises(ValueError, match="needs a data directory"):
        build_datasets("imagenet", None, 224)
    with pytest.raises(ValueError, match="unknown dataset"):
        build_datasets("mnist", tmp_path, 28)
    _tiny_tree(tmp_path / "t")
    (tmp_path / "t" / "val" / "dog").rename(tmp_path / "t" / "val" / "wolf")
    with pytest.raises(ValueError, match="class folders differ"):
        build_datasets("imagefolder", tmp_path / "t", 16)
    (tmp_path / "t" / "train" / "empty").mkdir()
    with pytest.raises(ValueError, match="empty holds no image files"):
        build_datasets("imagefolder", tmp_path / "t", 16)
    (tmp_path / "t" / "train" / "empty").rmdir()
    shutil.rmtree(tmp_path / "t" / "val")
    with pytest.raises(ValueError, match=r"missing split folder .*val"):
        build_datasets("imagefolder", tmp_path / "t", 16)

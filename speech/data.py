"""Speech Commands layout: split index, labels and WAV loading (Google-12, docs/SPEECH_DATA.md).

A tree in the layout of Google Speech Commands v0.01 / v0.02::

    <root>/<word>/<speaker>_nohash_<n>.wav    one utterance, <= 1 s at 16 kHz
    <root>/_background_noise_/*.wav           long noise recordings
    <root>/validation_list.txt                paths relative to root, one a line
    <root>/testing_list.txt

Files named in a list belong to that split, every other utterance is training data. The
Google-12 task has 12 classes: ``_silence_``, ``_unknown_`` and the ten keywords. As in the
TensorFlow reference recipe (which gives the 22,246 / 3,081 train / test counts quoted by the
FastGRNN paper), each split keeps a random ``unknown_fraction`` of unknown-word clips and adds
``silence_fraction`` silence clips, both relative to the split's keyword count. A silence item is
a 1 s cut of a background file, written as ``"<path>#start=<sample>"`` (see `silence_item`).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
from scipy.io import wavfile

SAMPLE_RATE = 16000
CLIP_SAMPLES = 16000
BACKGROUND_DIR = "_background_noise_"
SILENCE = "_silence_"
UNKNOWN = "_unknown_"
VALIDATION_LIST = "validation_list.txt"
TESTING_LIST = "testing_list.txt"
SPLITS = ("train", "val", "test")
GOOGLE12_KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
V1_OTHER_WORDS = (
    "bed",
    "bird",
    "cat",
    "dog",
    "eight",
    "five",
    "four",
    "happy",
    "house",
    "marvin",
    "nine",
    "one",
    "seven",
    "sheila",
    "six",
    "three",
    "tree",
    "two",
    "wow",
    "zero",
)
V2_EXTRA_WORDS = ("backward", "follow", "forward", "learn", "visual")
TASKS = ("google12", "all35")
_START = "#start="
_MAX_WARNINGS = 10


class DataError(ValueError):
    """A data directory, split list or audio file that cannot be used; the message names it."""


def class_names(task: str = "google12") -> list[str]:
    """Class names in label order: google12 is [_silence_, _unknown_, yes, ..., go] (12);
    all35 is the 35 words of Speech Commands v0.02 in alphabetical order (v0.01 has 30 of them)."""
    if task == "google12":
        return [SILENCE, UNKNOWN, *GOOGLE12_KEYWORDS]
    if task == "all35":
        return sorted(GOOGLE12_KEYWORDS + V1_OTHER_WORDS + V2_EXTRA_WORDS)
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def silence_item(path: str | Path, start: int) -> str:
    """Item string for the 1 s cut of background file `path` starting at 16 kHz sample `start`."""
    return f"{path}{_START}{int(start)}"


def split_item(item: str) -> tuple[str, int | None]:
    """Inverse of `silence_item`: (path, start sample) for a silence cut, (path, None) otherwise."""
    path, sep, start = item.rpartition(_START)
    if sep and start.isdigit():
        return path, int(start)
    return item, None


def _to_float(data: np.ndarray) -> np.ndarray:
    """PCM samples of any WAV dtype -> float32 in [-1, 1]; 24-bit arrives left-aligned in int32."""
    if data.dtype == np.uint8:
        return (data.astype(np.float32) - 128.0) / 128.0
    if np.issubdtype(data.dtype, np.integer):
        return data.astype(np.float32) / float(-np.iinfo(data.dtype).min)
    return data.astype(np.float32)


def read_wav(path: str | Path) -> np.ndarray:
    """Whole WAV file as mono float32 at 16 kHz, shape [L] (any length).

    Accepts 8/16/24/32-bit integer and float data at any sample rate (resampled with a polyphase
    filter); stereo is averaged to mono. Raises `DataError` naming the file when it is missing,
    corrupt, truncated or empty."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            rate, data = wavfile.read(path)
        except Exception as exc:  # corrupt headers raise ValueError, struct.error, OSError, ...
            raise DataError(f"{path}: cannot read WAV file ({exc})") from exc
    for w in caught:
        if "EOF" in str(w.message) or "truncat" in str(w.message).lower():
            raise DataError(f"{path}: truncated WAV file ({w.message})")
    if data.size == 0:
        raise DataError(f"{path}: WAV file holds no samples")
    x = _to_float(np.asarray(data))
    if x.ndim == 2:
        x = x.mean(axis=1)
    if rate != SAMPLE_RATE:
        from scipy.signal import resample_poly  # 1 s to import; only other sample rates need it

        g = math.gcd(int(rate), SAMPLE_RATE)
        x = resample_poly(x, SAMPLE_RATE // g, int(rate) // g).astype(np.float32)
    return np.ascontiguousarray(x, dtype=np.float32)


def fix_length(x: np.ndarray, n: int = CLIP_SAMPLES) -> np.ndarray:
    """Zero-pad at the end or crop the end so that x has exactly n samples: [L] -> [n]."""
    if len(x) >= n:
        return x[:n]
    return np.pad(x, (0, n - len(x)))


def load_wav(path: str | Path) -> np.ndarray:
    """One clip as float32 at 16 kHz, exactly 16000 samples [16000] (padded or cropped)."""
    return fix_length(read_wav(path))


def load_items(
    items: list[str], on_error: str = "skip", errors: list[str] | None = None
) -> tuple[np.ndarray, list[int]]:
    """Load index items (clip paths or silence cuts) -> (waves [N, 16000] float32, kept positions).

    With ``on_error="skip"`` unreadable files are left out: their messages are appended to
    `errors` when a list is given (the caller reports them), else warned about here (the first
    ten, then a count). ``on_error="raise"`` raises the `DataError` instead."""
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', not {on_error!r}")
    background: dict[str, np.ndarray] = {}
    waves, kept, bad = [], [], []
    for i, item in enumerate(items):
        path, start = split_item(item)
        try:
            if start is None:
                waves.append(load_wav(path))
            else:
                if path not in background:
                    background[path] = read_wav(path)
                waves.append(fix_length(background[path][start : start + CLIP_SAMPLES]))
            kept.append(i)
        except DataError as exc:
            if on_error == "raise":
                raise
            bad.append(str(exc))
    if errors is not None:
        errors.extend(bad)
    else:
        for msg in bad[:_MAX_WARNINGS]:
            warnings.warn(f"skipping unreadable file: {msg}", stacklevel=2)
        if bad:
            warnings.warn(f"skipped {len(bad)} unreadable file(s) of {len(items)}", stacklevel=2)
    out = np.stack(waves) if waves else np.zeros((0, CLIP_SAMPLES), np.float32)
    return out, kept


def _read_split_list(path: Path) -> set[str]:
    """Relative paths named by a split list; a missing or malformed list raises `DataError`."""
    if not path.is_file():
        raise DataError(f"{path}: split list is missing")
    names = set()
    text = path.read_text(encoding="utf-8", errors="replace")
    for n, line in enumerate(text.splitlines(), start=1):
        entry = line.strip().replace("\\", "/")
        if not entry:
            continue
        parts = entry.split("/")
        if len(parts) != 2 or not entry.lower().endswith(".wav") or ".." in parts or "" in parts:
            raise DataError(f"{path}:{n}: malformed entry {line!r}, expected '<word>/<file>.wav'")
        names.add(entry)
    return names


def _split_lists(root: Path, allow_no_split: bool) -> tuple[set[str], set[str]]:
    """(validation names, testing names); both lists missing is allowed only with allow_no_split."""
    val_path, test_path = root / VALIDATION_LIST, root / TESTING_LIST
    if not val_path.exists() and not test_path.exists():
        if allow_no_split:
            return set(), set()
        raise DataError(
            f"{root}: neither {VALIDATION_LIST} nor {TESTING_LIST} found "
            "(pass allow_no_split=True to use every file for training)"
        )
    return _read_split_list(val_path), _read_split_list(test_path)


def _scan_words(root: Path) -> dict[str, list[str]]:
    """Word folder -> sorted relative paths of its WAV files; empty folders are warned about."""
    words = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if folder.name == BACKGROUND_DIR or folder.name.startswith("."):
            continue
        files = sorted(f"{folder.name}/{f.name}" for f in folder.glob("*.wav") if f.is_file())
        if not files:
            warnings.warn(f"ignoring empty class folder {folder}", stacklevel=3)
            continue
        words[folder.name] = files
    return words


def _label_of(word: str, task: str, names: list[str]) -> int | None:
    """Label of a word folder for the task; None for a word the task does not use."""
    if task == "google12":
        return names.index(word) if word in GOOGLE12_KEYWORDS else names.index(UNKNOWN)
    return names.index(word) if word in names else None


def _background_lengths(root: Path) -> dict[str, int]:
    """Background file path -> length in 16 kHz samples; unreadable or short files are skipped."""
    folder = root / BACKGROUND_DIR
    lengths = {}
    for f in sorted(folder.glob("*.wav")) if folder.is_dir() else []:
        try:
            n = len(read_wav(f))
        except DataError as exc:
            warnings.warn(f"skipping background file: {exc}", stacklevel=3)
            continue
        if n >= CLIP_SAMPLES:
            lengths[str(f)] = n
    return lengths


def _silence_items(lengths: dict[str, int], n: int, rng: np.random.Generator) -> list[str]:
    """n random 1 s cuts (item strings) of the background files, sampled uniformly per file."""
    if n <= 0 or not lengths:
        return []
    paths = sorted(lengths)
    items = []
    for k in rng.integers(0, len(paths), size=n):
        path = paths[int(k)]
        start = int(rng.integers(0, lengths[path] - CLIP_SAMPLES + 1))
        items.append(silence_item(path, start))
    return items


def _assign_splits(
    root: Path, words: dict[str, list[str]], val: set[str], test: set[str], task: str
) -> dict[str, list[tuple[str, int]]]:
    """Labelled clip items per split from the word folders and the split lists."""
    names = class_names(task)
    index: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    for word, files in words.items():
        label = _label_of(word, task, names)
        if label is None:
            warnings.warn(f"{root / word}: not a {task} word, ignored", stacklevel=3)
            continue
        for rel in files:
            split = "val" if rel in val else "test" if rel in test else "train"
            index[split].append((str(root / rel), label))
    found = {rel for files in words.values() for rel in files}
    for list_name, names_in_list in ((VALIDATION_LIST, val), (TESTING_LIST, test)):
        missing = len(names_in_list - found)
        if missing:
            warnings.warn(f"{root / list_name}: {missing} listed file(s) not found", stacklevel=3)
    return index


def build_index(
    root: str | Path,
    task: str = "google12",
    silence_fraction: float = 0.1,
    unknown_fraction: float | None = 0.1,
    seed: int = 0,
    allow_no_split: bool = False,
) -> dict[str, list[tuple[str, int]]]:
    """Labelled items per split: {"train"|"val"|"test": [(item, label), ...]}.

    Split membership comes from validation_list.txt / testing_list.txt. For google12 each split
    keeps round(unknown_fraction * n_keyword) random unknown-word clips (None keeps them all) and
    gets round(silence_fraction * n_keyword) silence cuts of the background files; all35 has
    neither. Items are clip paths or `silence_item` strings; labels index `class_names(task)`."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data directory does not exist")
    val, test = _split_lists(root, allow_no_split)
    words = _scan_words(root)
    if not words:
        raise DataError(f"{root}: no class folders with WAV files")
    index = _assign_splits(root, words, val, test, task)
    if task != "google12":
        return index
    unknown, lengths = class_names(task).index(UNKNOWN), _background_lengths(root)
    if silence_fraction > 0 and not lengths:
        warnings.warn(f"{root / BACKGROUND_DIR}: no usable background files", stacklevel=2)
    for k, split in enumerate(SPLITS):
        rng = np.random.default_rng([seed, k])
        items = index[split]
        n_keyword = sum(1 for _, y in items if y != unknown)
        unknowns = [it for it in items if it[1] == unknown]
        if unknown_fraction is not None:
            n_keep = min(len(unknowns), round(unknown_fraction * n_keyword))
            keep = sorted(rng.choice(len(unknowns), size=n_keep, replace=False).tolist())
            unknowns = [unknowns[i] for i in keep]
        silence = _silence_items(lengths, round(silence_fraction * n_keyword), rng)
        index[split] = [it for it in items if it[1] != unknown] + unknowns
        index[split] += [(s, class_names(task).index(SILENCE)) for s in silence]
    return index

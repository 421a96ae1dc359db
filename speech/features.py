"""Log-mel / MFCC features for 1 s keyword clips, normalized and cached (docs/SPEECH_DATA.md).

The Google-12 protocol of the FastGRNN paper: 32 log-mel filterbank energies from 25 ms windows
every 10 ms, which gives 99 frames for 16,000 samples (frames = 1 + ceil((L - win) / hop), the
last window zero-padded as python_speech_features does), then zero mean and unit variance per
feature dimension with statistics of the training split only.

This is the only module of the project that imports torchaudio (a fragile dependency); it does
so inside `feature_extractor`, so importing the module costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from speech.data import (
    DataError,
    build_index,
    class_names,
    load_items,
    split_item,
)
from strlowrank.method.cache import cache_lock, cache_root, temp_siblings, write_atomic
from strlowrank.training.config import option

CACHE_FORMAT = 1
FEATURE_KINDS = ("logmel", "mfcc")


@dataclass
class FeatureConfig:
    """Front end of the keyword models; the defaults give [99, 32] log-mel frames per clip."""

    kind: str = option(
        "logmel", "logmel | mfcc (DCT-II of the log-mel energies)", choices=FEATURE_KINDS
    )
    n_mels: int = option(32, "mel filterbank channels", min=1)
    win_ms: float = option(25.0, "analysis window (Hann) in ms, also the FFT size", min=1.0)
    hop_ms: float = option(10.0, "frame step in ms", min=1.0)
    n_mfcc: int = option(13, "cepstral coefficients kept when kind is mfcc", min=1)
    sample_rate: int = option(16000, "audio sample rate in Hz (clips are resampled to it)", min=1)
    f_min: float = option(20.0, "lowest filterbank frequency, Hz", min=0.0)
    f_max: float | None = option(None, "highest filterbank frequency, Hz (null: Nyquist)", min=1.0)
    log_offset: float = option(1e-6, "log(mel power + log_offset)", min=0.0)

    def __post_init__(self) -> None:
        if self.kind not in FEATURE_KINDS:
            raise ValueError(f"feature kind must be one of {FEATURE_KINDS}, not {self.kind!r}")
        if self.kind == "mfcc" and not 0 < self.n_mfcc <= self.n_mels:
            raise ValueError(f"n_mfcc must be in [1, n_mels={self.n_mels}], not {self.n_mfcc}")

    @property
    def win_length(self) -> int:
        return round(self.sample_rate * self.win_ms / 1000)

    @property
    def hop_length(self) -> int:
        return round(self.sample_rate * self.hop_ms / 1000)

    @property
    def n_features(self) -> int:
        """F, the feature dimension."""
        return self.n_mfcc if self.kind == "mfcc" else self.n_mels

    def n_frames(self, n_samples: int = 16000) -> int:
        """T = 1 + ceil((n_samples - win) / hop): 99 for 1 s at 16 kHz, 25 ms, 10 ms."""
        return 1 + max(0, math.ceil((n_samples - self.win_length) / self.hop_length))


@dataclass
class FeatureSet:
    """Features of one split: x [N, T, F] float32 (normalized), y [N] int64 labels, the class
    names, and the training mean / std [F] that were used to normalize x."""

    x: torch.Tensor
    y: torch.Tensor
    class_names: list[str]
    mean: torch.Tensor
    std: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


def feature_extractor(cfg: FeatureConfig | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function mapping waves [N, L] float (16 kHz, [-1, 1]) to features [N, T, F] float32.

    Each window of win_length samples starts hop_length after the previous one; the signal end
    is zero-padded so the last window is complete. log-mel = log(mel power + log_offset)."""
    import torchaudio  # the only torchaudio import of the project

    cfg = cfg or FeatureConfig()
    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate=cfg.sample_rate,
        n_fft=cfg.win_length,
        win_length=cfg.win_length,
        hop_length=cfg.hop_length,
        f_min=cfg.f_min,
        f_max=cfg.f_max,
        n_mels=cfg.n_mels,
        power=2.0,
        center=False,
    )
    dct = None
    if cfg.kind == "mfcc":
        dct = torchaudio.functional.create_dct(cfg.n_mfcc, cfg.n_mels, norm="ortho")

    def extract(waves: torch.Tensor) -> torch.Tensor:
        waves = torch.as_tensor(waves, dtype=torch.float32)
        n_frames = cfg.n_frames(waves.shape[-1])
        pad = (n_frames - 1) * cfg.hop_length + cfg.win_length - waves.shape[-1]
        spec = mel.to(waves.device)(torch.nn.functional.pad(waves, (0, max(pad, 0))))
        feats = torch.log(spec + cfg.log_offset).transpose(-1, -2)  # [N, T, n_mels]
        return feats @ dct.to(feats.device) if dct is not None else feats

    return extract


def augment(
    x: torch.Tensor,
    time_shift_frames: int = 0,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Feature-domain training augmentation of a batch [N, T, F] -> [N, T, F] (identity with the
    defaults): each example moves by a random whole number of frames in [-s, s] (edge frames
    repeat), then Gaussian noise of std noise_std is added (features are unit-variance)."""
    device = generator.device if generator is not None else x.device
    if time_shift_frames > 0:
        n, t, _ = x.shape
        s = int(time_shift_frames)
        shift = torch.randint(-s, s + 1, (n, 1), generator=generator, device=device).to(x.device)
        idx = (torch.arange(t, device=x.device) - shift).clamp(0, t - 1)  # [N, T]
        x = torch.gather(x, 1, idx[:, :, None].expand_as(x))
    if noise_std > 0:
        noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
        x = x + noise_std * noise.to(x.device)
    return x


def cache_key(
    index: dict[str, list[tuple[str, int]]], task: str, cfg: FeatureConfig, params: dict
) -> str:
    """Hash of the labelled items with each file's size and mtime, the task, the feature config
    and the index parameters: any change to data or settings gives a new cache file."""
    h = hashlib.sha256()
    head = {"format": CACHE_FORMAT, "task": task, "features": asdict(cfg), "params": params}
    h.update(json.dumps(head, sort_keys=True).encode())
    stats: dict[str, str] = {}
    for split, items in sorted(index.items()):
        for item, label in items:
            path = split_item(item)[0]
            if path not in stats:
                st = os.stat(path)
                stats[path] = f"{st.st_size}:{st.st_mtime_ns}"
            h.update(f"{split}\t{item}\t{label}\t{stats[path]}\n".encode())
    return h.hexdigest()[:24]


def _extract_splits(
    index: dict[str, list[tuple[str, int]]], cfg: FeatureConfig, progress: bool, batch: int
) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """Raw features per split {split: {"x": [N, T, F], "y": [N]}} and the unreadable files."""
    from tqdm.auto import tqdm

    extract, errors, out = feature_extractor(cfg), [], {}
    total = sum(len(items) for items in index.values())
    with tqdm(total=total, unit="clip", desc="features", disable=not progress) as bar:
        for split, items in index.items():
            xs, ys = [torch.zeros(0, cfg.n_frames(), cfg.n_features)], []
            for i in range(0, len(items), batch):
                chunk = items[i : i + batch]
                waves, kept = load_items([item for item, _ in chunk], errors=errors)
                with torch.no_grad():
                    xs.append(extract(torch.from_numpy(waves)))
                ys += [chunk[k][1] for k in kept]
                bar.update(len(chunk))
            out[split] = {"x": torch.cat(xs), "y": torch.tensor(ys, dtype=torch.int64)}
    return out, errors


def _warn_skipped(errors: list[str], total: int) -> None:
    for msg in errors[:10]:
        warnings.warn(f"skipping unreadable file: {msg}", stacklevel=3)
    if errors:
        warnings.warn(f"skipped {len(errors)} unreadable file(s) of {total}", stacklevel=3)


def _read_cache(path: Path) -> dict | None:
    """The cached features at path, or None when the file is missing, unreadable or of an older
    format (warned about)."""
    if not path.is_file():
        return None
    try:
        data = torch.load(path, weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        warnings.warn(f"recomputing features: unreadable cache {path} ({exc})", stacklevel=3)
        return None
    return data if data.get("format") == CACHE_FORMAT else None


def _compute_cache(
    index: dict[str, list[tuple[str, int]]], task: str, cfg: FeatureConfig, progress: bool
) -> dict:
    """Extract, normalize with training statistics and pack into a plain dict (the cache file)."""
    splits, errors = _extract_splits(index, cfg, progress, batch=256)
    _warn_skipped(errors, sum(len(v) for v in index.values()))
    train = splits["train"]["x"]
    if len(train) == 0:
        raise DataError("no readable training clips: cannot compute normalization statistics")
    mean = train.mean(dim=(0, 1))
    std = train.std(dim=(0, 1)).clamp_min(1e-5)
    for part in splits.values():
        part["x"] = ((part["x"] - mean) / std).contiguous()
    return {
        "format": CACHE_FORMAT,
        "task": task,
        "class_names": class_names(task),
        "features": asdict(cfg),
        "mean": mean,
        "std": std,
        "splits": splits,
        "skipped": len(errors),
    }


def load_features(
    root: str | Path,
    task: str = "google12",
    feature_cfg: FeatureConfig | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    silence_fraction: float = 0.1,
    unknown_fraction: float | None = 0.1,
    seed: int = 0,
    allow_no_split: bool = False,
) -> dict[str, FeatureSet]:
    """Normalized features of a Speech Commands tree: {"train"|"val"|"test": FeatureSet}.

    Items come from `build_index` (same arguments). Features are computed once and cached as
    ``<cache_dir>/features/<key>.pt`` (cache_dir defaults to `cache_root()`; see `cache_key`);
    later calls load that file. Concurrent processes compute it once (`strlowrank.method.cache`).
    Unreadable clips are skipped with warnings and a count."""
    cfg = feature_cfg or FeatureConfig()
    root = Path(root).resolve()
    params = {
        "silence_fraction": silence_fraction,
        "unknown_fraction": unknown_fraction,
        "seed": seed,
        "allow_no_split": allow_no_split,
    }
    index = build_index(root, task, **params)
    key = cache_key(index, task, cfg, params)
    path = Path(cache_dir or cache_root()) / "features" / f"{key}.pt"
    data = _read_cache(path)
    if data is None:
        with cache_lock(path):  # one process computes, the others wait and read its file
            data = _read_cache(path)
            if data is None:
                for stale in temp_siblings(path):  # left by a process killed while writing
                    stale.unlink(missing_ok=True)
                data = _compute_cache(index, task, cfg, progress)
                write_atomic(path, lambda f: torch.save(data, f))
    names, mean, std = list(data["class_names"]), data["mean"], data["std"]
    return {
        split: FeatureSet(x=part["x"], y=part["y"], class_names=names, mean=mean, std=std)
        for split, part in data["splits"].items()
    }

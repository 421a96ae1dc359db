"""Checkpoints: one plain dict, written atomically, loaded with ``weights_only=True``.

A checkpoint holds model, optimizer, scheduler, scaler and callback states, the epoch and step
position, the RNG states and the config as a plain dict. It is written to a temporary file in the
same folder, flushed to disk and renamed over the old one, so a kill at any moment leaves the last
complete checkpoint intact. Loading never unpickles arbitrary objects. The random number
generators are seeded here (:func:`seed_everything`) and their states saved and restored with it.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from strlowrank.method.cache import temp_siblings, write_atomic


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, unsafe or of another model; names the file."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically (`strlowrank.method.cache.write_atomic`)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in temp_siblings(path):  # left by a kill during a write (rank 0 is the writer)
            stale.unlink(missing_ok=True)
        write_atomic(path, lambda f: torch.save(state, f))
    except OSError as e:
        raise OSError(e.errno, f"cannot write checkpoint {path}: {e.strerror or e}") from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely; any failure is a one-line :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle payloads, truncation, wrong format
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot be loaded safely ({first[:200]})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: not a strlowrank checkpoint (no 'model' entry)")
    return state


def load_model_state(model: torch.nn.Module, state_dict: dict, path: str | Path) -> None:
    """Load weights strictly; a checkpoint of another model or shape gets a one-line error."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    extra = sorted(set(state_dict) - set(own))
    if missing or extra:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
        raise CheckpointError(f"{path}: checkpoint is for another model ({what})")
    for k, v in state_dict.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(
                f"{path}: checkpoint is for another model ({k}: shape {tuple(v.shape)} "
                f"vs {tuple(own[k].shape)})"
            )
    model.load_state_dict(state_dict)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch; call before building the model."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) RNG states as weights_only-loadable values."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states saved by :func:`rng_state`."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

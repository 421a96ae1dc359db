"""How the core reaches a track: through the track's modules, named at run time.

A track is a top-level package beside ``strlowrank`` (the core names none: a track's name comes
from the user, ``python -m strlowrank.sweep --track NAME``, or from a run's summary.json). The
core looks up two parts of it, both optional:

    <track>.ENTRY_POINT     the module name of its training entry point (default: <track>.train);
                            the sweep runs that module's file, ``python <file> --out DIR ...``
    <track>.report          its part of ``python -m strlowrank.report``: a function
                            ``write(summary, out) -> list[Path]`` (:class:`ReportPart`) that
                            gets the track's rows of ``analysis.summaries`` and the report folder,
                            writes its own tables and figures there and returns the PNGs

Its protocol (grids, baselines, paired tables) lives in the track; the core offers the
mechanisms (sweep, aggregate, plot) and these two doors.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Protocol

import pandas as pd


class ReportPart(Protocol):
    """``<track>.report``: what a track adds to a report."""

    def write(self, summary: pd.DataFrame, out: Path) -> list[Path]: ...


def _package(track: str) -> ModuleType | None:
    """The track's top-level package, None when ``track`` names none."""
    if not track.isidentifier():
        return None
    try:
        return importlib.import_module(track)
    except ModuleNotFoundError as e:
        if e.name == track:
            return None
        raise


def track_module(track: str, part: str) -> ModuleType | None:
    """``<track>.<part>`` imported, None when the track or that module does not exist (an
    ImportError inside an existing module is raised)."""
    if _package(track) is None:
        return None
    try:
        return importlib.import_module(f"{track}.{part}")
    except ModuleNotFoundError as e:
        if e.name == f"{track}.{part}":
            return None
        raise


def report_part(track: str) -> ReportPart | None:
    """The track's report module (``<track>.report`` with a ``write``), else None."""
    module = track_module(track, "report")
    return module if module is not None and hasattr(module, "write") else None


def entry_script(track: str) -> Path:
    """The file of a track's training entry point (``ENTRY_POINT``, else ``<track>.train``),
    found without running it; ValueError when the track or its entry point does not exist."""
    package = _package(track)
    if package is None:
        raise ValueError(f"unknown track {track!r}: no top-level package of that name")
    name = getattr(package, "ENTRY_POINT", f"{track}.train")
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ValueError(f"track {track!r}: no entry point module {name}")
    return Path(spec.origin)

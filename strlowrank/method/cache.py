"""On-disk caches that many processes may build and read at once.

Three rules, one function each:

- `cache_root()`: where caches live, ``$STRLOWRANK_CACHE`` else ``~/.cache/strlowrank``.
- `write_atomic(path, data)`: a file is written to a temporary sibling, flushed to disk and
  renamed over ``path``, so a reader sees the old file or the new one, never a partial one.
- `build_once(target, build, key)`: a folder built once. Under an inter-process lock
  (``.<name>.lock`` next to the target, `filelock`), ``build(tmp)`` fills a temporary sibling
  ``.<name>.tmp-*``, a marker ``.complete`` holding ``key`` is written into it last, and the
  folder is renamed into place. A reader therefore sees nothing or a complete tree; a process
  that finds a build in progress waits for the lock and then reuses the result; a builder
  killed halfway leaves only a temporary sibling (and a released lock: the kernel drops it with
  the process), which the next builder deletes before building again.

`cache_lock(path)` is the same lock for a single cache file (compute it once, write it with
`write_atomic`, let the others wait and read it).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from filelock import FileLock, Timeout

MARKER = ".complete"


def cache_root() -> Path:
    """Root of the on-disk caches: ``$STRLOWRANK_CACHE`` if set, else ``~/.cache/strlowrank``."""
    env = os.environ.get("STRLOWRANK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "strlowrank"


def temp_siblings(path: Path) -> list[Path]:
    """Temporary files or folders that `write_atomic` or `build_once` make next to ``path``
    (what a killed writer leaves behind)."""
    return sorted(path.parent.glob(f".{path.name}.tmp-*"))


def write_atomic(path: str | Path, data: str | bytes | Callable[[IO[bytes]], None]) -> None:
    """Write ``data`` (text as UTF-8, bytes, or a function that writes to a binary file, e.g.
    ``lambda f: torch.save(obj, f)``) to ``path`` atomically: temporary sibling, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; caches and run files are ordinary data
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def cache_lock(path: str | Path) -> Iterator[None]:
    """Hold the inter-process lock of ``path`` (the file ``.<name>.lock`` next to it); says on
    stderr when it has to wait for another process."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path.with_name(f".{path.name}.lock")))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"waiting for another process to build {path}", file=sys.stderr, flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def is_built(target: str | Path, key: str = "") -> bool:
    """True when ``target`` is a folder completed by `build_once` with this ``key``."""
    marker = Path(target) / MARKER
    try:
        return marker.read_text(encoding="utf-8").strip() == key.strip()
    except OSError:
        return False


def build_once(target: str | Path, build: Callable[[Path], None], key: str = "") -> Path:
    """The folder ``target``, built by ``build(tmp)`` unless a complete one with this ``key``
    exists (see the module docstring). An existing folder without the marker or with another
    key is replaced. Returns ``target``."""
    target = Path(target)
    if is_built(target, key):
        return target
    with cache_lock(target):
        if is_built(target, key):  # built by the process we waited for
            return target
        for stale in temp_siblings(target):  # left by a killed builder
            _remove(stale)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            os.chmod(tmp, 0o755)  # mkdtemp makes it private
            build(tmp)
            write_atomic(tmp / MARKER, key.strip() + "\n")
            if target.exists() or target.is_symlink():  # incomplete, or built with another key
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-old-", dir=target.parent))
                os.replace(target, old / target.name)
                _remove(old)
            os.replace(tmp, target)
        finally:
            _remove(tmp)
    return target


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)

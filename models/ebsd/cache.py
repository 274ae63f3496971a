"""liveindex's on-disk cache: what is in it, clearing it, and a size limit.

Under ``cache_root()`` (``LIVEINDEX_CACHE``, default ``~/.cache/liveindex``):

- ``dictionaries/``: template dictionaries (dictionary.py), one per phase, detector geometry,
  sampling and signal mask, 30-140 MB each, built on demand in about 15 s. Every new PC
  (``liveindex calibrate``, ``--refine-pc``, another microscope session) makes one more, so
  the cache has a limit: ``LIVEINDEX_CACHE_LIMIT_GB`` (default ``DEFAULT_LIMIT_GB``). After a
  dictionary is built, the least recently used others are removed until the cache fits,
  never one in use.
- ``master_patterns/``: kinematical master patterns computed for phases without a shipped
  one (1 MB each, seconds to compute).
- ``network_codebooks/``: the network bundle's code book (67 MB, about 30 s to build).

In use: a process that loads a dictionary holds a shared ``flock`` on its ``<key>.lock`` for
as long as it keeps it (the lock goes with the open file); its build holds the exclusive lock,
so one process builds a key while the others wait, as before. Eviction and ``liveindex cache
clear`` take the exclusive lock without waiting and skip what they cannot get. Lock files stay
(empty): removing one while another process waits on it would let two processes build the
same key. A dictionary's ``last_used`` file is touched at each load.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

DEFAULT_LIMIT_GB = 5.0
LIMIT_ENV = "LIVEINDEX_CACHE_LIMIT_GB"
LAST_USED = "last_used"
KINDS = {  # folder -> what it holds
    "dictionaries": "template dictionaries: patterns simulated for one phase and detector geometry, rebuilt on "
                    "demand (about 15 s each); the least recently used go first when the cache is over its limit",
    "master_patterns": "kinematical master patterns computed for phases without a shipped one (seconds each)",
    "network_codebooks": "the network bundle's code book (about 30 s to rebuild)",
    "spot_templates": "spot-pattern template libraries (--modality spots), one per phase and setup, rebuilt on "
                      "demand; the least recently used go with the dictionaries when the cache is over its limit",
}
EVICTABLE = ("dictionaries", "spot_templates")  # rebuilt on demand, so the limit may remove them


def cache_root() -> Path:
    """The cache folder: ``LIVEINDEX_CACHE``, else ``$XDG_CACHE_HOME/liveindex``, else ``~/.cache/liveindex``
    (the rule dictionary.cache_dir and master_patterns follow)."""
    root = os.environ.get("LIVEINDEX_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "liveindex"
    return Path(root)


def limit_bytes() -> int:
    """The cache's size limit, from ``LIVEINDEX_CACHE_LIMIT_GB``; a value that is no positive
    number is reported once and the default used (a worker must not stop over it)."""
    text = os.environ.get(LIMIT_ENV)
    if text is None:
        return int(DEFAULT_LIMIT_GB * 1e9)
    try:
        value = float(text)
        if not value > 0:
            raise ValueError
    except ValueError:
        log.warning("%s=%r is not a positive number of gigabytes; the cache limit stays %g GB", LIMIT_ENV, text,
                    DEFAULT_LIMIT_GB)
        return int(DEFAULT_LIMIT_GB * 1e9)
    return int(value * 1e9)


class InUse:
    """A shared lock on a dictionary's lock file, held while the dictionary is in use."""

    def __init__(self, handle):
        self._handle = handle

    def release(self) -> None:
        if not self._handle.closed:
            self._handle.close()  # closing the file drops its flock

    def __del__(self):
        self.release()


def use_dictionary(folder: Path, build: Callable[[], None], ready: Callable[[], bool]) -> InUse:
    """Hold ``folder`` (a dictionary) in use, building it first where it is not ``ready``; after a
    build, the least recently used other dictionaries go until the cache fits its limit."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    handle = open(folder.parent / f"{folder.name}.lock", "a")
    built = False
    while True:
        fcntl.flock(handle, fcntl.LOCK_SH)
        if ready():
            break
        # Another process may be building it: wait for the exclusive lock, build if still
        # needed, and take the shared one again (a lock's change of kind is not atomic, so
        # the folder is checked again under the shared lock).
        fcntl.flock(handle, fcntl.LOCK_UN)
        fcntl.flock(handle, fcntl.LOCK_EX)
        if not ready():
            build()
            built = True
        fcntl.flock(handle, fcntl.LOCK_UN)
    _touch(folder / LAST_USED)
    in_use = InUse(handle)
    if built:
        enforce_limit(folder.parent.parent, keep=folder)
    return in_use


@dataclass
class Entry:
    kind: str  # a KINDS folder, or "other"
    path: Path
    size: int  # bytes
    last_used: float  # seconds since the epoch
    in_use: bool = False
    about: str = ""


def entries(root: Path | None = None) -> list[Entry]:
    """Everything in the cache, dictionaries one by one (with whether a process holds them)."""
    root = root or cache_root()
    found = []
    if not root.is_dir():
        return found
    for item in sorted(root.iterdir()):
        if item.name in KINDS and item.is_dir():
            for path in sorted(item.iterdir()):
                if path.name.endswith(".lock") or ".tmp" in path.name:
                    continue
                entry = Entry(item.name, path, _size(path), _last_used(path))
                if item.name == "dictionaries":
                    entry.in_use = _in_use(path)
                    entry.about = _describe_dictionary(path)
                found.append(entry)
        else:
            found.append(Entry("other", item, _size(item), _last_used(item)))
    return found


def enforce_limit(root: Path | None = None, *, keep: Path | None = None, limit: int | None = None) -> list[Path]:
    """Remove the least recently used dictionaries (never ``keep``, never one in use) until the
    cache is within ``limit`` bytes (default ``limit_bytes()``); returns what went."""
    root = root or cache_root()
    limit = limit_bytes() if limit is None else limit
    everything = entries(root)
    total = sum(e.size for e in everything)
    removed = []
    candidates = sorted((e for e in everything if e.kind in EVICTABLE and e.path != keep), key=lambda e: e.last_used)
    for entry in candidates:
        if total <= limit:
            break
        if _evict(entry):
            total -= entry.size
            removed.append(entry.path)
            log.info("cache over its %.1f GB limit (%s): removed the least recently used %s %s (%.0f MB, "
                     "last used %s)", limit / 1e9, LIMIT_ENV, entry.kind.rstrip("s").replace("_", " "),
                     entry.path.name, entry.size / 1e6,
                     time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used)))
    if total > limit:
        log.warning("the cache holds %.2f GB, over its %.1f GB limit (%s), with nothing more it may remove "
                    "(dictionaries in use, master patterns, code books): raise the limit or run liveindex cache clear",
                    total / 1e9, limit / 1e9, LIMIT_ENV)
    return removed


def clear(kinds, root: Path | None = None) -> tuple[list[Entry], list[Entry]]:
    """Remove every entry of ``kinds`` (KINDS folders); returns (removed, kept because in use)."""
    removed, kept = [], []
    for entry in entries(root):
        if entry.kind not in kinds:
            continue
        if entry.kind == "dictionaries":
            (removed if _remove_dictionary(entry.path) else kept).append(entry)
        else:
            _remove(entry.path)
            removed.append(entry)
    return removed, kept


def describe(root: Path | None = None) -> str:
    """The cache as ``liveindex cache`` prints it."""
    root = root or cache_root()
    found = entries(root)
    total = sum(e.size for e in found)
    source = "LIVEINDEX_CACHE" if os.environ.get("LIVEINDEX_CACHE") else "set LIVEINDEX_CACHE to move it"
    lines = [f"liveindex cache: {root} ({source}): {_mb(total)} of its {limit_bytes() / 1e9:g} GB limit ({LIMIT_ENV})"]
    for kind, about in KINDS.items():
        mine = [e for e in found if e.kind == kind]
        lines.append(f"  {kind + '/':20s} {_mb(sum(e.size for e in mine)):>9s}  {len(mine)} item(s): {about}")
        if kind == "dictionaries":
            for e in sorted(mine, key=lambda e: -e.last_used):
                used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
                lines.append(f"      {e.path.name:40s} {_mb(e.size):>9s}  last used {used}"
                             f"{'  IN USE' if e.in_use else ''}  {e.about}")
    for e in (e for e in found if e.kind == "other"):
        lines.append(f"  {e.path.name:20s} {_mb(e.size):>9s}  not liveindex's: left alone")
    lines.append("liveindex cache clear [--dictionaries|--master-patterns|--codebooks|--spot-templates|--all] removes them "
                 "(a dictionary in use by a running process is kept)")
    return "\n".join(lines)


def _remove_dictionary(folder: Path) -> bool:
    """Remove a dictionary unless a process holds it (its lock cannot be had at once)."""
    with open(folder.parent / f"{folder.name}.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        _remove(folder)
        return True


def _in_use(folder: Path) -> bool:
    lock = folder.parent / f"{folder.name}.lock"
    if not lock.exists():
        return False
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False


def _evict(entry: Entry) -> bool:
    """Remove a dictionary not in use, or a spot library (read whole into memory when a worker
    prepares, so its file is never in use); whether it went."""
    if entry.kind == "dictionaries":
        return _remove_dictionary(entry.path)
    _remove(entry.path)
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _touch(path: Path) -> None:
    try:
        path.touch()
        os.utime(path)
    except OSError as exc:  # a read-only cache still serves; only the eviction order suffers
        log.debug("cannot mark %s used: %s", path, exc)


def _last_used(path: Path) -> float:
    marker = path / LAST_USED
    try:
        return (marker if marker.exists() else path).stat().st_mtime
    except OSError:
        return 0.0


def _size(path: Path) -> int:
    if path.is_symlink() or not path.is_dir():
        try:
            return path.lstat().st_size
        except OSError:
            return 0
    return sum(_size(p) for p in path.iterdir())


def _describe_dictionary(folder: Path) -> str:
    try:
        meta = json.loads((folder / "meta.json").read_text())
        geometry = meta["geometry"]
        pc = ", ".join(f"{v:.4f}" for v in geometry["pc"])
        shape = "x".join(str(n) for n in geometry["pattern_shape"])
        return (f"{meta['phase']}, PC ({pc}), {shape} px, tilt {geometry['sample_tilt']:g} deg, "
                f"{meta['resolution_deg']:g} deg, {meta['n_templates']} templates")
    except (OSError, ValueError, KeyError, TypeError):
        return "(no meta.json: an unfinished build)"


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size < 1e10 else f"{size / 1e9:.2f} GB"

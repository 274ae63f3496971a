"""The dispatcher's store of acquired pages: memory up to a bound, then disk.

A detector does not wait for the workers. Every page acquired is kept here until the sink
says it has stored the page's results, so a page lost with a worker, in transit or in a
sink that died can be sent again. When the workers fall behind, pages beyond
``memory_limit`` bytes go to ``spill_dir`` (one ``.npy`` per page) and come back from
there when a worker is free; memory stays under the limit plus one page.

Only in preview mode, chosen by the operator, does a full memory drop pages instead.
"""

from __future__ import annotations

import errno
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from liveindex.models.errors import InputError

log = logging.getLogger(__name__)


@dataclass
class _Slot:
    count: int
    patterns: np.ndarray | None  # in memory, or None when spilled
    path: Path | None = None


class PageStore:
    def __init__(self, *, memory_limit: int, spill_dir: str | Path | None = None, preview: bool = False):
        self.memory_limit = int(memory_limit)
        self.preview = preview
        self._spill_root = Path(spill_dir) if spill_dir else None
        if self._spill_root is not None and self._spill_root.exists() and not self._spill_root.is_dir():
            raise InputError(f"--spill-dir {self._spill_root} is a file; give a folder (it is made if missing)")
        self._spill_dir: Path | None = None  # made on first spill
        self._slots: dict[int, _Slot] = {}
        self.memory_bytes = 0
        self.peak_memory_bytes = 0
        self.spilled_frames = 0  # on disk now
        self.spilled_total = 0  # ever spilled (this store)
        self.dropped_frames = 0
        self._disk_full_logged = False

    def __len__(self) -> int:
        return len(self._slots)

    def add(self, first: int, patterns: np.ndarray) -> bool:
        """Keep a page; returns False if it was dropped (preview mode with memory full)."""
        count = len(patterns)
        if self.memory_bytes + patterns.nbytes > self.memory_limit:
            if self.preview:
                self.dropped_frames += count
                return False
            path = self._spill(first, patterns)
            if path is not None:
                self._slots[first] = _Slot(count, None, path)
                self.spilled_frames += count
                self.spilled_total += count
                return True
        self._slots[first] = _Slot(count, patterns)
        self.memory_bytes += patterns.nbytes
        self.peak_memory_bytes = max(self.peak_memory_bytes, self.memory_bytes)
        return True

    def get(self, first: int) -> np.ndarray:
        slot = self._slots[first]
        return slot.patterns if slot.patterns is not None else np.load(slot.path)

    def release(self, first: int) -> None:
        """The page's results are stored at the sink: forget it."""
        slot = self._slots.pop(first, None)
        if slot is None:
            return
        if slot.patterns is not None:
            self.memory_bytes -= slot.patterns.nbytes
        else:
            self.spilled_frames -= slot.count
            slot.path.unlink(missing_ok=True)

    def close(self) -> None:
        if self._spill_dir is not None:
            shutil.rmtree(self._spill_dir, ignore_errors=True)
            self._spill_dir = None
        self._slots.clear()
        self.memory_bytes = self.spilled_frames = 0

    def _spill(self, first: int, patterns: np.ndarray) -> Path | None:
        try:
            if self._spill_dir is None:
                if self._spill_root is not None:
                    self._spill_root.mkdir(parents=True, exist_ok=True)
                self._spill_dir = Path(tempfile.mkdtemp(prefix="liveindex-spill-", dir=self._spill_root))
                log.warning("workers are behind the detector: pages beyond %.0f MB of memory spill to %s",
                            self.memory_limit / 1e6, self._spill_dir)
            path = self._spill_dir / f"{first:012d}.npy"
            np.save(path, patterns)
            return path
        except OSError as exc:
            # Losing frames is worse than using memory: keep the page in memory, say why.
            if not self._disk_full_logged:
                self._disk_full_logged = True
                reason = "the disk is full" if exc.errno == errno.ENOSPC else exc.strerror
                log.error("cannot spill pages to %s (%s); holding them in memory beyond the %.0f MB limit. "
                          "Free space there or point --spill-dir at a larger disk", self._spill_dir or self._spill_root,
                          reason, self.memory_limit / 1e6)
            return None

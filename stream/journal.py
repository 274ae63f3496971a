"""The sink's append-only journal: every message it accepted for a scan, as received.

A sink killed mid-scan restarts, replays the journal and carries on with the same map.
Each record is the message's frames exactly as they came off the wire, so replay goes
through the same decoder and checks as live traffic:

    u32 frame count, then per frame: u64 length, bytes

Writes go straight to the operating system (they survive the process being killed);
``sync`` (fsync) runs about once a second for power loss. A record torn by a kill is cut
off on replay.
"""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

_COUNT = struct.Struct("<I")
_LENGTH = struct.Struct("<Q")
SUFFIX = ".journal"


class Journal:
    def __init__(self, path: str | Path, *, append: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Always O_APPEND: after a torn record is cut off, the next record starts at the new end.
        # O_NOFOLLOW: a symlink planted in the output folder never redirects the journal elsewhere.
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | (0 if append else os.O_TRUNC)
        self._fd = os.open(self.path, flags, 0o644)
        self._dirty = False

    def append(self, frames) -> None:
        """Write one message; raises OSError (for example ENOSPC) if the disk refuses it."""
        parts = [_COUNT.pack(len(frames))]
        for frame in frames:
            buffer = frame.buffer if hasattr(frame, "buffer") else frame
            parts += [_LENGTH.pack(len(buffer)), buffer]
        expected = sum(len(p) for p in parts)
        end = os.fstat(self._fd).st_size  # the journal's one writer is this process
        try:
            written = os.writev(self._fd, parts)
            if written != expected:  # a short write: the disk filled up mid-record
                raise OSError(28, f"short write to {self.path} ({written} of {expected} bytes)")
        except OSError:
            # Cut the torn record off now, so later records are not appended after garbage
            # (replay stops at the first torn record).
            try:
                os.ftruncate(self._fd, end)
            except OSError:
                pass
            raise
        self._dirty = True

    def sync(self) -> None:
        if self._dirty:
            os.fsync(self._fd)
            self._dirty = False

    def close(self) -> None:
        if self._fd is not None:
            try:
                self.sync()
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None


def replay(path: str | Path) -> Iterator[list[bytes]]:
    """Yield each message's frames; a torn last record is cut off the file."""
    path = Path(path)
    data = path.read_bytes()
    offset = good = 0
    while offset < len(data):
        try:
            (n,) = _COUNT.unpack_from(data, offset)
            offset += _COUNT.size
            frames = []
            for _ in range(n):
                (length,) = _LENGTH.unpack_from(data, offset)
                offset += _LENGTH.size
                if offset + length > len(data):
                    raise struct.error("record runs past the end")
                frames.append(data[offset:offset + length])
                offset += length
        except struct.error:
            log.warning("journal %s ends in a torn record (a kill mid-write); cutting %d bytes", path, len(data) - good)
            os.truncate(path, good)
            return
        good = offset
        yield frames

"""A scan file that the acquisition is still writing, followed frame by frame.

Vendor formats written progressively (NORDIF .dat, EDAX .up1/.up2, Oxford .ebsp) store
one fixed-size record per frame after a header: frame k lies at ``data_offset + k *
record_bytes`` (+ ``frame_offset`` where the record has a header of its own). A frame is
readable once the file holds its whole record, so a half-written last frame is waited for,
never read as garbage. The file's size is polled (``os.stat``, about 1 us) every
``POLL_SECONDS`` while nothing is new: inotify would wake sooner, but it never hears of
writes made from another host, which is how a microscope PC writes onto an analysis
machine's share (SMB/NFS). Frames are read with one ``preadv`` straight into the page's
array, no other copy.

The scan ends when ``expected`` frames have arrived, or when the file has not grown for
``follow_timeout`` seconds (``end_reason`` then says so and the scan ends partial).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from liveindex.models.errors import InputError

from .modality import ScanSource

log = logging.getLogger(__name__)

POLL_SECONDS = 0.002  # 2 ms: a frame written at 1000 frames/s waits at most this long to be seen
DEFAULT_FOLLOW_TIMEOUT = 10.0


@dataclass(frozen=True)
class RecordLayout:
    """Where frames lie in a file: ``expected`` records of ``record_bytes`` from ``data_offset``,
    each holding one ``pattern_shape`` frame of ``dtype`` at ``frame_offset`` within it."""

    format: str
    data_offset: int
    record_bytes: int
    pattern_shape: tuple[int, int]
    dtype: str
    expected: int
    frame_offset: int = 0
    order: np.ndarray | None = None  # record number of each scan point, where the file's order is not the scan's

    @property
    def frame_bytes(self) -> int:
        return int(np.prod(self.pattern_shape)) * np.dtype(self.dtype).itemsize

    def __post_init__(self):
        if self.expected < 1 or min(self.pattern_shape) < 2:
            raise InputError(f"{self.format}: the header says {self.expected} frames of {self.pattern_shape} "
                             "pixels; give a file whose header is written (or the scan size and pattern size)")
        if self.order is not None and (len(self.order) != self.expected or self.order.min() < 0
                                       or self.order.max() >= self.expected):
            raise InputError(f"{self.format}: the header's table of pattern positions is damaged")
        if self.frame_offset + self.frame_bytes > self.record_bytes:
            raise InputError(f"{self.format}: a frame of {self.frame_bytes} bytes does not fit its "
                             f"{self.record_bytes}-byte record; the header is damaged")


class NotWrittenYet(Exception):
    """What a follower needs before its first frame (a header, a table, an HDF5 superblock or
    dataset) is not written yet: tried again until --follow-timeout (``when_written``)."""


def when_written(attempt, path, follow_timeout: float, what: str):
    """``attempt()``'s answer once it stops raising NotWrittenYet; an InputError naming the
    last reason after ``follow_timeout`` seconds (``what``: what the acquisition should be writing)."""
    deadline = time.monotonic() + follow_timeout
    while True:
        try:
            return attempt()
        except NotWrittenYet as exc:
            if time.monotonic() > deadline:
                raise InputError(f"{path}: {exc} after --follow-timeout {follow_timeout:g} s; is the acquisition "
                                 f"writing {what}?") from None
            time.sleep(0.05)


class GrowingFile:
    """Counts and reads the complete frames of a file being written (see the module doc)."""

    def __init__(self, path, layout: RecordLayout, *, follow_timeout: float = DEFAULT_FOLLOW_TIMEOUT,
                 clock=time.monotonic, wall_clock=time.time, sleep=time.sleep):
        self.path = Path(path)
        self.layout = layout
        if not follow_timeout > 0:
            raise InputError(f"--follow-timeout {follow_timeout} must be a positive number of seconds")
        self.follow_timeout = float(follow_timeout)
        self._clock, self._wall, self._sleep = clock, wall_clock, sleep
        self._open()
        self._size = -1
        self._last_growth = clock()
        self.count = 0  # complete frames so far
        self.end_reason: str | None = None
        # When each frame was seen complete (the acquisition time, as the file carries none): one
        # (first frame, time) per poll that found new frames, not 8 bytes for every point.
        self._seen_first: list[int] = []
        self._seen_time: list[float] = []
        # A scan point is ready once every record up to the last its prefix needs is complete.
        self._needs = None if layout.order is None else np.maximum.accumulate(layout.order)
        self._poll()

    def _open(self) -> None:
        """Open what is followed: the file (a follower of another kind opens its own, see _measure)."""
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise InputError(f"cannot open {self.path} to follow it ({exc.strerror}); give the file the "
                             "acquisition writes") from None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _poll(self) -> bool:
        """Look at the file; True where it holds more complete frames than before. The scan
        ends complete at the expected count, or partial once the file has not grown for
        ``follow_timeout`` seconds."""
        size, complete = self._measure()
        now = self._clock()
        if size != self._size:
            self._size = size
            self._last_growth = now
        if complete > self.count:
            self._seen_first.append(self.count)
            self._seen_time.append(self._wall())
            self.count = complete
            if complete == self.layout.expected:
                self.end_reason = ""
            return True
        if now - self._last_growth > self.follow_timeout and self.end_reason is None:
            self.end_reason = (f"{self.path.name} stopped growing for {self.follow_timeout:g} s (--follow-timeout) at "
                               f"{self.count} of {self.layout.expected} frames")
            log.warning("%s", self.end_reason)
        return False

    def _measure(self) -> tuple[int, int]:
        """(the file's size in bytes, the complete frames in it, at most the expected count)."""
        size = os.fstat(self._fd).st_size
        layout = self.layout
        complete = min(max(0, (size - layout.data_offset) // layout.record_bytes), layout.expected)
        if self._needs is not None:
            complete = int(np.searchsorted(self._needs, complete))  # points whose records are all complete
        return size, complete

    def arrived(self, timeout: float) -> int:
        """Complete frames so far, waiting up to ``timeout`` s for more (polling every 2 ms)."""
        deadline = self._clock() + timeout
        while not self._poll() and self.end_reason is None and self._clock() < deadline:
            self._sleep(POLL_SECONDS)
        return self.count

    def read(self, first: int, count: int) -> np.ndarray:
        layout = self.layout
        if first < 0 or first + count > self.count:
            raise IndexError(f"frames {first}..{first + count - 1} of {self.path} are not complete yet "
                             f"({self.count} are)")
        if layout.order is not None:
            records = layout.order[first:first + count]
            low = int(records.min()) if count else 0
            block = self._read_records(low, int(records.max()) + 1 - low if count else 0)
            return np.ascontiguousarray(block[records - low])
        return self._read_records(first, count)

    def _read_records(self, first: int, count: int) -> np.ndarray:
        """Frames of records first..first+count-1, in file order."""
        layout = self.layout
        start = layout.data_offset + first * layout.record_bytes
        if layout.record_bytes == layout.frame_bytes:  # frames back to back: read them into the page itself
            out = np.empty((count, *layout.pattern_shape), layout.dtype)
            self._read_into(memoryview(out).cast("B"), start)
            return out
        records = np.empty((count, layout.record_bytes), np.uint8)
        self._read_into(memoryview(records).cast("B"), start)
        frames = records[:, layout.frame_offset:layout.frame_offset + layout.frame_bytes]
        return np.ascontiguousarray(frames).view(layout.dtype).reshape(count, *layout.pattern_shape)

    def _read_into(self, buffer: memoryview, offset: int) -> None:
        done = 0
        while done < len(buffer):
            n = os.preadv(self._fd, [buffer[done:]], offset + done)
            if n <= 0:
                raise OSError(f"{self.path} shrank while being followed (read {done} of {len(buffer)} bytes at "
                              f"{offset}); was the file replaced?")
            done += n

    def frame_times(self, first: int, count: int) -> np.ndarray:
        """When each of these frames was seen complete (NaN for frames not seen yet). Frames are
        asked for in order, so the polls before ``first``'s are forgotten."""
        drop = int(np.searchsorted(self._seen_first, first, side="right")) - 1
        if drop > 0:
            del self._seen_first[:drop], self._seen_time[:drop]
        at = np.searchsorted(self._seen_first, np.arange(first, first + count), side="right") - 1
        times = np.asarray(self._seen_time + [np.nan])[np.where(at >= 0, at, -1)]
        return np.where(np.arange(first, first + count) < self.count, times, np.nan)


class FollowedSource(ScanSource):
    """A ScanSource over a GrowingFile: the scan's description (modality, setup, phases, scan
    shape) from the caller, its frames as they are written."""

    live = True

    def __init__(self, growing: GrowingFile, *, modality, nav_shape, setup: dict, phases, step=(1.0, 1.0),
                 metadata: dict | None = None):
        layout = growing.layout
        if int(np.prod(nav_shape)) != layout.expected:
            raise InputError(f"{growing.path}: scan shape {tuple(nav_shape)} has {int(np.prod(nav_shape))} points but "
                             f"the file will hold {layout.expected} frames; give the scan size the acquisition uses")
        self.growing = growing
        self.modality = modality
        self.nav_shape = tuple(int(n) for n in nav_shape)
        self.step = tuple(step)
        self.pattern_shape = tuple(layout.pattern_shape)
        self.dtype = layout.dtype
        self.setup = modality.check_setup(dict(setup), self.pattern_shape)
        self.phases = list(phases)
        self.truth = {}
        self.metadata = {"source": f"followed {growing.path.name}", "format": layout.format, **(metadata or {})}

    @property
    def end_reason(self) -> str | None:
        return self.growing.end_reason

    def arrived(self, timeout: float) -> int:
        return self.growing.arrived(timeout)

    def read(self, first: int, count: int) -> np.ndarray:
        return self.growing.read(first, count)

    def frame_times(self, first: int, count: int) -> np.ndarray:
        return self.growing.frame_times(first, count)

    def close(self) -> None:
        self.growing.close()

"""A scan's throughput and latency over its whole run, for the live page's chart.

The page used to sample the sink's rate once a second while it was open, so a page opened
late, or after the scan ended, showed an empty chart. The sink now keeps the history itself:
frames received and the pages' median latencies, in time bins from the scan's first result.
The bins stay few whatever the scan's length: past ``MAX_BINS`` neighbouring bins merge and the
bin width doubles, so a status poll carries at most a few hundred numbers.

Results come a page at a time (hundreds of points), so a bin narrower than the time between
pages would read all or nothing. A page's points are spread over the time since the result
before it (at most ``SPREAD_SECONDS``: after a pause, a page is not smeared over the pause),
which is when they were being indexed; bins can then start at a quarter of a second, and the
demo's few-second scan draws a line instead of one dot.
"""

from __future__ import annotations

import threading

import numpy as np

MAX_BINS = 240
FIRST_BIN_SECONDS = 0.25
SPREAD_SECONDS = 2.0


class Timeline:
    def __init__(self) -> None:
        self.bin_seconds = FIRST_BIN_SECONDS
        self._origin: float | None = None  # monotonic time of the first result
        self._last = 0.0  # seconds from the origin to the latest result
        self._frames: list[float] = []
        self._latency_sum: list[float] = []  # sum of the pages' median latencies in the bin, seconds
        self._latency_pages: list[int] = []
        self._lock = threading.Lock()  # the sink's loop adds, the HTTP threads read

    def add(self, now: float, frames: int, page_latency_s: float | None) -> None:
        """``frames`` new points arrived at monotonic time ``now``; ``page_latency_s`` their median
        latency (None: the page carried no acquisition time)."""
        with self._lock:
            if self._origin is None:
                self._origin = now
            end = max(now - self._origin, self._last)
            start = max(self._last, end - SPREAD_SECONDS)
            self._last = end
            while int(end // self.bin_seconds) >= MAX_BINS:
                self._merge_pairs()
            slot = int(end // self.bin_seconds)
            while len(self._frames) <= slot:
                self._frames.append(0.0)
                self._latency_sum.append(0.0)
                self._latency_pages.append(0)
            first = int(start // self.bin_seconds)
            if end <= start or first == slot:  # the first result, or a page within one bin
                self._frames[slot] += frames
            else:  # each bin its share of the page's time
                for k in range(first, slot + 1):
                    overlap = min(end, (k + 1) * self.bin_seconds) - max(start, k * self.bin_seconds)
                    self._frames[k] += frames * max(overlap, 0.0) / (end - start)
            if page_latency_s is not None and page_latency_s == page_latency_s:
                self._latency_sum[slot] += page_latency_s
                self._latency_pages[slot] += 1

    def _merge_pairs(self) -> None:
        def pairs(values):
            values = list(values) + [0] * (len(values) % 2)
            return [values[i] + values[i + 1] for i in range(0, len(values), 2)]

        self._frames = pairs(self._frames)
        self._latency_sum = pairs(self._latency_sum)
        self._latency_pages = pairs(self._latency_pages)
        self.bin_seconds *= 2

    def to_wire(self) -> dict:
        """{"bin_s", "frames_per_s": [...], "latency_ms": [... or None]} from the first result on.
        The last bin is left out where there are others: it is still filling (or the scan ended
        part-way through it), and its rate would read low."""
        with self._lock:
            frames = np.asarray(self._frames, np.float64)
            pages = np.asarray(self._latency_pages, np.float64)
            latency = np.asarray(self._latency_sum, np.float64)
            width = self.bin_seconds
        if len(frames) > 1:
            frames, pages, latency = frames[:-1], pages[:-1], latency[:-1]
        rate = frames / width
        mean_latency = np.where(pages > 0, 1000.0 * latency / np.maximum(pages, 1), np.nan)
        return {"bin_s": width, "frames_per_s": [round(float(v), 1) for v in rate],
                "latency_ms": [None if v != v else round(float(v), 1) for v in mean_latency]}

"""The acquisition thread of a live source (a file being written, a detector stream).

A live source's frames arrive on the acquisition's clock, not the workers': this thread
takes them as they come, in pages, and hands each page to the publisher's loop (a queue,
and one byte on an inproc socket that wakes the loop's poller at once, so a page waits for
no poll timeout). The loop puts pages into its page store (memory, then disk), so workers
slower than the detector never make it wait. A page is handed over when it is full, or
when its first frame has waited ``max_wait`` seconds (a slow or pausing acquisition still
reaches the map within that), or when the acquisition has ended.

The thread owns a stop event and keeps its error; the loop calls ``maybe_raise``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import zmq

log = logging.getLogger(__name__)

ARRIVAL_WAIT = 0.02  # s a source may wait for new frames before the thread checks its stop event
MAX_PAGE_WAIT = 0.05  # s the first frame of a page that is not full waits for more: bounds the latency


class LiveFeed:
    """Reads ``source`` (``live = True``) in pages of ``page_size``; ``pages`` yields
    (first, frames, times) tuples, then (None, reason, None) once the acquisition ended."""

    def __init__(self, source, *, context: zmq.Context, page_size: int, max_wait: float = MAX_PAGE_WAIT):
        self.source = source
        self.page_size = int(page_size)
        self.max_wait = max_wait
        self.pages: queue.SimpleQueue = queue.SimpleQueue()
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self._endpoint = f"inproc://liveindex-feed-{id(self)}"
        self.wake = context.socket(zmq.PULL)  # the publisher's loop polls this
        self.wake.bind(self._endpoint)
        self._push = context.socket(zmq.PUSH)
        self._push.setsockopt(zmq.SNDHWM, 0)  # never block the acquisition on a busy loop
        self._push.connect(self._endpoint)
        self._thread = threading.Thread(target=self._run, name="live-feed", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self.stop_event.set()
        self._thread.join(timeout=5)
        self._push.close(linger=0)
        self.wake.close(linger=0)

    def maybe_raise(self) -> None:
        if self.error is not None:
            raise self.error

    def drain_wake(self) -> None:
        while True:
            try:
                self.wake.recv(zmq.NOBLOCK)
            except zmq.Again:
                return

    def _hand_over(self, item) -> None:
        self.pages.put(item)
        self._push.send(b"", zmq.NOBLOCK)

    def _run(self) -> None:
        source, first, waiting_since = self.source, 0, None
        try:
            while not self.stop_event.is_set():
                arrived = source.arrived(ARRIVAL_WAIT)
                ended = source.end_reason is not None
                if arrived > first and waiting_since is None:
                    waiting_since = time.monotonic()
                while arrived > first:
                    count = min(self.page_size, arrived - first)
                    if count < self.page_size and not ended and time.monotonic() - waiting_since < self.max_wait:
                        break  # wait a little for the page to fill
                    frames = source.read(first, count)
                    self._hand_over((first, frames, source.frame_times(first, count)))
                    first += count
                    waiting_since = time.monotonic() if arrived > first else None
                if ended and first >= arrived:
                    self._hand_over((None, source.end_reason, None))
                    return
        except BaseException as exc:  # kept for the loop, which raises it
            log.error("the acquisition stopped: %s: %s", type(exc).__name__, exc)
            self.error = exc
            self._push.send(b"", zmq.NOBLOCK)

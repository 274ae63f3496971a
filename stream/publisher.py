"""Publisher and credit-based dispatcher: every frame acquired reaches the sink's store.

Workers connect a DEALER to the dispatcher's ROUTER and ask for work with ``credit``
messages; the dispatcher sends a page only to a worker holding credit, so a slow or new
worker never hoards frames. Every page acquired stays in the dispatcher's page store and
in its ledger until the sink says (``stored``) that the page's results are in its
journal. A page comes back to the queue when

- its worker goes silent (no heartbeat within ``worker_timeout``) or unreachable, or
- its worker reported it done but the sink has stored a page that worker finished later
  (each worker's results travel in order, so this one was lost in transit or with a
  sink that died), or has not stored it within ``store_timeout``; the scan_start is sent
  to the sink again first, so a sink that restarted without it learns the scan.

A sink that has every point of the scan says so (``stored`` with ``complete``), which
releases every page still held: an acknowledgement lost as the scan ends cannot leave the
publisher waiting on a sink that has finished. The sink de-duplicates by (scan, index), so
a page indexed twice costs time, not correctness. With ``rate`` set, pages are acquired on the detector's clock whether or not
workers keep up (the backlog is the page store: memory, then disk); without it, a page is
acquired when a worker has room for it.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import zmq

from liveindex.models.errors import InputError, LiveIndexError, TransportError
from liveindex.models.modality import ScanSource, empty_results

from .live_feed import LiveFeed
from .page_store import PageStore
from .protocol import SAFE_ID, encode
from .security import stop_authenticator
from .transport import Receiver, bound_endpoint, open_socket

log = logging.getLogger(__name__)


class ScanRefused(LiveIndexError):
    """The sink refused the scan (its id is running or has results there, or no space)."""

DEFAULT_MEMORY_LIMIT = 512_000_000  # bytes of pages held in memory before spilling to disk
MAX_ACQUIRE_PER_LOOP = 32
MAX_CREDIT = 1000  # pages a worker may ask for ahead (a peer's larger claims are cut to this)  # pages, so a fast detector clock cannot starve the sockets


@dataclass
class WorkerState:
    name: str
    credit: int = 0
    last_seen: float = 0.0
    state: str = "idle"
    scans: set = field(default_factory=set)
    pages_done: int = 0  # numbers the pages it reports done, in the order it sent their results


@dataclass
class Page:
    """A page in the ledger, from acquisition until the sink has stored its results."""

    first: int
    count: int
    worker: bytes | None = None  # None: waiting to be sent
    t_acquired: float = 0.0  # wall clock when the detector delivered it: latency runs from here
    times: np.ndarray | None = None  # per frame, where a live source knows when each was acquired
    t_done: float | None = None  # its worker reported it indexed
    done_seq: int = -1  # the worker's count of pages done when this one was
    sends: int = 0


@dataclass
class PublishReport:
    scan: str
    frames: int
    pages_sent: int
    pages_resent: int
    seconds: float
    t_first_sent: float | None  # wall clock, comparable with the sink's on one host
    frames_spilled: int = 0
    frames_dropped: int = 0
    peak_memory_bytes: int = 0
    status: str = "complete"  # complete: every frame's results stored at the sink; partial: not so (and why)
    reason: str | None = None

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else float("inf")


class Publisher:
    def __init__(self, *, bind: str = "tcp://127.0.0.1:0", sink: str, context: zmq.Context | None = None,
                 page_size: int = 128, rate: float | None = None, worker_timeout: float = 10.0,
                 store_timeout: float = 30.0, wait_for_workers: float = 60.0, sink_timeout: float = 10.0,
                 memory_limit: int = DEFAULT_MEMORY_LIMIT, spill_dir=None, preview: bool = False, keys=None,
                 stop_event: threading.Event | None = None, restart: bool = False):
        """``restart``: this publisher resumes a scan another one started under the same scan id
        (the sink keeps the results it has and takes this run's too)."""
        self._own_context = context is None  # ended in close(), which is what delivers the scan_end
        self.context = context or zmq.Context()
        self.page_size = int(page_size)
        self.rate = rate
        self.worker_timeout = worker_timeout
        self.store_timeout = store_timeout
        self.wait_for_workers = wait_for_workers
        self.memory_limit, self.spill_dir, self.preview = memory_limit, spill_dir, preview
        PageStore(memory_limit=memory_limit, spill_dir=spill_dir).close()  # refuse a bad --spill-dir now
        self.stop_event = stop_event or threading.Event()
        self.restart = restart
        self.refused: str | None = None  # the sink's reason, where it refused the scan
        self.router = open_socket(self.context, zmq.ROUTER, bind=bind, keys=keys)
        # Sends to a worker that has gone raise instead of vanishing silently.
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.endpoint = bound_endpoint(self.router)
        self.sink_address = sink
        self.sink = open_socket(self.context, zmq.DEALER, connect=sink, send_timeout=sink_timeout, immediate=True,
                                keys=keys)
        self.sink_timeout = sink_timeout
        self.poller = zmq.Poller()
        self.poller.register(self.router, zmq.POLLIN)
        self.poller.register(self.sink, zmq.POLLIN)
        self.receiver = Receiver(role="dispatcher")
        self.workers: dict[bytes, WorkerState] = {}
        self.scan: str | None = None
        self.ledger: dict[int, Page] = {}  # first index -> page, for the scan being published
        self.queue: collections.deque[int] = collections.deque()  # pages waiting for a worker
        self.store: PageStore | None = None
        log.info("dispatcher listening on %s; results go to the sink at %s", self.endpoint, sink)

    def close(self) -> None:
        self.router.close(linger=0)
        self.sink.close(linger=2000)
        if self._own_context:
            stop_authenticator(self.context)
            self.context.term()

    # -- the scan ------------------------------------------------------------------------
    def run(self, source: ScanSource, *, scan_id: str | None = None) -> PublishReport:
        if scan_id is not None and not SAFE_ID.match(scan_id):
            raise InputError(f"--scan-id {scan_id!r} must be 1-128 letters, digits, '_', '.' or '-', starting with a "
                             "letter or digit: it names the scan's files, never a path")
        scan = self.scan = scan_id or f"scan-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        # ``run`` tells a sink a new scan under a reused id from this one's scan_start sent again.
        self.run_id = uuid.uuid4().hex
        start = {"scan": scan, "run": self.run_id, "t_start": time.time(), **source.scan_start(),
                 **({"restart": True} if self.restart else {})}
        self.fields = source.modality.fields
        self.sink_start = encode("scan_start", start, source.truth_arrays())
        self.worker_start = encode("scan_start", start)  # workers need no ground truth
        self._send_sink(self.sink_start)
        self.ledger.clear()
        self.queue.clear()
        self.store = PageStore(memory_limit=self.memory_limit, spill_dir=self.spill_dir, preview=self.preview)
        self.source, self.total, self.next_first = source, source.size, 0
        self.pages_sent = self.pages_resent = 0
        # A live source (a file being written, a detector) is read on its own clock by a thread
        # of its own; it ends when the acquisition does (live_end: "" with every frame, else why not).
        self.feed, self.live_end = None, None
        if source.live:
            self.feed = LiveFeed(source, context=self.context, page_size=self.page_size)
            self.poller.register(self.feed.wake, zmq.POLLIN)
            self.feed.start()
        for identity in list(self.workers):
            self._announce_scan(identity)
        self.t0 = self.last_worker_seen = time.perf_counter()
        self.t_first_sent = None
        last_status = 0.0
        log.info("scan %s: %d frames of %s %s, pages of %d", scan, self.total, source.dtype,
                 tuple(source.pattern_shape), self.page_size)
        status = "success"
        try:
            while True:
                if self.stop_event.is_set():
                    status = "abort"
                    break
                if self.refused is not None:
                    raise ScanRefused(f"the sink at {self.sink_address} refused scan {scan}: {self.refused}")
                self._receive(timeout_ms=0 if self._can_send() else 20)
                now = time.perf_counter()
                if self.feed is not None:
                    self._take_live_pages()
                else:
                    self._acquire(now)
                self._dispatch()
                if not self.ledger and (self.live_end is not None if self.feed is not None
                                        else self.next_first >= self.total):
                    break
                if self.workers:
                    self.last_worker_seen = now
                elif now - self.last_worker_seen > self.wait_for_workers:
                    raise TransportError(
                        f"no worker connected to {self.endpoint} within {self.wait_for_workers:.0f} s; start one with "
                        f"`liveindex worker --dispatcher {self.endpoint} --sink {self.sink_address}`"
                    )
                if now - last_status > 0.5:
                    # Twice a second, not every loop: these walk the whole ledger, which holds
                    # the entire backlog when workers are behind; the timeouts are seconds long.
                    last_status = now
                    self._requeue_lost(now)
                    self._send_status()
                    self._beat_workers()
        except BaseException:
            status = "fail"
            raise
        finally:
            elapsed = time.perf_counter() - self.t0
            if self.feed is not None:
                self.poller.unregister(self.feed.wake)
                self.feed.close()
                source.close()
                if status == "success" and self.live_end:
                    status = "partial"  # the acquisition ended with frames missing: never "success"
            self._send_status()
            # Every page is stored by now (or the scan was stopped): a sink that has already
            # gone (``--once``) finishes without the scan_end, so never wait for it here.
            if self.refused is None:
                self._send_sink(encode("scan_end", {"scan": scan, "run": self.run_id,
                                                    "frames_sent": int(self.next_first), "status": status,
                                                    **({"reason": self.live_end[:500]} if status == "partial"
                                                       else {})}),
                                block=False)
            store = self.store
            report = PublishReport(scan, self.total, self.pages_sent, self.pages_resent, elapsed, self.t_first_sent,
                                   store.spilled_total, store.dropped_frames, store.peak_memory_bytes)
            if status == "partial":
                report.status, report.reason = "partial", self.live_end
                report.frames = int(self.next_first)
            elif status == "abort":
                if self.feed is not None:  # a live source: the frames acquired, not the frames expected
                    report.frames = int(self.next_first)
                report.status, report.reason = "partial", (f"stopped after {self.next_first} of {self.total} frames; "
                                                           f"{len(self.ledger)} pages not stored")
            elif store.dropped_frames:
                report.status, report.reason = "partial", f"preview mode dropped {store.dropped_frames} frames"
            store.close()
        log.info("scan %s published: %d frames in %.2f s (%.0f frames/s), %d pages re-sent, %d frames spilled to "
                 "disk, peak page memory %.1f MB", scan, report.frames, elapsed, report.frames_per_second,
                 self.pages_resent, report.frames_spilled, report.peak_memory_bytes / 1e6)
        if report.frames_dropped:
            log.warning("preview mode dropped %d frames the workers could not keep up with", report.frames_dropped)
        return report

    # -- acquisition and dispatch ------------------------------------------------------------
    def _acquire(self, now: float) -> None:
        """Take pages from the source: on the detector's clock with ``rate``, else on demand."""
        for _ in range(MAX_ACQUIRE_PER_LOOP):
            if self.next_first >= self.total:
                return
            first = self.next_first
            count = min(self.page_size, self.total - first)
            if self.rate:
                if now < self.t0 + (first + count) / self.rate:
                    return
            elif len(self.queue) >= sum(max(w.credit, 0) for w in self.workers.values()):
                return
            self.next_first += count
            if self.store.add(first, self.source.read(first, count)):
                self.ledger[first] = Page(first, count, t_acquired=time.time())
                self.queue.append(first)
            else:
                self._send_dropped(first, count)

    def _take_live_pages(self) -> None:
        """Pages the live feed read since the last loop, into the page store and the ledger."""
        feed = self.feed
        feed.drain_wake()
        feed.maybe_raise()
        while True:
            try:
                first, frames, times = feed.pages.get_nowait()
            except Exception:  # queue.Empty
                return
            if first is None:
                self.live_end = frames  # the end reason
                seconds = time.perf_counter() - self.t0
                log.info("scan %s: the acquisition ended after %d of %d frames in %.2f s (%.0f frames/s)%s", self.scan,
                         self.next_first, self.total, seconds, self.next_first / max(seconds, 1e-9),
                         f" ({frames})" if frames else "")
                continue
            count = len(frames)
            self.next_first = first + count
            if self.store.add(first, frames):
                t_acquired = float(times.min()) if times is not None and count else time.time()
                self.ledger[first] = Page(first, count, t_acquired=t_acquired, times=times)
                self.queue.append(first)
            else:
                self._send_dropped(first, count)

    def _can_send(self) -> bool:
        if self._worker_with_credit() is None:
            return False
        return bool(self.queue) or (not self.rate and self.feed is None and self.next_first < self.total)

    def _dispatch(self) -> None:
        while self.queue:
            page = self.ledger.get(self.queue[0])
            if page is None or page.worker is not None:  # stored meanwhile, or already out again
                self.queue.popleft()
                continue
            identity = self._worker_with_credit()
            if identity is None:
                return
            if self._send_page(identity, page):
                self.queue.popleft()

    def _send_page(self, identity: bytes, page: Page) -> bool:
        worker = self.workers[identity]
        arrays = {"patterns": self.store.get(page.first)}
        if page.times is not None:
            arrays["t_acquired"] = page.times  # per frame: the latency to the map is measured from each
        frames = encode("frames", {"scan": self.scan, "run": self.run_id, "first": page.first, "count": page.count,
                                   "t_sent": time.time(), "t_acquired": page.t_acquired}, arrays)
        if not self._announce_scan(identity):
            return False
        try:
            self.router.send_multipart([identity, *frames], copy=False)
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the worker disconnected
            self._drop_worker(identity, f"unreachable ({exc})")
            return False
        worker.credit -= 1
        page.worker, page.t_done = identity, None
        page.sends += 1
        self.pages_sent += page.sends == 1
        self.pages_resent += page.sends > 1
        self.t_first_sent = self.t_first_sent or time.time()
        return True

    def _announce_scan(self, identity: bytes) -> bool:
        """Send the scan's scan_start to a worker that has not had it; False (and the worker
        dropped) where it cannot be reached. Every connected worker gets it when the scan
        starts, not with its first page: a worker builds the scan's indexer (dictionary,
        sessions) then, seconds for a new geometry, and pages it held meanwhile would wait
        (measured: a second worker joined a 4 s scan after 2.2 s)."""
        worker = self.workers[identity]
        if self.scan not in worker.scans:
            try:
                self.router.send_multipart([identity, *self.worker_start])
            except zmq.ZMQError as exc:  # EHOSTUNREACH: the worker disconnected
                self._drop_worker(identity, f"unreachable ({exc})")
                return False
            worker.scans.add(self.scan)
        return True

    def _send_dropped(self, first: int, count: int) -> None:
        """Preview mode: tell the sink these points were skipped, so its map is complete."""
        self._send_sink(encode("results", {"scan": self.scan, "run": self.run_id, "first": first, "count": count,
                                           "worker": "dispatcher", "timings": {}},
                               {"indices": np.arange(first, first + count, dtype=np.int64),
                                **empty_results(self.fields, count)}))

    def _requeue_lost(self, now: float) -> None:
        for identity, worker in list(self.workers.items()):
            if now - worker.last_seen > self.worker_timeout:
                self._drop_worker(identity, f"silent for {now - worker.last_seen:.0f} s")
        unstored = [page for page in self.ledger.values()
                    if page.t_done is not None and now - page.t_done > self.store_timeout]
        if unstored:
            log.warning("the sink has not stored %d page(s) %.0f s after their workers finished them; sending them "
                        "again", len(unstored), self.store_timeout)
            log.debug("unstored pages: %s", [(p.first, self.workers.get(p.worker, WorkerState("gone")).name)
                                             for p in unstored])
            self._send_sink(self.sink_start, block=False)  # a restarted sink may not know the scan
            self._requeue(unstored)

    def _drop_worker(self, identity: bytes, why: str) -> None:
        worker = self.workers.pop(identity, None)
        if worker is not None:
            log.warning("worker %s %s; its pages go to the others", worker.name, why)
        self._requeue([page for page in self.ledger.values() if page.worker == identity and page.t_done is None])

    def _requeue(self, pages: list[Page]) -> None:
        for page in sorted(pages, key=lambda p: p.first, reverse=True):
            page.worker, page.t_done = None, None
            self.queue.appendleft(page.first)

    # -- messages ------------------------------------------------------------------------
    def _receive(self, timeout_ms: int) -> None:
        ready = dict(self.poller.poll(timeout_ms))
        if self.router in ready:
            self._drain(self.router, self._from_worker)
        if self.sink in ready:
            self._drain(self.sink, self._from_sink)

    def _drain(self, sock: zmq.Socket, handle) -> None:
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                handle(frames)
            except (TypeError, ValueError, KeyError, IndexError) as exc:  # a field of the wrong kind
                self.receiver.reject(ValueError(f"message with a malformed field ({type(exc).__name__}: {exc})"))

    def _from_worker(self, frames) -> None:
        identity = frames[0].bytes
        message = self.receiver.decode(frames[1:])
        if message is None:
            return
        worker = self.workers.get(identity)
        if worker is None:
            # The kind's own validated name field (credit: worker, heartbeat: sender), never another
            # field a peer may fill with anything: the name goes into the dispatcher's status.
            name = message.header["worker"] if message.kind == "credit" else message.header.get("sender", "?")
            worker = self.workers[identity] = WorkerState(name=str(name)[:100])
            log.info("worker %s connected", worker.name)
            if not self._announce_scan(identity):  # it prepares the scan's indexer before its first page
                return
        worker.last_seen = time.perf_counter()
        if message.kind == "credit":
            worker.credit = min(worker.credit + message.header["pages"], MAX_CREDIT)
            for scan, first in message.header["done"]:
                page = self.ledger.get(first) if scan == self.scan else None
                if page is not None and page.worker == identity:
                    page.t_done, page.done_seq = worker.last_seen, worker.pages_done
                    worker.pages_done += 1
        elif message.kind == "heartbeat":
            worker.state = str(message.header.get("state", worker.state))[:60]
            prefetch = message.header.get("prefetch")
            if isinstance(prefetch, int) and not isinstance(prefetch, bool):
                # Credit is re-derived every beat from the worker's slots and the pages it
                # holds by our ledger, so a credit message lost on the way costs a second,
                # not a worker (and a new dispatcher learns a running worker's slots).
                held = sum(1 for p in self.ledger.values() if p.worker == identity and p.t_done is None)
                worker.credit = max(0, min(prefetch, MAX_CREDIT) - held)
        else:
            self.receiver.reject(ValueError(f"dispatcher does not take {message.kind!r} messages from workers"))

    def _from_sink(self, frames) -> None:
        message = self.receiver.decode(frames)
        if message is None:
            return
        if message.kind != "stored":
            self.receiver.reject(ValueError(f"dispatcher does not take {message.kind!r} messages from the sink"))
        elif message.header.get("refused") and message.header["scan"] == self.scan \
                and message.header.get("run") in (None, self.run_id):
            self.refused = message.header["refused"]
        elif message.header["scan"] == self.scan and message.header.get("run") in (None, self.run_id):
            # "complete": the sink has every point of the scan, so every page is stored, whatever
            # acknowledgement went missing; pages still out are duplicates nobody needs.
            pages = list(self.ledger) if message.header.get("complete") else message.header["pages"]
            newest: dict[bytes, int] = {}  # worker -> its latest page now stored
            for first in pages:
                page = self.ledger.pop(first, None)
                if page is not None:
                    self.store.release(first)
                    if page.t_done is not None:
                        newest[page.worker] = max(newest.get(page.worker, -1), page.done_seq)
            # A worker sends its results in order on one connection, and the sink stores them
            # in that order: its earlier pages still not stored were lost on the way.
            lost = [page for page in self.ledger.values()
                    if page.t_done is not None and page.done_seq < newest.get(page.worker, -1)]
            if lost:
                log.warning("%d page(s) finished by workers never reached the sink's store; sending them again",
                            len(lost))
                self._requeue(lost)

    def _worker_with_credit(self) -> bytes | None:
        best = max(self.workers.items(), key=lambda kv: kv[1].credit, default=None)
        return best[0] if best is not None and best[1].credit > 0 else None

    def _send_sink(self, frames: list, *, block: bool = True) -> None:
        try:
            self.sink.send_multipart(frames, copy=False, flags=0 if block else zmq.NOBLOCK)
        except zmq.Again:
            if block:
                raise TransportError(
                    f"the sink at {self.sink_address} did not accept a connection within {self.sink_timeout:.0f} s; "
                    f"start `liveindex sink` there or fix --sink"
                ) from None

    def _beat_workers(self) -> None:
        """Heartbeats to the workers too: a worker killed without a word is found at the next
        beat (the send fails), not only after ``worker_timeout``, and workers know we live."""
        beat = encode("heartbeat", {"sender": "dispatcher", "scan": self.scan})
        for identity in list(self.workers):
            try:
                self.router.send_multipart([identity, *beat], flags=zmq.NOBLOCK)
            except zmq.Again:
                pass  # its queue is full: it is alive, just busy
            except zmq.ZMQError as exc:
                self._drop_worker(identity, f"unreachable ({exc})")

    def _send_status(self) -> None:
        store = self.store
        waiting = sum(self.ledger[f].count for f in self.queue if f in self.ledger)
        status = {
            "sender": "dispatcher",
            "scan": self.scan,
            "run": self.run_id,
            "frames_sent": int(self.next_first),
            "queue_depth": int(self.total - self.next_first + sum(p.count for p in self.ledger.values())),
            "backlog_frames": int(waiting),
            "spilled_frames": int(store.spilled_frames),
            "dropped_frames": int(store.dropped_frames),
            "memory_bytes": int(store.memory_bytes),
            "workers": [{"name": w.name, "state": w.state, "credit": w.credit} for w in self.workers.values()],
        }
        self._send_sink(encode("heartbeat", status), block=False)

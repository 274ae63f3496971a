"""Publisher and credit-based dispatcher.

Workers connect a DEALER to the dispatcher's ROUTER and ask for work with ``credit``
messages; the dispatcher sends a page only to a worker holding credit, so a slow or new
worker never hoards frames and a fast publisher cannot flood anyone. Every page sent is
kept in an in-flight ledger until its worker reports it done; the pages of a worker that
goes silent (no heartbeat within ``worker_timeout``) or unreachable are sent again to the
others. The sink de-duplicates by (scan, index), so a page indexed twice costs time, not
correctness.

The scan's ``scan_start`` and ``scan_end`` go to the sink directly; each worker gets the
``scan_start`` just before its first page of that scan.
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

from .errors import TransportError
from .protocol import encode
from .sources import ScanSource
from .transport import Receiver, bound_endpoint, open_socket

log = logging.getLogger(__name__)


@dataclass
class WorkerState:
    name: str
    credit: int = 0
    last_seen: float = 0.0
    state: str = "idle"
    scans: set = field(default_factory=set)


@dataclass
class PublishReport:
    scan: str
    frames: int
    pages_sent: int
    pages_resent: int
    seconds: float
    t_first_sent: float | None  # wall clock, comparable with the sink's on one host

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else float("inf")


class Publisher:
    def __init__(self, *, bind: str = "tcp://127.0.0.1:0", sink: str, context: zmq.Context | None = None,
                 page_size: int = 128, rate: float | None = None, worker_timeout: float = 10.0,
                 wait_for_workers: float = 60.0, sink_timeout: float = 10.0,
                 stop_event: threading.Event | None = None):
        self.context = context or zmq.Context.instance()
        self.page_size = int(page_size)
        self.rate = rate
        self.worker_timeout = worker_timeout
        self.wait_for_workers = wait_for_workers
        self.stop_event = stop_event or threading.Event()
        self.router = open_socket(self.context, zmq.ROUTER, bind=bind)
        # Sends to a worker that has gone raise instead of vanishing silently.
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.endpoint = bound_endpoint(self.router)
        self.sink_address = sink
        self.sink = open_socket(self.context, zmq.PUSH, connect=sink, send_timeout=sink_timeout, immediate=True)
        self.sink_timeout = sink_timeout
        self.receiver = Receiver(role="dispatcher")
        self.workers: dict[bytes, WorkerState] = {}
        self.ledger: dict[tuple[str, int], tuple[bytes, int, float]] = {}  # (scan, first) -> (worker, count, t)
        log.info("dispatcher listening on %s; results go to the sink at %s", self.endpoint, sink)

    def close(self) -> None:
        self.router.close(linger=0)
        self.sink.close()

    # -- the scan ------------------------------------------------------------------------
    def run(self, source: ScanSource, *, scan_id: str | None = None) -> PublishReport:
        scan = scan_id or f"scan-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        start = {"scan": scan, **source.scan_start_fields()}
        arrays = {"truth_quaternion": source.truth.astype(np.float32)} if source.truth is not None else {}
        self._send_sink(encode("scan_start", start, arrays))
        worker_start = encode("scan_start", start)  # workers need no ground truth
        total = source.size
        pending: collections.deque[tuple[int, int]] = collections.deque()
        next_first = 0
        sent = resent = 0
        t0 = time.perf_counter()
        t_first_sent = None
        last_status = 0.0
        log.info("scan %s: %d frames of %s %s, pages of %d", scan, total, source.dtype,
                 tuple(source.geometry.pattern_shape), self.page_size)
        status = "success"
        try:
            while True:
                if self.stop_event.is_set():
                    status = "abort"
                    break
                self._receive(timeout_ms=20)
                now = time.perf_counter()
                pending.extend(self._expire_workers(now))
                while True:
                    if pending:
                        first, count = pending[0]
                    elif next_first < total:
                        first, count = next_first, min(self.page_size, total - next_first)
                        if self.rate and now < t0 + (first + count) / self.rate:
                            break
                    else:
                        break
                    identity = self._worker_with_credit()
                    if identity is None:
                        break
                    if not self._send_page(identity, scan, worker_start, source, first, count):
                        continue  # that worker is gone; its pages are pending again
                    t_first_sent = t_first_sent or time.time()
                    if pending:
                        pending.popleft()
                        resent += 1
                    else:
                        next_first += count
                        sent += 1
                if next_first >= total and not pending and not self._in_flight(scan):
                    break
                if not self.workers and now - t0 > self.wait_for_workers:
                    raise TransportError(
                        f"no worker connected to {self.endpoint} within {self.wait_for_workers:.0f} s; start one with "
                        f"`liveindex worker --dispatcher {self.endpoint} --sink {self.sink_address}`"
                    )
                if now - last_status > 0.5:
                    last_status = now
                    self._send_status(scan, next_first, pending, total)
        finally:
            elapsed = time.perf_counter() - t0
            self._send_status(scan, next_first, pending, total)
            self._send_sink(encode("scan_end", {"scan": scan, "frames_sent": int(next_first), "status": status}))
        report = PublishReport(scan, total, sent, resent, elapsed, t_first_sent)
        log.info("scan %s published: %d frames in %.2f s (%.0f frames/s), %d pages re-sent",
                 scan, total, elapsed, report.frames_per_second, resent)
        return report

    # -- messages ------------------------------------------------------------------------
    def _receive(self, timeout_ms: int) -> None:
        if not self.router.poll(timeout_ms):
            return
        while True:
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            identity = frames[0].bytes
            message = self.receiver.decode(frames[1:])
            if message is None:
                continue
            now = time.perf_counter()
            worker = self.workers.get(identity)
            if worker is None:
                worker = self.workers[identity] = WorkerState(name=message.header.get("worker") or message.header.get("sender", "?"))
                log.info("worker %s connected", worker.name)
                if message.kind == "heartbeat":
                    # First contact with a running worker: its free slots are its credit here.
                    worker.credit = int(message.header.get("free", 0))
            worker.last_seen = now
            if message.kind == "credit":
                worker.credit += message.header["pages"]
                for scan, first in message.header["done"]:
                    entry = self.ledger.get((scan, first))
                    if entry is not None and entry[0] == identity:
                        del self.ledger[(scan, first)]
            elif message.kind == "heartbeat":
                worker.state = str(message.header.get("state", worker.state))
            else:
                self.receiver.reject(ValueError(f"dispatcher does not take {message.kind!r} messages"))

    def _worker_with_credit(self) -> bytes | None:
        best = max(self.workers.items(), key=lambda kv: kv[1].credit, default=None)
        return best[0] if best is not None and best[1].credit > 0 else None

    def _send_page(self, identity: bytes, scan: str, worker_start: list, source: ScanSource, first: int,
                   count: int) -> bool:
        worker = self.workers[identity]
        patterns = source.read(first, count)
        page = encode("frames", {"scan": scan, "first": first, "count": count, "t_sent": time.time()},
                      {"patterns": patterns})
        try:
            if scan not in worker.scans:
                self.router.send_multipart([identity, *worker_start])
                worker.scans.add(scan)
            self.router.send_multipart([identity, *page], copy=False)
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the worker disconnected
            log.warning("worker %s unreachable (%s); its pages go to the others", worker.name, exc)
            self._drop_worker(identity)
            return False
        worker.credit -= 1
        self.ledger[(scan, first)] = (identity, count, time.perf_counter())
        return True

    def _expire_workers(self, now: float) -> list[tuple[int, int]]:
        requeue = []
        for identity, worker in list(self.workers.items()):
            if now - worker.last_seen > self.worker_timeout:
                log.warning("worker %s silent for %.0f s; re-dispatching its pages", worker.name, now - worker.last_seen)
                requeue += self._drop_worker(identity)
        return requeue

    def _drop_worker(self, identity: bytes) -> list[tuple[int, int]]:
        self.workers.pop(identity, None)
        lost = [(key, entry) for key, entry in self.ledger.items() if entry[0] == identity]
        for key, _ in lost:
            del self.ledger[key]
        return sorted((key[1], entry[1]) for key, entry in lost)

    def _in_flight(self, scan: str) -> int:
        return sum(1 for key in self.ledger if key[0] == scan)

    def _send_sink(self, frames: list) -> None:
        try:
            self.sink.send_multipart(frames, copy=False)
        except zmq.Again:
            raise TransportError(
                f"the sink at {self.sink_address} did not accept a connection within {self.sink_timeout:.0f} s; "
                f"start `liveindex sink` there or fix --sink"
            ) from None

    def _send_status(self, scan: str, next_first: int, pending, total: int) -> None:
        in_flight = sum(entry[1] for key, entry in self.ledger.items() if key[0] == scan)
        waiting = total - next_first + sum(count for _, count in pending)
        status = {
            "sender": "dispatcher",
            "scan": scan,
            "frames_sent": int(next_first),
            "queue_depth": int(in_flight + waiting),
            "workers": [{"name": w.name, "state": w.state, "credit": w.credit} for w in self.workers.values()],
        }
        try:
            self.sink.send_multipart(encode("heartbeat", status), flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # status is advisory; the next one follows in half a second

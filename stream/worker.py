"""Inference worker: ask for pages, index them, send result pages to the sink.

Stateless apart from the indexers it has prepared (one per scan geometry, the last few
kept). A page counts as done (and its credit goes back to the dispatcher) only once its
results are handed to the sink's socket; while the sink is unreachable the worker holds
its finished pages, indexes nothing new, and keeps heartbeating.

Preparing an indexer for a new geometry may build a dictionary, so it runs in a
background thread while the main loop keeps heartbeating; the scan's pages wait locally.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import socket
import threading
import time
import uuid

import numpy as np
import zmq

from .errors import LiveIndexError, ProtocolError, TransportError
from .geometry import DetectorGeometry
from .indexer import IndexResult, blas_threads
from .metrics import WorkerMetrics
from .preprocess import bin_frames
from .protocol import METHOD_CODE, Message, check_frames, encode
from .scan_indexer import ScanIndexer
from .transport import Receiver, open_socket

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 1.0
PREVIEW_PIXELS = 32
KEEP_SCANS = 4


class Worker:
    def __init__(self, *, dispatcher: str, sink: str, name: str | None = None, context: zmq.Context | None = None,
                 prefetch: int = 2, resolution: float = 3.0, providers: str = "auto", threads: int = 1,
                 connect_timeout: float = 60.0, stop_event: threading.Event | None = None,
                 metrics: WorkerMetrics | None = None, keys=None, **indexing):
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self.context = context or zmq.Context.instance()
        self.dispatcher_address, self.sink_address = dispatcher, sink
        self.prefetch = prefetch
        self.resolution = resolution
        self.providers = providers
        self.threads = threads
        self.connect_timeout = connect_timeout
        self.stop_event = stop_event or threading.Event()
        self.metrics = metrics or WorkerMetrics()
        self.receiver = Receiver(self.metrics.bad_messages, role=f"worker {self.name}")
        self.scans: collections.OrderedDict[str, dict] = collections.OrderedDict()  # scan -> scan_start header
        self.indexers: dict[str, concurrent.futures.Future] = {}  # geometry key -> Future[ScanIndexer]
        self.waiting: collections.deque[Message] = collections.deque()  # pages whose indexer is not ready
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prepare")
        self.frames_done = 0
        self.keys = keys
        self.indexing = indexing  # refine, min_confidence, static_background: ScanIndexer's options
        self.outbox: collections.deque[tuple[list, list]] = collections.deque()  # (results, done entry)
        self._sink_blocked_since: float | None = None
        self._sink_blocked_logged = False
        self._last_work = float("-inf")  # monotonic time of the last page indexed

    def run(self) -> None:
        with blas_threads(self.threads):  # a worker is a core (threads=1): numpy's BLAS too
            self._serve()

    def _serve(self) -> None:
        dealer = open_socket(self.context, zmq.DEALER, connect=self.dispatcher_address,
                             send_timeout=self.connect_timeout or None, immediate=True, keys=self.keys)
        dealer.setsockopt(zmq.ROUTING_ID, self.name.encode())
        results = open_socket(self.context, zmq.DEALER, connect=self.sink_address, immediate=True, keys=self.keys)
        try:
            self._send(dealer, encode("credit", {"worker": self.name, "pages": self.prefetch, "done": []}),
                       f"the dispatcher at {self.dispatcher_address}")
            log.info("worker %s ready: dispatcher %s, sink %s", self.name, self.dispatcher_address, self.sink_address)
            last_beat = time.monotonic()
            while not self.stop_event.is_set():
                if dealer.poll(50):
                    frames = dealer.recv_multipart(copy=False)
                    message = self.receiver.decode(frames)
                    if message is not None:
                        self._handle(message)
                self._flush(dealer, results)
                if not self.outbox:
                    self._work(dealer, results)
                if time.monotonic() - last_beat > HEARTBEAT_SECONDS:
                    last_beat = time.monotonic()
                    state = self._state()
                    self._tell_dispatcher(dealer, encode("heartbeat", {"sender": self.name, "state": state,
                                                                       "prefetch": self.prefetch}))
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)
            dealer.close(linger=0)
            results.close(linger=5000)  # let queued results reach the sink
            log.info("worker %s stopped after %d frames", self.name, self.frames_done)

    def _state(self) -> str:
        """What the live page's worker list shows."""
        if self.outbox:
            return "waiting for sink"
        if any(not f.done() for f in self.indexers.values()):
            return "preparing"
        return "indexing" if self.waiting or time.monotonic() - self._last_work < 2 * HEARTBEAT_SECONDS else "idle"

    def _send(self, sock: zmq.Socket, frames: list, peer: str) -> None:
        try:
            sock.send_multipart(frames, copy=False)
        except zmq.Again:
            raise TransportError(
                f"cannot reach {peer} within {self.connect_timeout:.0f} s; check the address, that the process "
                "there is running, the firewall, and that --keys matches theirs (or raise --connect-timeout)"
            ) from None

    @staticmethod
    def _tell_dispatcher(dealer: zmq.Socket, frames: list) -> None:
        """Credit and heartbeats never block: with no dispatcher connected (between scans,
        or while it restarts) they are dropped; the dispatcher re-derives this worker's
        credit from the ``prefetch`` in its next heartbeat."""
        try:
            dealer.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            pass

    def _handle(self, message: Message) -> None:
        if message.kind == "scan_start":
            self._prepare(message.header)
        elif message.kind == "frames":
            self.waiting.append(message)
        elif message.kind == "heartbeat":
            pass  # the dispatcher is alive; nothing to answer (our own beats go on regardless)
        else:
            self.receiver.reject(ValueError(f"worker does not take {message.kind!r} messages"))

    def _prepare(self, header: dict) -> None:
        scan = header["scan"]
        # The static background (made with the scan's first page) is kept when the dispatcher
        # sends the scan_start again: it may be a running mean of the frames indexed so far.
        earlier = self.scans.get(scan)
        if earlier is not None and "background" in earlier:
            header["background"] = earlier["background"]
        self.scans[scan] = header
        while len(self.scans) > KEEP_SCANS:
            self.scans.popitem(last=False)
        try:
            geometry = DetectorGeometry.from_wire(header["detector"]).with_shape(header["pattern_shape"])
        except LiveIndexError as exc:
            header["error"] = str(exc)
            log.error("scan %s cannot be indexed: %s", scan, exc)
            return
        key = f"{geometry.cache_key()}-{','.join(header['phases'])}"
        header["indexer_key"] = key
        if key not in self.indexers:
            reason = f"scan {scan} has geometry {geometry.cache_key()}"
            self.indexers[key] = self.pool.submit(
                ScanIndexer, geometry, header["phases"], resolution=self.resolution, providers=self.providers,
                threads=self.threads, reason=reason, **self.indexing,
            )

    def _work(self, dealer: zmq.Socket, results: zmq.Socket) -> None:
        """Index every waiting page whose indexer is ready, oldest first."""
        for _ in range(len(self.waiting)):
            message = self.waiting.popleft()
            scan = message.header["scan"]
            start = self.scans.get(scan)
            future = self.indexers.get(start.get("indexer_key")) if start else None
            if future is not None and not future.done():
                self.waiting.append(message)
                continue
            result = self._index(message, start, future)
            self._last_work = time.monotonic()
            self.outbox.append((result or [], [[scan, message.header["first"]]]))
            self._flush(dealer, results)
            if self.outbox:
                return

    def _flush(self, dealer: zmq.Socket, results: zmq.Socket) -> None:
        """Hand finished pages to the sink; only then is a page done at the dispatcher."""
        while self.outbox:
            frames, done = self.outbox[0]
            if frames:
                try:
                    results.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    self._note_sink_blocked()
                    return
            self.outbox.popleft()
            self._tell_dispatcher(dealer, encode("credit", {"worker": self.name, "pages": 1, "done": done}))
        if self._sink_blocked_since is not None:
            log.info("worker %s: the sink at %s takes results again", self.name, self.sink_address)
            self._sink_blocked_since, self._sink_blocked_logged = None, False

    def _note_sink_blocked(self) -> None:
        now = time.monotonic()
        if self._sink_blocked_since is None:
            self._sink_blocked_since = now
        elif now - self._sink_blocked_since > 5.0 and not self._sink_blocked_logged:
            self._sink_blocked_logged = True
            log.warning("worker %s cannot reach the sink at %s; holding %d finished page(s) until it is back",
                        self.name, self.sink_address, len(self.outbox))

    def _index(self, message: Message, start: dict | None, future) -> list | None:
        header = message.header
        t_received = time.time()
        patterns = message.arrays["patterns"]
        count = header["count"]
        try:
            if start is None:
                raise ProtocolError("frames for a scan this worker never got a scan_start for", header)
            check_frames(message, start)
            if "error" in start:
                result = IndexResult.empty(count)  # reported once at scan_start; points stay unindexed
            else:
                try:
                    indexer = future.result()
                except LiveIndexError as exc:
                    start["error"] = str(exc)
                    log.error("scan %s cannot be indexed: %s", header["scan"], exc)
                    result = IndexResult.empty(count)
                else:
                    t0 = time.perf_counter()
                    if "background" not in start:
                        start["background"] = indexer.new_background()
                    result = indexer.index(patterns, start["background"])
                    self.metrics.page_seconds.observe(time.perf_counter() - t0)
        except ProtocolError as exc:
            self.receiver.reject(exc)
            return None
        bad = int(np.count_nonzero(result.method == METHOD_CODE["none"]))
        if bad and "error" not in start:
            log.warning("scan %s frames %d..%d: %d pattern(s) with NaN/inf or no contrast left unindexed",
                        header["scan"], header["first"], header["first"] + count - 1, bad)
        self.frames_done += count
        self.metrics.frames.inc(count)
        self.metrics.pages.inc()
        timings = {"t_acquired": header.get("t_acquired", header["t_sent"]), "t_sent": header["t_sent"],
                   "t_received": t_received, "t_done": time.time()}
        return encode("results", {"scan": header["scan"], "run": header.get("run"), "first": header["first"],
                                   "count": count, "worker": self.name, "model": self._model_name(start),
                                   "timings": timings},
                      {**result.wire_arrays(header["first"]), "preview": pattern_previews(patterns)})

    def _model_name(self, start: dict) -> str:
        future = self.indexers.get(start.get("indexer_key"))
        if future is None or not future.done() or future.exception() is not None:
            return "none"
        return future.result().model_name


def pattern_previews(patterns: np.ndarray, most: int = PREVIEW_PIXELS) -> np.ndarray:
    """Small uint8 copies (binned to at most ``most`` px a side, stretched per pattern) that
    the sink keeps so the live page can show the pattern behind any point. About 1 kB each."""
    n, h, w = patterns.shape
    f = max(1, -(-max(h, w) // most))
    binned = bin_frames(patterns[:, : h - h % f, : w - w % f], f, f)
    binned = np.nan_to_num(binned, nan=0.0, posinf=0.0, neginf=0.0)
    lo = binned.min(axis=(1, 2), keepdims=True)
    span = np.maximum(binned.max(axis=(1, 2), keepdims=True) - lo, 1e-6)
    return ((binned - lo) * (255.0 / span)).astype(np.uint8)

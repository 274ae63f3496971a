"""Inference worker: ask for pages, index them, send result pages to the sink.

Stateless apart from the page indexers it has prepared: the runtime knows no physics; each
scan names its modality (models/modality.py), which the worker loads by name and asks for
a PageIndexer (the modality keeps costly parts, such as a dictionary for a geometry, for the
next scan). A page counts as done (and its credit goes back to the dispatcher) only once its
results are handed to the sink's socket; while the sink is unreachable the worker holds
its finished pages, indexes nothing new, and keeps heartbeating.

Preparing an indexer may build a dictionary, so it runs in a background thread while the
main loop keeps heartbeating; the scan's pages wait locally.
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
from dataclasses import dataclass

import numpy as np
import zmq

from liveindex.models import modality as modalities
from liveindex.models.arrays import bin_frames
from liveindex.models.errors import LiveIndexError, ProtocolError, TransportError
from liveindex.models.modality import empty_results
from liveindex.models.onnx_runtime import blas_threads

from .metrics import WorkerMetrics
from .protocol import Message, ScanStart, check_frames, encode
from .transport import Receiver, open_socket

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 1.0
PREVIEW_PIXELS = 32
KEEP_SCANS = 4


@dataclass
class ScanJob:
    """What a worker holds for one scan: its scan_start and its page indexer (being prepared
    in the background, or ready), or why the scan cannot be indexed here."""

    start: ScanStart
    indexer: concurrent.futures.Future | None = None
    error: str | None = None

    @property
    def ready(self) -> bool:
        return self.indexer is None or self.indexer.done()


class Worker:
    def __init__(self, *, dispatcher: str, sink: str, name: str | None = None, context: zmq.Context | None = None,
                 prefetch: int = 2, providers: str = "auto", threads: int = 1,
                 connect_timeout: float = 60.0, stop_event: threading.Event | None = None,
                 metrics: WorkerMetrics | None = None, keys=None, options: dict[str, dict] | None = None):
        """``options``: per modality name, the options its ``prepare`` takes (from the command line)."""
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self.context = context or zmq.Context.instance()
        self.dispatcher_address, self.sink_address = dispatcher, sink
        self.prefetch = prefetch
        self.providers = providers
        self.threads = threads
        self.connect_timeout = connect_timeout
        self.stop_event = stop_event or threading.Event()
        self.metrics = metrics or WorkerMetrics()
        self.receiver = Receiver(self.metrics.bad_messages, role=f"worker {self.name}")
        self.scans: collections.OrderedDict[str, ScanJob] = collections.OrderedDict()
        self.waiting: collections.deque[Message] = collections.deque()  # pages whose indexer is not ready
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prepare")
        self.frames_done = 0
        self.keys = keys
        self.options = options or {}
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
        if any(not job.ready for job in self.scans.values()):
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
        start = ScanStart.from_header(header)
        earlier = self.scans.get(start.scan)
        if earlier is not None and earlier.start.run == start.run:
            # The dispatcher sends a scan_start again (to a new sink, after a restart): the scan's
            # indexer, and its state (EBSD's running static background), carry on.
            return
        job = self.scans[start.scan] = ScanJob(start)
        while len(self.scans) > KEEP_SCANS:
            self.scans.popitem(last=False)
        try:
            modality = modalities.load(start.modality)
            header = {**header, "setup": modality.check_setup(start.setup, start.pattern_shape)}
        except LiveIndexError as exc:
            job.error = str(exc)
            log.error("scan %s cannot be indexed: %s", start.scan, exc)
            return
        job.indexer = self.pool.submit(modality.prepare, header, options=self.options.get(start.modality),
                                       threads=self.threads, providers=self.providers,
                                       reason=f"scan {start.scan}")

    def _work(self, dealer: zmq.Socket, results: zmq.Socket) -> None:
        """Index every waiting page whose indexer is ready, oldest first."""
        for _ in range(len(self.waiting)):
            message = self.waiting.popleft()
            scan = message.header["scan"]
            job = self.scans.get(scan)
            if job is not None and not job.ready:
                self.waiting.append(message)
                continue
            result = self._index(message, job)
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

    def _index(self, message: Message, job: ScanJob | None) -> list | None:
        header = message.header
        t_received = time.time()
        patterns = message.arrays["patterns"]
        count = header["count"]
        try:
            if job is None:
                raise ProtocolError("frames for a scan this worker never got a scan_start for", header)
            start = job.start
            check_frames(message, start)
            fields = self._fields(job, patterns)
        except ProtocolError as exc:
            self.receiver.reject(exc)
            return None
        bad = int(np.count_nonzero(fields["method"] == start.not_indexed_code)) if "method" in fields else 0
        if bad and job.error is None:
            # The modality's "not indexed": unreadable frames (NaN/inf, no contrast) or ones with
            # nothing to index (an amorphous region of a spot-pattern scan); one line a page.
            log.info("scan %s frames %d..%d: %d pattern(s) left unindexed (unreadable, no contrast or nothing to "
                     "index)", header["scan"], header["first"], header["first"] + count - 1, bad)
        self.frames_done += count
        self.metrics.frames.inc(count)
        self.metrics.pages.inc()
        timings = {"t_acquired": header.get("t_acquired", header["t_sent"]), "t_sent": header["t_sent"],
                   "t_received": t_received, "t_done": time.time()}
        indices = np.arange(header["first"], header["first"] + count, dtype=np.int64)
        return encode("results", {"scan": header["scan"], "run": header.get("run"), "first": header["first"],
                                   "count": count, "worker": self.name, "model": self._model_name(job),
                                   "timings": timings},
                      {"indices": indices, **fields, "preview": pattern_previews(patterns),
                       **({"t_acquired": message.arrays["t_acquired"]} if "t_acquired" in message.arrays else {})})

    def _fields(self, job: ScanJob, patterns: np.ndarray) -> dict[str, np.ndarray]:
        """The page's declared fields from the scan's indexer; every point not indexed where the
        scan cannot be indexed here (said once) or the indexer failed or broke the contract."""
        start = job.start
        if job.error is None:
            try:
                indexer = job.indexer.result()
                t0 = time.perf_counter()
                fields = conform(indexer.index(patterns), start, len(patterns))
                self.metrics.page_seconds.observe(time.perf_counter() - t0)
                return fields
            except Exception as exc:  # a peer's scan must never end the worker; its points stay unindexed
                job.error = str(exc)
                log.error("scan %s cannot be indexed: %s", start.scan, exc,
                          exc_info=not isinstance(exc, LiveIndexError))
        return empty_results(start.fields, len(patterns))

    def _model_name(self, job: ScanJob) -> str:
        future = job.indexer
        if job.error is not None or future is None or not future.done() or future.exception() is not None:
            return "none"
        return str(future.result().model_name)


def conform(fields: dict, start: ScanStart, n: int) -> dict[str, np.ndarray]:
    """A page indexer's answer checked against the scan's declared fields (style: check a
    model's output against its input batch); LiveIndexError names what is off."""
    out = {}
    for f in start.fields:
        array = fields.get(f.name)
        if array is None:
            raise LiveIndexError(f"the {start.modality} indexer returned no {f.name!r} (it declares {f.name})")
        array = np.asarray(array)
        if array.shape != (n, *f.shape):
            raise LiveIndexError(f"the {start.modality} indexer returned {f.name!r} of shape {array.shape} for "
                                 f"{n} patterns, expected {(n, *f.shape)}")
        out[f.name] = np.ascontiguousarray(array, dtype=f.dtype)
    return out


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

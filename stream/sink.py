"""Sink: assembles live maps from result pages, serves them, writes the finished scan.

One ROUTER socket takes everything addressed to the sink: scan_start / scan_end and
dispatcher status from the publisher, result pages from any number of workers. Every
message accepted for a scan goes to the scan's journal in the output folder before the
sink tells the dispatcher (``stored``) that a page is safe; a sink killed mid-scan
replays its journals when it starts again and finishes the same maps.
"""

from __future__ import annotations

import collections
import json
import logging
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zmq

from liveindex.models.errors import InputError, LiveIndexError, ProtocolError

from . import orientation_map
from .http import LiveHttpServer
from .journal import SUFFIX as JOURNAL_SUFFIX
from .journal import Journal, replay
from .latent_map import LatentRefresher
from .live_view import SinkView
from .metrics import SinkMetrics
from .protocol import Message, ScanStart, encode, without
from .scan_book import ScanRecord
from .scan_state import ScanState, missing_phase_warning
from .security import stop_authenticator
from .transport import Receiver, bound_endpoint, open_socket
from .writers import write_outputs

log = logging.getLogger(__name__)

MAX_ORPHAN_PAGES = 10_000  # result pages held for a scan whose scan_start has not arrived
SYNC_SECONDS = 1.0  # fsync journals this often (a kill loses nothing written; power loss at most this)


FINAL_ACK_SECONDS = 3.0
FINAL_LINGER_SECONDS = 1.5  # a sink that finished a scan answers heartbeats this long before it stops


class Sink:
    def __init__(self, *, bind: str = "tcp://127.0.0.1:0", out_dir="liveindex-out", http_host: str = "127.0.0.1",
                 http_port: int | None = 8080, max_scans: int | None = None, finish_timeout: float = 30.0,
                 idle_timeout: float = 600.0,
                 context: zmq.Context | None = None, stop_event: threading.Event | None = None,
                 on_finished=None, keys=None, clusters: int | None = None, index_cluster_means: bool = True):
        # A context of its own unless given one: ending it in ``run`` is what delivers the
        # last acknowledgements. A process that exits right after (``--once``, a child
        # process) otherwise drops them, and its publisher waits for pages it never hears of.
        self.out_dir = Path(out_dir)
        check_out_dir(self.out_dir)  # before saying ready: a sink that cannot write must not take scans
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.socket = open_socket(self.context, zmq.ROUTER, bind=bind, keys=keys)
        # An acknowledgement to a dispatcher that has gone raises, so it is kept for its successor.
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.endpoint = bound_endpoint(self.socket)
        self.max_scans = max_scans
        self.clusters = clusters  # the latent cluster map's count; None: HDBSCAN finds it (--clusters auto)
        self.index_cluster_means = index_cluster_means  # an indexer in the sink for them (latent_map.py)
        self.on_finished = on_finished  # called with the summaries so far after each scan is written
        self.finish_timeout = finish_timeout
        self.idle_timeout = idle_timeout
        self.stop_event = stop_event or threading.Event()
        self.metrics = SinkMetrics()
        self.metrics_registry = self.metrics.registry
        self.receiver = Receiver(self.metrics.bad_messages, role="sink")
        self.book: dict[str, ScanRecord] = {}  # scan id -> everything held for it
        self.current: ScanState | None = None  # the scan the live page shows
        self._journal_error_logged = False
        self._last_sync = time.monotonic()
        self.messages_seen = 0
        self.dispatcher_status: dict = {}
        self.dispatcher_heard = 0.0  # monotonic time of the last dispatcher heartbeat
        self.finished: list[dict] = []
        self._rate_window: collections.deque = collections.deque()
        self.latency_window: collections.deque = collections.deque()  # (time, page median latency)
        self.rate_now = 0.0
        # orix imported and its kernels compiled now, not on the first result page: the loop
        # must keep acknowledging pages while a scan starts.
        orientation_map.warm_up()
        self._recover()
        self.view = SinkView(self)  # what the live page reads
        # Clustering takes about a second: a thread of its own, never the loop's time.
        self._latent_stop = threading.Event()  # ends with ``run`` (or ``close``), whoever owns stop_event
        self.latent_refresher = LatentRefresher(lambda: list(self.scans.values()), stop_event=self._latent_stop)
        self.latent_refresher.start()
        self.http = LiveHttpServer(self.view, host=http_host, port=http_port).start() if http_port is not None else None
        log.info("sink listening on %s, writing to %s", self.endpoint, self.out_dir)

    # -- loop ----------------------------------------------------------------------------
    def run(self) -> list[dict]:
        """Receive until stopped, or until ``max_scans`` scans are written."""
        try:
            while not self.stop_event.is_set():
                if self.socket.poll(100):
                    self._drain()
                self._send_acks()
                self._sync_journals()
                self._check_deadlines()
                self._update_rate()
                if self.max_scans is not None and len(self.finished) >= self.max_scans:
                    break
        finally:
            # Acknowledgements still owed leave with us: retry briefly, so a dispatcher that
            # was busy or between reconnects still hears that its pages are safe.
            now = time.monotonic()
            deadline = now + FINAL_ACK_SECONDS
            # Having finished a scan, stay a moment to answer its dispatcher's heartbeats with
            # "complete" (two a second), not only until the first answer is out.
            linger = now + (FINAL_LINGER_SECONDS if self.finished else 0.0)
            while time.monotonic() < deadline:
                if self._send_acks() and time.monotonic() >= linger:
                    break
                if self.socket.poll(50):
                    self._drain()
            untold = sorted(scan for scan, record in self.book.items() if record.owes_word)
            if untold:
                log.warning("stopping with acknowledgements untold for scans %s; their publisher re-sends those "
                            "pages to the next sink, which has the journal", untold)
            self._latent_stop.set()
            self.socket.close(linger=2000)
            for record in self.book.values():
                record.close_journal()
            if self._own_context:
                stop_authenticator(self.context)
                self.context.term()  # waits (up to the linger) until queued messages are out
        return self.finished

    def close(self) -> None:
        self._latent_stop.set()
        if self.http is not None:
            self.http.stop()

    @property
    def scans(self) -> dict[str, ScanState]:
        """The maps held, by scan id (running scans and the last finished one)."""
        return {scan: record.state for scan, record in self.book.items() if record.state is not None}

    def _record(self, scan: str) -> ScanRecord:
        record = self.book.get(scan)
        if record is None:
            record = self.book[scan] = ScanRecord(scan)
        return record

    # -- persistence ------------------------------------------------------------------------
    def _recover(self) -> None:
        """Replay the journals of scans that were not finished when the last sink stopped."""
        if not self.out_dir.is_dir():
            return
        for path in sorted(self.out_dir.glob(f"*{JOURNAL_SUFFIX}")):
            scan = path.name[: -len(JOURNAL_SUFFIX)]
            summary_path = self.out_dir / f"{scan}.json"
            if summary_path.exists():
                record = self._record(scan)
                record.done = True
                try:
                    record.run = json.loads(summary_path.read_text()).get("run")
                except (OSError, ValueError, AttributeError):
                    record.run = None
                record.runs = {record.run}
                continue
            if path.is_symlink() or not path.is_file():
                log.warning("%s is not a journal the sink wrote (a link, or not a file); ignoring it", path)
                continue
            try:
                replayed = sum(self._accept(frames) for frames in replay(path))
            except OSError as exc:
                log.error("cannot read the journal %s (%s); ignoring it", path, exc.strerror or exc)
                continue
            record = self.book.get(scan)
            state = record.state if record is not None else None
            if state is None:
                log.warning("journal %s holds no scan_start; ignoring it", path)
                continue
            if not state.finished:
                record.journal = Journal(path, append=True)
            log.info("recovered scan %s from its journal: %d of %d points (%d messages)", scan, state.n_received,
                     state.size, replayed)
            if state.end is not None and not state.finished:
                record.deadline = time.monotonic() + self.finish_timeout

    def _journal(self, record: ScanRecord, raw: list | None) -> bool:
        """Append an accepted message to its scan's journal; False if the disk refused it."""
        if raw is None:  # replaying
            return True
        journal = record.journal
        if journal is None:
            return False
        try:
            journal.append(raw)
        except OSError as exc:
            if not self._journal_error_logged:
                self._journal_error_logged = True
                log.error("cannot write the journal %s (%s): results stay in memory and on the live page, but the "
                          "publisher keeps its copies until there is room; free space in %s", journal.path,
                          exc.strerror or exc, self.out_dir)
            return False
        self._journal_error_logged = False
        return True

    def _sync_journals(self) -> None:
        now = time.monotonic()
        if now - self._last_sync > SYNC_SECONDS:
            self._last_sync = now
            for record in self.book.values():
                if record.journal is not None:
                    try:
                        record.journal.sync()
                    except OSError:
                        pass  # reported by the next append

    def _send_acks(self) -> bool:
        """Tell dispatchers what is stored; True if nothing is left to tell."""
        for scan, record in self.book.items():
            if not record.owes_word or record.dispatcher is None:
                continue
            pages, complete = record.acks, record.complete_untold
            run = record.state.spec.run if record.state is not None else record.run
            header = {"scan": scan, "run": run, "pages": pages, **({"complete": True} if complete else {})}
            try:
                self.socket.send_multipart([record.dispatcher, *encode("stored", header)], flags=zmq.NOBLOCK)
            except zmq.Again:  # that dispatcher's queue is full: it is there, so try again later
                log.debug("the dispatcher of scan %s is busy; acknowledgements wait", scan)
                continue
            except zmq.ZMQError as exc:  # that dispatcher is gone; keep them for the next one to say hello
                log.info("the dispatcher of scan %s is unreachable (%s); acknowledgements wait for it", scan, exc)
                record.dispatcher = None
                continue
            log.debug("told the dispatcher of scan %s: pages %s stored%s", scan, pages, ", scan complete" * complete)
            record.acks = []
            record.complete_untold = False
        return not any(record.owes_word for record in self.book.values())

    def _drain(self) -> None:
        for _ in range(1000):  # bounded so deadlines and stop are checked under load
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.messages_seen += 1
            self._accept(frames[1:], identity=frames[0].bytes)

    def _accept(self, raw: list, identity: bytes | None = None) -> bool:
        """Decode and handle one message, live (from ``identity``) or replayed from a
        journal (no identity); a bad one is counted and dropped. True if it was taken."""
        message = self.receiver.decode(raw)
        if message is None:
            return False
        try:
            self._handle(message, identity, raw if identity is not None else None)
            return True
        except ProtocolError as exc:
            self.receiver.reject(exc)
        except (TypeError, ValueError, KeyError, IndexError) as exc:  # a field of the wrong kind
            self.receiver.reject(ProtocolError(f"{message.kind} message with a malformed field "
                                               f"({type(exc).__name__}: {exc})", message.header))
        return False

    def _handle(self, message: Message, identity: bytes | None, raw: list | None) -> None:
        """``identity`` and ``raw`` are None when replaying a journal."""
        kind, header = message.kind, message.header
        if kind == "heartbeat":
            self._heartbeat(header, identity)
            return
        if kind not in ("scan_start", "results", "scan_end"):
            raise ProtocolError(f"the sink does not take {kind!r} messages", header)
        scan = header["scan"]
        if kind == "results" and scan not in self.book and self._orphan_pages() >= MAX_ORPHAN_PAGES:
            raise ProtocolError("results for a scan that never started (orphan buffer full)", header)
        if kind == "scan_start":
            self._start(message, raw, identity)
            return
        record = self._record(scan)
        if kind == "scan_end" and identity is not None and header.get("run") in record.runs:
            record.dispatcher = identity  # where this scan's acknowledgements go
        if record.done and record.state is None:  # finished by an earlier sink: acknowledge, change nothing
            if kind == "results":
                record.acks.append(header["first"])
            return
        if kind == "results":
            if record.state is None:
                record.orphans.append((message, raw))
            else:
                self._add(record, message, raw)
        else:
            self._end(record, message, raw)

    def _orphan_pages(self) -> int:
        return sum(len(record.orphans) for record in self.book.values())

    def _heartbeat(self, header: dict, identity: bytes | None) -> None:
        if header.get("sender") != "dispatcher":
            return
        record = self.book.get(header.get("scan")) if isinstance(header.get("scan"), str) else None
        if record is not None and header.get("run") not in record.runs:
            return  # not this scan's publisher: it neither shows on the page nor gets acknowledgements
        self.dispatcher_status = header
        self.dispatcher_heard = time.monotonic()
        self.metrics.queue_depth.set(header.get("queue_depth", 0))
        self.metrics.workers_up.set(len(header.get("workers", [])))
        self.metrics.backlog.set(header.get("backlog_frames", 0))
        self.metrics.backlog_spilled.set(header.get("spilled_frames", 0))
        self.metrics.frames_dropped.set(header.get("dropped_frames", 0))
        if record is None:
            return
        if identity is not None:
            record.dispatcher = identity
        if record.state is not None and record.state.finished and record.state.complete:
            # Its dispatcher still publishes a scan we have whole: say so again, in case the
            # first "complete" went astray (it waits on every page's acknowledgement).
            record.complete_untold = True

    def _start(self, message: Message, raw: list | None, identity: bytes | None) -> None:
        header = message.header
        scan, run = header["scan"], header.get("run")
        record = self.book.get(scan)
        if record is not None and (record.state is not None or record.done) and run in record.runs:
            if identity is not None:
                record.dispatcher = identity
            log.info("scan %s started again; keeping the results already in", scan)
            return
        refusal = None if raw is None and identity is None else self._refusal(record, message)  # a replay was taken once
        if refusal is not None:
            if identity is not None and raw is not None:
                self._tell_refused(identity, scan, run, refusal)
            raise ProtocolError(f"scan_start refused: {refusal}", header)
        if record is not None and record.state is not None and not record.state.finished:
            # A publisher restarted for the same scan (``restart``): the results stored stay, and
            # results of either run fill it.
            record.runs.add(run)
            record.dispatcher = identity if identity is not None else record.dispatcher
            self._journal(record, raw)
            log.warning("scan %s restarted by its publisher (run %s); keeping the %d points already in", scan, run,
                        record.state.n_received)
            return
        orphans = [(m, r) for m, r in (record.orphans if record is not None else []) if m.header.get("run") in (None, run)]
        record = self.book[scan] = ScanRecord(scan, run=run, runs={run}, orphans=orphans,
                                              dispatcher=identity if identity is not None else None)
        state = record.state = ScanState(message, preview_path=self.out_dir / f"{scan}_patterns.npy",
                                         clusters=self.clusters, index_cluster_means=self.index_cluster_means)
        self.current = state
        for method in state.spec.methods:  # every label exported from the start: dashboards see zeros, not gaps
            self.metrics.frames_by_method.labels(method.label)
        if raw is not None:
            try:
                record.journal = Journal(self.out_dir / f"{scan}{JOURNAL_SUFFIX}")
            except OSError as exc:  # the disk refused: maps in memory, no page acknowledged until it takes them
                log.error("cannot create the journal of scan %s in %s (%s): results stay in memory and on the live "
                          "page, and the publisher keeps every page; free space or fix the folder", scan, self.out_dir,
                          exc.strerror or exc)
            self._journal(record, raw)
        log.info("scan %s started (%s): %s points, phases %s", scan, state.spec.modality,
                 "x".join(map(str, state.nav_shape[::-1])), ", ".join(state.phase_names))
        orphans, record.orphans = record.orphans, []
        for orphan, orphan_raw in orphans:
            try:
                self._add(record, orphan, orphan_raw)
            except ProtocolError as exc:  # an early page that does not fit the scan: counted, the rest go on
                self.receiver.reject(exc)

    def _refusal(self, record: ScanRecord | None, message: Message) -> str | None:
        """Why a scan_start cannot be taken (None: it can). Nothing a peer sends may discard
        results already stored or outputs already written."""
        header = message.header
        scan = header["scan"]
        running = record is not None and record.state is not None and not record.state.finished
        if running and not header.get("restart"):
            return (f"scan {scan} is running here under another run; a publisher that resumes it says so "
                    "(liveindex publish --restart), any other needs its own --scan-id")
        if not running and (record is not None and record.done or (self.out_dir / f"{scan}.json").exists()
                            or (self.out_dir / f"{scan}{JOURNAL_SUFFIX}").exists()):
            return (f"scan {scan} already has results in {self.out_dir} (another run); choose another --scan-id, or "
                    "move its files away")
        needed = _expected_bytes(ScanStart.from_header(header))
        free = shutil.disk_usage(self.out_dir).free
        if free < needed:
            return (f"not enough free space in {self.out_dir} for scan {scan}: it needs about {needed / 1e6:.0f} MB, "
                    f"{free / 1e6:.0f} MB are free; free space or start the sink with another --out")
        return None

    def _tell_refused(self, identity: bytes, scan: str, run, reason: str) -> None:
        try:
            self.socket.send_multipart([identity, *encode("stored", {"scan": scan, "run": run, "pages": [],
                                                                     "refused": reason})], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the publisher is gone or busy; it learns nothing is stored and says so after its timeouts

    def _end(self, record: ScanRecord, message: Message, raw: list | None) -> None:
        state, header = record.state, message.header
        if state is None:
            raise ProtocolError("scan_end for a scan the sink never saw start", header)
        if state.spec.run is not None and header.get("run") not in record.runs:
            raise ProtocolError(f"scan_end without this scan's run ({state.scan}); refused", header)
        if header["status"] == "success" and header["frames_sent"] < state.size:
            # A publisher that sent every frame says so; one that claims success early is wrong,
            # and ending the scan on its word would lose the rest.
            raise ProtocolError(f"scan_end claims success after {header['frames_sent']} of {state.size} frames; "
                                "refused (the scan keeps waiting for its points)", header)
        if state.end is None and not state.finished:
            self._journal(record, raw)
        state.end = header
        if state.complete or _has_every_frame_sent(state):
            self._finish(record)
        elif not state.finished:
            record.deadline = time.monotonic() + self.finish_timeout
            log.info("scan %s ended (%s) with %d of %d points in; waiting up to %.0f s for the rest",
                     state.scan, header["status"], state.n_received, state.size, self.finish_timeout)

    def _add(self, record: ScanRecord, message: Message, raw: list | None) -> None:
        state = record.state
        first = message.header["first"]
        run = message.header.get("run")
        if state.spec.run is not None and run not in record.runs:
            raise ProtocolError(f"results from another run of scan {state.scan} (a publisher restarted under the "
                                "same scan id); dropped", message.header)
        if state.finished:
            # Judged as any page is (a bad one counted the same whenever it comes), then
            # acknowledged: the scan has what it needs.
            invalid = int(state.judge(message).sum())
            if invalid:
                self.receiver.reject(ProtocolError(f"{invalid} result(s) with a NaN or non-unit quaternion refused",
                                                   message.header))
            self.metrics.duplicates.inc(message.header["count"])
            record.acks.append(first)
            if state.complete:
                record.complete_untold = True
            return
        fresh = state.add(message, replaying=raw is None)
        if state.last_page_invalid and raw is not None:
            # Counted as a bad message (the page's valid results are kept); the points it held
            # back wait for their page to be indexed again.
            self.receiver.reject(ProtocolError(f"{state.last_page_invalid} result(s) with a NaN or non-unit "
                                               "quaternion refused", message.header))
        new = int(fresh.sum())
        if raw is not None and "preview" in message.arrays:
            raw = without(message, "preview")  # previews live in their own file, not the journal
        # Acknowledge a page only once its results are in the journal: a page whose write
        # failed is written when it comes again, whatever the map already holds.
        pending = record.unjournaled
        if new or first in pending:
            if self._journal(record, raw):
                pending.discard(first)
            else:
                pending.add(first)
        if first not in pending and state.page_received(first, message.header["count"]):
            record.acks.append(first)
        self._count(state, message, fresh)
        if state.complete or _has_every_frame_sent(state):
            self._finish(record)

    def _count(self, state: ScanState, message: Message, fresh) -> None:
        """Metrics and the live rate for a page's new points."""
        new = int(fresh.sum())
        self.metrics.frames_received.inc(new)
        self.metrics.duplicates.inc(len(fresh) - new)
        spec = state.spec
        arrays = message.arrays
        self.metrics.frames_indexed.inc(int((spec.indexed(arrays) & fresh).sum()))
        if "method" in arrays:
            for code, n in enumerate(np.bincount(arrays["method"][fresh], minlength=len(spec.methods))):
                if n:
                    self.metrics.frames_by_method.labels(spec.methods[code].label).inc(int(n))
        latencies = state.latency_s[arrays["indices"][fresh]]
        latencies = latencies[latencies == latencies]  # NaN: the page carried no acquisition time
        for latency in latencies:
            self.metrics.latency.observe(float(latency))
        now = time.monotonic()
        page_latency = float(np.median(latencies)) if len(latencies) else None
        if page_latency is not None:
            self.latency_window.append((now, page_latency))
        self._rate_window.append((now, new))
        state.timeline.add(now, new, page_latency)
        self.metrics.progress.set(state.n_received / state.size)

    def _update_rate(self) -> None:
        now = time.monotonic()
        while self._rate_window and now - self._rate_window[0][0] > 2.0:
            self._rate_window.popleft()
        while self.latency_window and now - self.latency_window[0][0] > 2.0:
            self.latency_window.popleft()
        self.rate_now = sum(n for _, n in self._rate_window) / 2.0
        self.metrics.frames_per_second.set(self.rate_now)

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for record in list(self.book.values()):
            state = record.state
            if state is None or state.finished:
                record.deadline = None
                continue
            # A scan whose publisher died sends no scan_end: finish it once it has been quiet
            # for ``idle_timeout``, so its journal closes and its memory can go.
            quiet = time.time() - (state.t_last_result or state.t_start)
            if record.deadline is None and quiet > self.idle_timeout:
                log.error("scan %s: nothing for %.0f s and no scan_end; finishing it with %d of %d points",
                          state.scan, quiet, state.n_received, state.size)
                self._finish(record, f"no scan_end and nothing for {quiet:.0f} s: the publisher was lost")
            elif record.deadline is not None and now > record.deadline:
                log.error("scan %s: %d of %d points never arrived; writing them as not indexed",
                          state.scan, state.size - state.n_received, state.size)
                self._finish(record, f"{state.size - state.n_received} points never arrived within --finish-timeout "
                                     f"{self.finish_timeout:g} s after the scan_end")

    def _finish(self, record: ScanRecord, why: str | None = None) -> None:
        state = record.state
        if state.finished:
            return
        status, reason = outcome(state, why)  # shown once the files are written, with their links
        state.finished = True
        record.done = True
        record.deadline = None
        if state.complete:
            record.complete_untold = True
        if state.previews is not None:
            state.previews.flush()
        record.close_journal()
        summary = {**state.summary(), "status": status, "reason": reason}
        summary["bad_messages"] = self.receiver.bad_total  # counted by this sink process since it started
        err = summary.get("median_error_deg")
        if err is not None:
            self.metrics.error_median.set(err)
        try:
            maps = state.maps
            if state.latent is not None:
                state.refresh_latent(final=True)  # the last points in, clustered with the rest
                if state.latent.clusters.known:  # none where no point had an embedding (--latent off)
                    maps = {**maps, **state.latent.maps()}
                    summary["clusters"] = state.latent.info
                    summary["novel_points"] = state.novel_points()  # after the last refresh
            files = write_outputs(self.out_dir, state.scan, maps=maps, start=state.spec, summary=summary)
            summary["files"] = [p.name for p in files] + [f"{state.scan}.json"]
            if state.previews is not None:
                summary["files"].append(state.preview_path.name)
        except Exception as exc:  # never lose the loop (or the journal replay) to a writer's failure
            log.error("scan %s: writing the outputs failed: %s (the maps stay in memory and on the live page; the "
                      "journal keeps the results)", state.scan, exc, exc_info=not isinstance(exc, LiveIndexError))
            summary["error"] = str(exc)
        state.status = summary
        state.outcome = (status, reason)
        self._forget_finished_except(state)
        self.finished.append(summary)
        if self.on_finished is not None:
            self.on_finished(list(self.finished))
        (log.info if status == "complete" else log.error)(
            "scan %s %s: %d of %d points, %.0f frames/s%s%s", state.scan, status, state.n_received, state.size,
            summary["frames_per_second"], "" if err is None else f", median error {err:.2f} deg",
            "" if reason is None else f" ({reason})")
        warning = missing_phase_warning(summary)
        if warning:
            log.warning("scan %s: %s", state.scan, warning)

    def _forget_finished_except(self, keep: ScanState) -> None:
        """Hold the maps of the scan just finished (still on the page) and of running scans
        only; older finished scans are remembered by id and run, for late duplicates."""
        for record in self.book.values():
            state = record.state
            if state is not None and state.finished and state is not keep and state is not self.current:
                record.state = None


def outcome(state: ScanState, why: str | None = None) -> tuple[str, str | None]:
    """(complete | partial | failed, the reason): a scan with points missing is never complete."""
    missing = state.size - state.n_received
    end = state.end or {}
    if missing == 0 and not state.dropped_points:
        return "complete", None
    parts = [f"{missing} of {state.size} points missing"] if missing else []
    if state.dropped_points:
        parts.append(f"{state.dropped_points} frames dropped unindexed (preview mode)")
    if end.get("status") == "fail":
        parts.append(f"the publisher failed after sending {end.get('frames_sent')} frames")
    elif end.get("status") == "abort":
        parts.append(f"the publisher stopped the scan after sending {end.get('frames_sent')} frames")
    elif end.get("status") == "partial":
        parts.append(f"the acquisition ended after {end.get('frames_sent')} frames: {end.get('reason') or 'no reason given'}")
    elif why:
        parts.append(why)
    if state.rejected_points:
        parts.append(f"{state.rejected_points} results refused (NaN or non-unit orientation)")
    return ("failed" if end.get("status") == "fail" else "partial"), "; ".join(parts)


def _has_every_frame_sent(state: ScanState) -> bool:
    """The acquisition ended short ("partial") and every frame it did send is in: nothing more
    will come, so the scan is written now, not after --finish-timeout."""
    end = state.end or {}
    if end.get("status") != "partial":
        return False
    sent = min(int(end.get("frames_sent", 0)), state.size)
    return bool(state.received[:sent].all())


def check_out_dir(out_dir: Path) -> None:
    """The output folder exists (or is made) and takes files; InputError names the fix."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir} is a file; give the sink a folder (it is made if missing)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".liveindex-write-test-"):
            pass
    except OSError as exc:
        raise InputError(f"the sink cannot write to --out {out_dir} ({exc.strerror or exc}); give a folder it may "
                         "write to") from None


def _expected_bytes(start: ScanStart) -> int:
    """About what a scan writes: its journal and output files (about twice the result bytes
    each, for the HDF5, .ang, .ctf, npz: about 110 and 70 bytes a point for the two text
    files, within the margin) and a 1 kB preview a point."""
    per_point = sum(np.dtype(f.dtype).itemsize * int(np.prod(f.shape)) for f in start.fields) + 16
    return start.size * (6 * per_point + 1024)

"""Soak campaign: a long EBSD scan on the detector's clock through every fault at once, its
written map compared point by point with an undisturbed run of the same frames.

    python benchmarks/soak_campaign.py [--minutes 30] [--rate 200] [--workers 2]
           [--kill-worker-every 20] [--kill-sink-every 150] [--bad-every 0.5] [--spill-delay 0.02]

1. The scan (100 x N points of 60x60 moderate-noise Ni patterns, rendered before the clock)
   is first published undisturbed, as fast as the workers go: the reference map.
2. Then the same frames again, at ``--rate`` frames/s, while
   - a worker is killed with SIGKILL and a new one started every ``--kill-worker-every`` s;
   - the sink is killed with SIGKILL and restarted on the same folder and address every
     ``--kill-sink-every`` s (it replays its journal; the publisher keeps its pages);
   - a bad peer sends, every ``--bad-every`` s, one message that must be refused, in turn:
     to the sink garbage bytes, a page of real points with NaN orientations, a second
     scan_start under another run, a scan_end claiming success early, a dispatcher
     heartbeat with a broken worker list, a page with a field of the wrong dtype; to the
     dispatcher garbage bytes and a credit of -5 pages;
   - pages wait in 1 MB of memory, then spill to a disk whose every write is delayed by
     ``--spill-delay`` s (a slow disk, emulated in the publisher).
3. Both maps are compared point by point: points lost (missing from the campaign's map)
   and points that differ (phase, orientation, confidence or method not bit-identical).
   Every bad message sent must be counted by the part it was sent to.

Workers index with ``--indexer templates`` and the scan's static background supplied, so
that a page's answer depends on the page alone (the hybrid's network-skipping state and a
running-mean background depend on which pages a worker saw before), and bit-identical maps
are the bar. Exit status 1 if anything was lost, changed or not counted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render(rate: float, minutes: float):
    from liveindex.models.ebsd.files import array_source
    from liveindex.models.ebsd.geometry import DetectorGeometry
    from liveindex.models.ebsd.simulator import SimulatedScan

    width = 100
    height = max(1, int(rate * minutes * 60) // width)
    scan = SimulatedScan((height, width), noise="moderate", seed=31)
    frames = np.empty((scan.size, 60, 60), np.uint8)
    for first in range(0, scan.size, 8192):
        frames[first:first + 8192] = scan.render(first, min(8192, scan.size - first))
    source = array_source(frames.reshape(height, width, 60, 60), geometry=DetectorGeometry(), name="campaign")
    background = frames[:2000].astype(np.float32).mean(axis=0)
    return source, background


class Parts:
    """Sink and workers as child processes; the publisher here."""

    def __init__(self, out: Path, options: dict, workers: int):
        from liveindex.stream.processes import ChildProcess
        from liveindex.stream.roles import run_sink, run_worker

        self.ChildProcess, self.run_sink, self.run_worker = ChildProcess, run_sink, run_worker
        self.out = out
        self.sink_address = f"tcp://127.0.0.1:{_free_port()}"
        self.http_port = _free_port()
        self.options = options
        self.serial = 0
        self.sink = self.start_sink()
        self.workers = []
        self.n_workers = workers

    def start_sink(self):
        sink = self.ChildProcess("sink", self.run_sink, bind=self.sink_address, out_dir=str(self.out),
                                 http_port=self.http_port, max_scans=1, finish_timeout=300.0).start()
        sink.wait_ready(300)
        return sink

    def start_workers(self, dispatcher: str):
        while len(self.workers) < self.n_workers:
            self.serial += 1
            self.workers.append(self.ChildProcess(
                f"worker-{self.serial}", self.run_worker, dispatcher=dispatcher, sink=self.sink_address,
                name=f"w{self.serial}", options={"ebsd": self.options}).start())
        for w in self.workers:
            w.wait_ready(300)

    def status(self) -> dict:
        try:
            return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/status.json", timeout=5).read())
        except OSError:
            return {}

    def close(self):
        for w in self.workers:
            w.terminate()
        self.sink.terminate()


def publish(source, parts: Parts, **options):
    from liveindex.stream.publisher import Publisher

    publisher = Publisher(sink=parts.sink_address, page_size=64, worker_timeout=3.0, store_timeout=20.0,
                          sink_timeout=60.0, **options)
    parts.start_workers(publisher.endpoint)
    return publisher


class BadPeer(threading.Thread):
    """Sends one message that must be refused every ``every`` seconds, to the sink or the dispatcher."""

    def __init__(self, sink_address: str, dispatcher: str, scan: str, run: str, size: int, every: float):
        super().__init__(daemon=True)
        import zmq

        from liveindex.models.ebsd.results import FIELDS

        self.zmq = zmq
        self.every, self.scan, self.run_id, self.size = every, scan, run, size
        self.fields = FIELDS
        context = zmq.Context.instance()
        self.to_sink = context.socket(zmq.DEALER)
        self.to_sink.connect(sink_address)
        self.to_dispatcher = context.socket(zmq.DEALER)
        self.to_dispatcher.setsockopt(zmq.ROUTING_ID, b"bad-peer")
        self.to_dispatcher.connect(dispatcher)
        self.stop = threading.Event()
        self.paused = threading.Event()
        self.sent = {"sink": 0, "dispatcher": 0}
        self.rng = np.random.default_rng(5)
        self.turn = 0

    def _page(self, n: int, **change) -> dict:
        first = int(self.rng.integers(0, self.size - n))
        arrays = {f.name: f.allocate(n) for f in self.fields}
        arrays.update(change)
        return first, {"indices": np.arange(first, first + n, dtype=np.int64), **arrays}

    def message(self) -> tuple[str, list]:
        from liveindex.stream.protocol import encode

        self.turn += 1
        kind = self.turn % 8
        if kind == 0:
            return "sink", [b"\xc1 not msgpack"]
        if kind == 1:
            first, arrays = self._page(16, quaternion=np.full((16, 4), np.nan, np.float32))
            return "sink", encode("results", {"scan": self.scan, "run": self.run_id, "first": first, "count": 16,
                                              "worker": "bad-peer", "timings": {}}, arrays)
        if kind == 2:
            return "sink", [b"start"]  # replaced below by a real scan_start of another run
        if kind == 3:
            return "sink", encode("scan_end", {"scan": self.scan, "run": self.run_id, "frames_sent": 1,
                                               "status": "success"})
        if kind == 4:
            import msgpack

            return "sink", [msgpack.packb({"v": 2, "kind": "heartbeat", "sender": "dispatcher", "scan": self.scan,
                                           "workers": [1, 2], "buffers": []})]
        if kind == 5:
            first, arrays = self._page(8)
            arrays["confidence"] = arrays["confidence"].astype(np.float64)
            return "sink", encode("results", {"scan": self.scan, "run": self.run_id, "first": first, "count": 8,
                                              "worker": "bad-peer", "timings": {}}, arrays)
        if kind == 6:
            return "dispatcher", [b"\x00\x01 garbage"]
        import msgpack

        return "dispatcher", [msgpack.packb({"v": 2, "kind": "credit", "worker": "bad-peer", "pages": -5,
                                             "done": [], "buffers": []})]

    def run(self):
        while not self.stop.wait(self.every):
            if self.paused.is_set():
                continue
            target, frames = self.message()
            if frames == [b"start"]:
                frames = self.start_of_another_run
            (self.to_sink if target == "sink" else self.to_dispatcher).send_multipart(frames)
            self.sent[target] += 1

    def close(self):
        self.stop.set()
        self.join(5)
        self.to_sink.close(linger=2000)
        self.to_dispatcher.close(linger=0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="scan length at --rate")
    parser.add_argument("--rate", type=float, default=200.0, help="detector frames/s during the campaign")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kill-worker-every", type=float, default=20.0)
    parser.add_argument("--kill-sink-every", type=float, default=150.0)
    parser.add_argument("--bad-every", type=float, default=0.5)
    parser.add_argument("--spill-delay", type=float, default=0.02, help="seconds each spilled page's write waits")
    args = parser.parse_args()

    from liveindex.stream import page_store
    from liveindex.stream.processes import setup_logging
    from liveindex.stream.protocol import encode

    setup_logging(logging.WARNING)
    t0 = time.time()
    source, background = render(args.rate, args.minutes)
    options = {"indexer": "templates", "static_background": background}
    print(f"campaign: {source.size} frames ({source.nav_shape[1]}x{source.nav_shape[0]}) rendered in "
          f"{time.time() - t0:.0f} s; {args.workers} workers, {os.cpu_count()} cores", flush=True)
    root = Path(tempfile.mkdtemp(prefix="liveindex-campaign-"))

    # 1. The reference: undisturbed, as fast as the workers go.
    parts = Parts(root / "reference", options, args.workers)
    publisher = publish(source, parts)
    t = time.perf_counter()
    publisher.run(source, scan_id="campaign")
    parts.sink.wait(600)
    reference_seconds = time.perf_counter() - t
    publisher.close()
    parts.close()
    reference = np.load(root / "reference" / "campaign_maps.npz")
    print(f"reference: {source.size} frames in {reference_seconds:.0f} s", flush=True)

    # 2. The campaign.
    slow_spill = page_store.PageStore._spill

    def spill_slowly(self, first, patterns):
        time.sleep(args.spill_delay)
        return slow_spill(self, first, patterns)

    page_store.PageStore._spill = spill_slowly
    parts = Parts(root / "campaign", options, args.workers)
    publisher = publish(source, parts, rate=args.rate, memory_limit=1_000_000, spill_dir=root / "spill")
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(report=publisher.run(source, scan_id="campaign")))
    thread.start()
    while getattr(publisher, "run_id", None) is None or publisher.scan != "campaign":
        time.sleep(0.05)
    bad = BadPeer(parts.sink_address, publisher.endpoint, "campaign", publisher.run_id, source.size, args.bad_every)
    other = {k: v for k, v in json.loads(json.dumps(source.scan_start())).items()}
    bad.start_of_another_run = encode("scan_start", {"scan": "campaign", "run": "another-run", **other})
    bad.start()
    worker_kills = sink_kills = 0
    sink_counted = 0  # bad messages counted by sink processes killed since
    next_worker_kill = time.monotonic() + args.kill_worker_every
    next_sink_kill = time.monotonic() + args.kill_sink_every
    while thread.is_alive():
        thread.join(0.2)
        now = time.monotonic()
        acquiring = publisher.next_first < publisher.total
        if publisher.next_first >= 0.97 * publisher.total and not bad.paused.is_set():
            # The bad peer stops with the scan's last 3% still to come, so that the final sink
            # has counted all it sent before it writes its count into the scan's summary.
            bad.paused.set()
        if thread.is_alive() and acquiring and now >= next_worker_kill:
            victim = parts.workers.pop(0)
            victim.process.kill()
            victim.process.join(10)
            worker_kills += 1
            parts.start_workers(publisher.endpoint)
            next_worker_kill = time.monotonic() + args.kill_worker_every
        if thread.is_alive() and publisher.next_first < 0.97 * publisher.total and now >= next_sink_kill:
            # Every bad message sent so far is counted by this sink before it dies.
            bad.paused.set()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                counted = parts.status().get("bad_messages")
                if counted is not None and sink_counted + counted >= bad.sent["sink"]:
                    break
                time.sleep(0.2)
            sink_counted += parts.status().get("bad_messages", 0)
            parts.sink.process.kill()
            parts.sink.process.join(10)
            sink_kills += 1
            parts.sink = parts.start_sink()
            if publisher.next_first < 0.97 * publisher.total:
                bad.paused.clear()
            next_sink_kill = time.monotonic() + args.kill_sink_every
    report = result["report"]
    parts.sink.wait(600)
    summary = (parts.sink.info or {}).get("finished", [{}])[0]
    bad.close()
    publisher.close()
    parts.close()
    page_store.PageStore._spill = slow_spill

    # 3. Compare.
    campaign = np.load(root / "campaign" / "campaign_maps.npz")
    lost = int(summary.get("missing", source.size))
    names = [n for n in reference.files if n != "nav_shape"]
    differs = np.zeros(source.size, bool)
    for name in names:
        a, b = reference[name], campaign[name]
        differs |= (a != b).reshape(len(a), -1).any(axis=1)
    changed = int(differs.sum())
    sink_total = sink_counted + int(summary.get("bad_messages", 0))
    dispatcher_counted = publisher.receiver.bad_total
    print(f"campaign: {report.frames} frames at {args.rate:.0f} frames/s in {report.seconds / 60:.1f} min; "
          f"workers killed {worker_kills}, sink killed {sink_kills}; pages re-sent {report.pages_resent}, "
          f"frames spilled {report.frames_spilled} (each write +{args.spill_delay * 1e3:.0f} ms)")
    print(f"bad messages: to the sink {bad.sent['sink']} sent, {sink_total} counted; to the dispatcher "
          f"{bad.sent['dispatcher']} sent, {dispatcher_counted} counted")
    print(f"status {summary.get('status')}; points lost {lost}; points that differ from the undisturbed run "
          f"{changed} (fields compared: {', '.join(names)})")
    ok = (lost == 0 and changed == 0 and summary.get("status") == "complete" and report.status == "complete"
          and sink_total >= bad.sent["sink"] and dispatcher_counted >= bad.sent["dispatcher"])
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

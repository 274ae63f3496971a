"""A detector stream at the simulator's full rate (or --rate) through the pipeline.

    python benchmarks/detector_stream.py [--as merlin|dectris] [--scan 60x50] [--rate FPS] [--workers 2] [--indexer network]

Real processes on loopback: `liveindex replay --as merlin|dectris` (libertem-live's own
libertem-live-mib-sim serving a .mib, or libertem-live-dectris-sim a recorded SIMPLON stream
with bitshuffle/LZ4 frames, written from a simulated EBSD scan), `liveindex publish
--detector ...` as its one client, N workers (warmed first on a short simulated scan of the
same geometry) and a sink. Figures: the rate at which the publisher received the acquisition
(its log: "the acquisition ended after N of N frames in S s"), the sink's per-frame latency
from reception to the map (p50/p99), and whether any frame was dropped or missing. The loose
correctness check: phase Ni everywhere and the median error against the simulation's truth.
Note the load (uptime) beside the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

PC = ("0.425", "0.213", "0.501")


def cli(*args):
    return subprocess.Popen([sys.executable, "-m", "liveindex.stream", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--as", dest="kind", default="merlin", choices=["merlin", "dectris"])
    parser.add_argument("--scan", default="60x50")
    parser.add_argument("--rate", type=float, help="frames/s (default: the simulator's full rate)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--indexer", default="network", choices=["hybrid", "network", "templates"])
    parser.add_argument("--page-size", type=int, default=32)
    args = parser.parse_args()

    from liveindex.models.ebsd.master_patterns import disorientation_degrees
    from liveindex.models.ebsd.simulator import SimulatedScan, parse_nav_shape

    ny, nx = parse_nav_shape(args.scan)
    scan = SimulatedScan((ny, nx), noise="moderate", seed=13)
    tmp = Path(tempfile.mkdtemp(prefix="detector-stream-"))
    np.save(tmp / "scan.npy", scan.render(0, scan.size).reshape(ny, nx, 60, 60))
    dispatcher, sink_addr, out = f"ipc://{tmp}/dispatch.sock", f"ipc://{tmp}/sink.sock", tmp / "out"
    sink = cli("sink", "--bind", sink_addr, "--out", out, "--http-port", 0)
    workers = [cli("worker", "--dispatcher", dispatcher, "--sink", sink_addr, "--name", f"w{i}", "--indexer",
                   args.indexer) for i in range(args.workers)]
    for p in [sink, *workers]:
        threading.Thread(target=p.stderr.read, daemon=True).start()
        threading.Thread(target=p.stdout.read, daemon=True).start()
    data, control, trigger = free_ports(3)
    sim = None
    try:
        # Warm the workers on the same geometry (a simulated scan needs no detector).
        warm = subprocess.run([sys.executable, "-m", "liveindex.stream", "publish", "--simulate", "8x4", "--pc", *PC,
                               "--bind", dispatcher, "--sink", sink_addr, "--scan-id", "warm"],
                              capture_output=True, text=True, timeout=600)
        assert warm.returncode == 0, warm.stderr
        sim = cli("replay", tmp / "scan.npy", "--as", args.kind, "--port", data, "--control-port", control,
                  "--trigger-port", trigger, "--folder", tmp / "sim", *(["--rate", args.rate] if args.rate else []))
        line = sim.stdout.readline()  # where the stream is served
        threading.Thread(target=sim.stdout.read, daemon=True).start()
        threading.Thread(target=sim.stderr.read, daemon=True).start()
        if args.kind == "dectris":
            data = int(line.split("tcp://127.0.0.1:")[1].split(",")[0])
        else:
            time.sleep(3.0)  # the Merlin simulator listens a moment after it starts
        publish = subprocess.run([sys.executable, "-m", "liveindex.stream", "publish", "--detector", args.kind,
                                  "--port", str(data), "--scan-shape", f"{nx}x{ny}", "--pc", *PC, "--bind",
                                  dispatcher, "--sink", sink_addr, "--scan-id", "stream", "--page-size",
                                  str(args.page_size), "--arm-timeout", "120"],
                                 capture_output=True, text=True, timeout=900)
    finally:
        for p in [sim, sink, *workers]:
            if p is not None:
                p.terminate()
        for p in [sim, sink, *workers]:
            if p is not None:
                p.wait(30)
    received = re.search(r"acquisition ended after (\d+) of (\d+) frames in ([\d.]+) s \((\d+) frames/s\)",
                         publish.stderr)
    assert publish.returncode == 0, publish.stderr[-3000:]
    summary = json.loads((out / "stream.json").read_text())
    maps = np.load(out / "stream_maps.npz")
    error = float(np.median(disorientation_degrees(maps["quaternion"], scan.truth)))
    print(f"load: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} cores")
    print(f"{scan.size} frames of 60x60 uint8 from libertem-live-{'mib' if args.kind == 'merlin' else 'dectris'}-sim "
          f"({'full rate' if not args.rate else f'{args.rate:g} frames/s'}); {args.workers} workers, "
          f"--indexer {args.indexer}, pages of {args.page_size}")
    if received:
        print(f"received: {received.group(1)} of {received.group(2)} frames in {received.group(3)} s "
              f"({received.group(4)} frames/s, from the scan's start, connection included)")
    print(f"reception -> map: median {summary.get('latency_p50_s', float('nan')) * 1e3:.0f} ms, p99 "
          f"{summary.get('latency_p99_s', float('nan')) * 1e3:.0f} ms; sink: {summary['status']}, "
          f"{summary['received']} of {summary['points']} points, dropped {summary['dropped_points']}, "
          f"{summary['frames_per_second']} frames/s indexed")
    print(f"check: phase Ni everywhere: {bool((maps['phase_id'] == 0).all())}, median error {error:.2f} deg")
    print(publish.stdout.strip())
    return 0 if summary["status"] == "complete" else 1


if __name__ == "__main__":
    sys.exit(main())

"""Latency from a frame written into a growing NORDIF .dat to its point in the sink's map.

    python benchmarks/follow_latency.py [--scan 60x50] [--rate 1000] [--workers 2] [--indexer network]

Real processes on loopback ZeroMQ: a sink, N workers (warmed on a first short scan of the same
geometry, so no dictionary or session is built while the clock runs), `liveindex publish
--follow`, and the NORDIF writer (liveindex.models.ebsd.nordif_writer) appending the frames at
``--rate``. Two figures, per frame:

- write -> seen: when the writer's os.write returned (its write_times.npy) to when a follower
  of the same file saw the frame complete (a GrowingFile polled here, as the publisher's is);
- seen -> map: the sink's own per-frame latency (`liveindex_frame_latency_seconds`, from the
  acquisition time the publisher stamped on each frame to the result in the map; p50/p99 in
  the scan's summary).

write -> map is at most their sum. The loose correctness check: every frame in the map,
phase Ni, median error against the simulation's truth. Note the machine's load (uptime)
beside the figures: workers that cannot keep up with the rate make a backlog, and the
latency then grows with the scan.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

PC = ("0.425", "0.213", "0.501")


def cli(*args, **options):
    return subprocess.Popen([sys.executable, "-m", "liveindex.stream", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **options)


def write_scan(frames_path: Path, folder: Path, *options) -> None:
    subprocess.run([sys.executable, "-m", "liveindex.models.ebsd.nordif_writer", str(frames_path), str(folder),
                    *map(str, options)], check=True)


def follow_scan(frames_path, folder, scan_id, *, rate, dispatcher, sink, out, extra=()) -> dict:
    """One scan: publish --follow, then the writer; returns the sink's summary and the seen times."""
    write_scan(frames_path, folder, "--stop-after", 0)  # Setting.txt and an empty Pattern.dat
    publish = cli("publish", "--follow", folder / "Pattern.dat", "--pc", *PC, "--bind", dispatcher, "--sink", sink,
                  "--scan-id", scan_id, "--follow-timeout", 30, *extra)
    for line in publish.stderr:  # the publisher follows the file: start writing
        if "pages of" in line:
            break
    else:
        raise SystemExit(f"publish ended before following: {publish.communicate()}")
    threading.Thread(target=publish.stderr.read, daemon=True).start()
    from liveindex.models.ebsd.growing_files import follow_file

    watcher = follow_file(folder / "Pattern.dat", pc=[float(v) for v in PC], follow_timeout=30)
    seen_done = threading.Event()

    def watch():
        while watcher.end_reason is None:
            watcher.arrived(0.05)
        seen_done.set()

    threading.Thread(target=watch, daemon=True).start()
    write_scan(frames_path, folder, "--rate", rate)
    out_text = publish.stdout.read()
    publish.wait(600)
    seen_done.wait(60)
    summary_path = out / f"{scan_id}.json"
    t0 = time.monotonic()
    while not summary_path.exists() and time.monotonic() - t0 < 120:
        time.sleep(0.1)
    summary = json.loads(summary_path.read_text())
    written = np.load(folder / "write_times.npy")
    seen = watcher.frame_times(0, len(written))
    return {"summary": summary, "publish": out_text.strip(), "write_to_seen": seen - written,
            "rate_written": (len(written) - 1) / (written[-1] - written[0])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scan", default="60x50")
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--indexer", default="hybrid", choices=["hybrid", "network", "templates"])
    parser.add_argument("--no-refine", action="store_true")
    parser.add_argument("--page-size", type=int, default=32)
    args = parser.parse_args()

    from liveindex.models.ebsd.simulator import SimulatedScan, parse_nav_shape

    ny, nx = parse_nav_shape(args.scan)
    scan = SimulatedScan((ny, nx), noise="moderate", seed=11)
    tmp = Path(tempfile.mkdtemp(prefix="follow-latency-"))
    frames_path = tmp / "frames.npy"
    np.save(frames_path, scan.render(0, scan.size).reshape(ny, nx, 60, 60))
    warm_path = tmp / "warm.npy"
    np.save(warm_path, np.load(frames_path)[:2])
    dispatcher, sink_addr, out = f"ipc://{tmp}/dispatch.sock", f"ipc://{tmp}/sink.sock", tmp / "out"
    sink = cli("sink", "--bind", sink_addr, "--out", out, "--http-port", 0)
    worker_options = ["--indexer", args.indexer] + (["--no-refine"] if args.no_refine else [])
    workers = [cli("worker", "--dispatcher", dispatcher, "--sink", sink_addr, "--name", f"w{i}", *worker_options)
               for i in range(args.workers)]
    for p in [sink, *workers]:
        threading.Thread(target=p.stderr.read, daemon=True).start()
        threading.Thread(target=p.stdout.read, daemon=True).start()
    try:
        extra = ("--page-size", args.page_size)
        follow_scan(warm_path, tmp / "warm", "warm", rate=args.rate, dispatcher=dispatcher, sink=sink_addr, out=out,
                    extra=extra)
        run = follow_scan(frames_path, tmp / "scan", "scan", rate=args.rate, dispatcher=dispatcher, sink=sink_addr,
                          out=out, extra=extra)
    finally:
        for p in [sink, *workers]:
            p.terminate()
        for p in [sink, *workers]:
            p.wait(30)
    summary = run["summary"]
    maps = np.load(out / "scan_maps.npz")
    from liveindex.models.ebsd.master_patterns import disorientation_degrees

    error = float(np.median(disorientation_degrees(maps["quaternion"], scan.truth)))
    lag = run["write_to_seen"] * 1e3
    print(f"load: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} cores")
    print(f"{scan.size} frames written at {run['rate_written']:.0f} frames/s (asked {args.rate:g}); "
          f"{args.workers} workers, --indexer {args.indexer}{' --no-refine' if args.no_refine else ''}, "
          f"pages of {args.page_size}")
    print(f"write -> seen: median {np.median(lag):.2f} ms, p99 {np.percentile(lag, 99):.2f} ms, max {lag.max():.2f} ms")
    print(f"seen -> map: median {summary.get('latency_p50_s', float('nan')) * 1e3:.0f} ms, "
          f"p99 {summary.get('latency_p99_s', float('nan')) * 1e3:.0f} ms; sink: {summary['status']}, "
          f"{summary['received']} of {summary['points']} points, {summary['frames_per_second']} frames/s")
    print(f"check: phase Ni everywhere: {bool((maps['phase_id'] == 0).all())}, median error {error:.2f} deg")
    print(run["publish"])
    return 0 if summary["status"] == "complete" else 1


if __name__ == "__main__":
    sys.exit(main())

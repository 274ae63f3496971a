"""Soak: a long simulated scan at a rate the workers can hold, with workers killed (-9) and
restarted on a schedule, all on loopback. Prints frames sent, indexed, lost (must be 0),
duplicates, pages re-sent, and p50/p99 latency from acquisition to the sink.

    python benchmarks/soak.py [--seconds 60] [--rate 300] [--workers 2] [--restart-every 15]

Frames are rendered ahead of time (the simulator's cost stays out of the loop) and fed
to the publisher on the detector's clock (``rate``), so a worker's death shows up as
backlog and latency, never as a slower detector. Exit status 1 if any frame was lost.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import threading
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="scan length at --rate (bounds the run)")
    parser.add_argument("--rate", type=float, default=300.0, help="detector frames/s")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--restart-every", type=float, default=15.0, help="kill -9 a worker this often (s)")
    parser.add_argument("--page-size", type=int, default=32)
    args = parser.parse_args()

    from liveindex.models.ebsd.files import array_source
    from liveindex.models.ebsd.geometry import DetectorGeometry
    from liveindex.models.ebsd.simulator import SimulatedScan
    from liveindex.stream.processes import ChildProcess, setup_logging
    from liveindex.stream.publisher import Publisher
    from liveindex.stream.roles import run_sink, run_worker

    setup_logging(logging.WARNING)
    width = 100
    height = max(1, int(args.rate * args.seconds) // width)
    scan = SimulatedScan((height, width), noise="moderate", seed=21)
    source = array_source(scan.render(0, scan.size), geometry=DetectorGeometry(), name="soak")
    source.truth = scan.truth
    print(f"soak: {scan.size} frames ({width}x{height}) at {args.rate:.0f} frames/s = {scan.size / args.rate:.0f} s, "
          f"{args.workers} workers, one killed with SIGKILL every {args.restart_every:.0f} s, {os.cpu_count()} cores")

    out = tempfile.mkdtemp(prefix="liveindex-soak-")
    sink = ChildProcess("sink", run_sink, bind="tcp://127.0.0.1:0", out_dir=out, http_port=None, max_scans=1,
                        finish_timeout=60.0).start()
    sink_info = sink.wait_ready()
    publisher = Publisher(sink=sink_info["endpoint"], page_size=args.page_size, rate=args.rate, worker_timeout=3.0)
    serial = 0

    def start_worker():
        nonlocal serial
        serial += 1
        return ChildProcess(f"worker-{serial}", run_worker, dispatcher=publisher.endpoint,
                            sink=sink_info["endpoint"], name=f"soak-worker-{serial}").start()

    workers = [start_worker() for _ in range(args.workers)]
    for w in workers:
        w.wait_ready()
    result = {}
    thread = threading.Thread(target=lambda: result.update(report=publisher.run(source, scan_id="soak")))
    thread.start()
    kills = 0
    next_kill = time.monotonic() + args.restart_every
    while thread.is_alive():
        thread.join(0.2)
        if thread.is_alive() and time.monotonic() >= next_kill:
            victim = workers.pop(0)
            victim.process.kill()  # SIGKILL: no goodbye, pages in flight are lost with it
            victim.process.join(10)
            kills += 1
            workers.append(start_worker())
            next_kill = time.monotonic() + args.restart_every
    report = result["report"]
    sink.wait()
    summary = (sink.info or {}).get("finished", [{}])[0]
    publisher.close()
    for w in workers:
        w.terminate()
    lost = summary.get("missing", scan.size)
    print(f"frames sent {report.frames}, indexed {summary.get('indexed')}, lost {lost}, duplicates "
          f"{summary.get('duplicates')}, pages re-sent {report.pages_resent}, workers killed {kills}")
    print(f"latency acquisition->sink p50 {summary.get('latency_p50_s', float('nan')) * 1e3:.0f} ms, "
          f"p99 {summary.get('latency_p99_s', float('nan')) * 1e3:.0f} ms; publish {report.seconds:.1f} s; "
          f"median error {summary.get('median_error_deg')} deg (loose check: < 2.5)")
    ok = lost == 0 and summary.get("received") == scan.size and (summary.get("median_error_deg") or 99) < 2.5
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

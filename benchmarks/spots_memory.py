"""Peak resident memory of a spot-pattern worker with three phases' libraries.

    python benchmarks/spots_memory.py [--scan 40x40] [--workers 1] [--threads 1] [--page-size 128]
                                      [--phases ferrite,austenite,cementite] [--indexer hybrid|templates]

Issue 14: "a worker with three phases' libraries stays under 2 GB of memory". The sink, the
worker(s) and the publisher run as `liveindex` processes on loopback, as a user starts them
(`liveindex worker --modality spots`: the hybrid indexer with the shipped spot network bundle,
the matcher's templates of every phase, the refinement); the publisher simulates a precession
scan of the three steel phases (128x128 uint16 frames) and the workers index it page by page.
Each worker's peak resident set is the kernel's high-water mark (VmHWM in /proc/PID/status,
Linux), read once its scan is done and before it is stopped, so no short peak between samples
is missed; its resident set is also sampled every 0.2 s for the figure over the scan.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GB = 1024 ** 3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scan", default="40x40", help="simulated scan WxH (default 40x40)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="inference threads per worker (the worker's default 1)")
    parser.add_argument("--page-size", type=int, default=128, help="frames per page (the publisher's default 128)")
    parser.add_argument("--phases", default="ferrite,austenite,cementite")
    parser.add_argument("--indexer", default="hybrid", choices=("hybrid", "templates"),
                        help="the worker's indexer (default hybrid: the shipped network bundle, as workers run)")
    parser.add_argument("--limit-gb", type=float, default=2.0, help="exit 1 if a worker's peak exceeds this")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="spots-memory-") as tmp:
        sink_addr, disp_addr = f"tcp://127.0.0.1:{_free_port()}", f"tcp://127.0.0.1:{_free_port()}"
        spots = ("--modality", "spots")
        procs = [_start(tmp, "sink", "--bind", sink_addr, "--out", tmp, "--http-port", _free_port(), "--once",
                        "--finish-timeout", "30")]
        workers = [_start(tmp, "worker", "--dispatcher", disp_addr, "--sink", sink_addr, "--name", f"w{i}", *spots,
                          "--threads", args.threads, "--indexer", args.indexer) for i in range(args.workers)]
        procs += workers
        publisher = _start(tmp, "publish", "--bind", disp_addr, "--sink", sink_addr, "--scan-id", "memory", *spots,
                           "--phases", args.phases, "--simulate", args.scan, "--page-size", args.page_size)
        procs.append(publisher)
        samples = {w.pid: [] for w in workers}
        start = time.monotonic()
        try:
            while publisher.poll() is None:
                for w in workers:
                    rss = _status_kb(w.pid, "VmRSS")
                    if rss:
                        samples[w.pid].append(rss * 1024)
                time.sleep(0.2)  # sampling a live process's memory, for the figure over the scan
            seconds = time.monotonic() - start
            sink_out, _ = procs[0].communicate(timeout=120)
            summary = json.loads(sink_out.strip().splitlines()[-1])
            peaks = [_status_kb(w.pid, "VmHWM") * 1024 for w in workers]  # the workers still run: read them now
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            logs = {p.pid: p.log.read_text() for p in procs}
        if publisher.returncode != 0:
            print(logs[publisher.pid][-3000:], file=sys.stderr)
            return 2

    print(f"{summary['received']} frames ({args.scan}, pages of {args.page_size}) through {args.workers} worker(s), "
          f"{args.threads} thread(s) each, phases {args.phases}, {seconds:.1f} s; missing {summary['missing']}; "
          f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    worst = 0.0
    for w, peak in zip(workers, peaks):
        ready = [line.split("INFO ", 1)[-1] for line in logs[w.pid].splitlines() if "spot indexer ready" in line]
        over = samples[w.pid]
        worst = max(worst, peak)
        print(f"  worker pid {w.pid}: peak RSS (VmHWM) {peak / GB:.2f} GB; sampled RSS median "
              f"{_median(over) / GB:.2f} GB, last {over[-1] / GB if over else 0:.2f} GB")
        for line in ready:
            print(f"    {line}")
    print(f"largest worker peak {worst / GB:.2f} GB against the {args.limit_gb:g} GB bar: "
          f"{'under' if worst < args.limit_gb * GB else 'OVER'}")
    return 0 if worst < args.limit_gb * GB else 1


def _start(folder, role, *args):
    """A `liveindex ROLE` process; its log to a file (a pipe nobody reads would fill and stall it)."""
    log = Path(folder) / f"{role}-{len(list(Path(folder).glob(role + '-*.log')))}.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "liveindex.stream", role, *map(str, args)],
                                stdout=subprocess.PIPE, stderr=err, text=True)
    proc.log = log
    return proc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status_kb(pid: int, key: str) -> int:
    """A /proc/PID/status memory line in kB (0 once the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _median(values) -> float:
    return sorted(values)[len(values) // 2] if values else 0.0


if __name__ == "__main__":
    sys.exit(main())

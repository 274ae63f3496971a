"""Latency from a frame appended to an h5ebsd file in SWMR mode to liveindex seeing it.

    python benchmarks/follow_h5_latency.py [--scan 60x50] [--rate 1000] [--layout kikuchipy|bruker|edax]

A writer process (liveindex.models.ebsd.h5ebsd_writer) appends the frames at ``--rate`` (resize,
write, flush; its write times after each flush); a follower here (the source ``publish --follow``
uses) refreshes the dataset, reads every frame as it appears, and stamps when it saw it. The
seen -> map part is the same as for the other formats (benchmarks/follow_latency.py). Note the
machine's load beside the figures.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PC = (0.425, 0.213, 0.501)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scan", default="60x50")
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--layout", default="kikuchipy", choices=["kikuchipy", "bruker", "edax"])
    args = parser.parse_args()

    from liveindex.models.ebsd.growing_files import follow_file
    from liveindex.models.ebsd.simulator import SimulatedScan, parse_nav_shape

    ny, nx = parse_nav_shape(args.scan)
    scan = SimulatedScan((ny, nx), noise="moderate", seed=11)
    tmp = Path(tempfile.mkdtemp(prefix="follow-h5-latency-"))
    frames = tmp / "frames.npy"
    np.save(frames, scan.render(0, scan.size).reshape(ny, nx, 60, 60))
    path = tmp / "scan.h5"
    writer = subprocess.Popen([sys.executable, "-m", "liveindex.models.ebsd.h5ebsd_writer", str(frames), str(path),
                               "--rate", str(args.rate), "--layout", args.layout, "--start-delay", "2"])
    while not path.exists():
        time.sleep(0.005)
    source = follow_file(path, pc=PC, follow_timeout=30)
    read = 0
    while source.end_reason is None:
        arrived = source.arrived(0.02)
        if arrived > read:
            source.read(read, arrived - read)
            read = arrived
    writer.wait(60)
    written = np.load(str(path) + ".write_times.npy")
    lag = (source.frame_times(0, len(written)) - written) * 1e3
    source.close()
    print(f"load: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} cores")
    print(f"{args.layout} h5ebsd, SWMR: {len(written)} frames written at "
          f"{(len(written) - 1) / (written[-1] - written[0]):.0f} frames/s (asked {args.rate:g}), {read} read; "
          f"write -> seen: median {np.median(lag):.2f} ms, p99 {np.percentile(lag, 99):.2f} ms, max {lag.max():.2f} ms")
    return 0 if read == len(written) else 1


if __name__ == "__main__":
    sys.exit(main())

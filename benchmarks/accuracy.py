"""Accuracy of the default indexer on simulated scans at each noise level.

    python benchmarks/accuracy.py [--scan 40x40] [--seed 11]

Prints, per noise level: patterns/s of `liveindex index`'s code path (one process, all
cores), median and 95th-percentile disorientation to ground truth, and the fraction within
3 degrees.
"""

from __future__ import annotations

import argparse
import logging
import sys

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scan", default="40x40")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()

    from liveindex.models.phases import disorientation_degrees
    from liveindex.stream.offline import index_source
    from liveindex.stream.processes import setup_logging
    from liveindex.stream.simulator import NOISE_LEVELS, SimulatedScan, parse_nav_shape
    from liveindex.stream.sources import SimulatedSource

    setup_logging(logging.WARNING)
    print(f"{'noise':9s} {'patterns/s':>10s} {'median':>8s} {'p95':>8s} {'<3 deg':>8s}")
    for noise in NOISE_LEVELS:
        scan = SimulatedScan(parse_nav_shape(args.scan), noise=noise, seed=args.seed)
        source = SimulatedSource(scan)
        result, seconds = index_source(source, progress=False)
        err = disorientation_degrees(result.quaternion, scan.truth)
        print(f"{noise:9s} {scan.size / seconds:10.0f} {np.median(err):7.2f}° {np.percentile(err, 95):7.2f}° "
              f"{100 * np.mean(err < 3):7.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Accuracy and speed of the indexer's modes on simulated scans at each noise level.

    python benchmarks/accuracy.py [--scan 40x40] [--seed 11] [--modes network,hybrid,templates]

Prints, per noise level and mode: patterns/s of `liveindex index`'s code path (one process,
all cores, pages of 256, the scan rendered before the clock), median and 95th-percentile disorientation to ground truth, the
fraction within 3 degrees, and which method answered how many points. The modes:

  network    the network alone (`--indexer network --no-refine`);
  hybrid     liveindex's default: the network first, refined; template matching where it is
             unsure or its start refines to a poor fit;
  templates  template matching only, refined (`--indexer templates`).
"""

from __future__ import annotations

import argparse
import logging
import sys

import numpy as np

MODES = {"network": {"indexer": "network", "refine": False}, "hybrid": {}, "templates": {"indexer": "templates"}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scan", default="40x40")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {','.join(MODES)}")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"--modes {args.modes!r}: use some of {','.join(MODES)}")

    from liveindex.models.ebsd.files import array_source
    from liveindex.models.ebsd.master_patterns import disorientation_degrees
    from liveindex.models.ebsd.results import METHODS
    from liveindex.models.ebsd.simulator import NOISE_LEVELS, SimulatedScan, parse_nav_shape
    from liveindex.stream.offline import index_source
    from liveindex.stream.processes import setup_logging

    setup_logging(logging.WARNING)
    print(f"{'noise':9s} {'mode':10s} {'patterns/s':>10s} {'median':>8s} {'p95':>8s} {'<3 deg':>8s}  methods")
    for noise in NOISE_LEVELS:
        scan = SimulatedScan(parse_nav_shape(args.scan), noise=noise, seed=args.seed)
        # Rendered before the clock: the simulator's cost is not the indexer's.
        source = array_source(scan.render(0, scan.size), geometry=scan.geometry, phases=(scan.phase,), name="accuracy")
        for mode in modes:
            result, seconds = index_source(source, progress=False, **MODES[mode])
            err = disorientation_degrees(result["quaternion"], scan.truth)
            counts = np.bincount(result["method"], minlength=len(METHODS))
            used = ", ".join(f"{METHODS[k].label} {n}" for k, n in enumerate(counts) if n)
            print(f"{noise:9s} {mode:10s} {scan.size / seconds:10.0f} {np.median(err):7.2f}° "
                  f"{np.percentile(err, 95):7.2f}° {100 * np.mean(err < 3):7.1f}%  {used}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

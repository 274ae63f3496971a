"""Fit the confidence calibration: refined NCC -> probability that a point is right (< 3 deg).

Indexes simulated scans with known orientations at every noise level (plus a harsher one,
so there are enough wrong points to see the tail), pools the refined NCC of each point with
whether it landed within 3 deg, and prints:

- the smallest NCC threshold above which at least 99.5% of points are right (the 0.5 point
  of the confidence, with margin over the 99% promise),
- the logistic width that fits the right/wrong split around it,
- and, for the constants in stream/scan_indexer.py, how often points above confidence 0.5
  are right per noise level.

    .venv/bin/python benchmarks/calibrate_confidence.py [--size 30] [--seeds 11,12]
"""

from __future__ import annotations

import argparse

import numpy as np

from liveindex.models.ebsd.indexer import ScanIndexer, confidence_from_ncc
from liveindex.models.ebsd.master_patterns import disorientation_degrees
from liveindex.models.ebsd.simulator import NOISE_LEVELS, NoiseLevel, SimulatedScan

EXTRA_LEVELS = {"harsh": NoiseLevel(contrast=0.2, counts=20.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=30, help="scan side (points); grain size 1, so every point differs")
    parser.add_argument("--seeds", default="11,12")
    args = parser.parse_args()
    NOISE_LEVELS.update(EXTRA_LEVELS)
    indexer = None
    ncc, right, level = [], [], []
    for noise in ("clean", "moderate", "hard", "harsh"):
        for seed in map(int, args.seeds.split(",")):
            scan = SimulatedScan((args.size, args.size), noise=noise, seed=seed, grain_size=1)
            indexer = indexer or ScanIndexer(scan.geometry, ["ni"], progress=False)
            result = indexer.index(scan.render(0, scan.size))
            error = np.asarray(disorientation_degrees(result.quaternion, scan.truth))
            ncc.append(result.score)
            right.append(error < 3)
            level += [noise] * scan.size
    ncc, right, level = np.concatenate(ncc), np.concatenate(right), np.array(level)
    order = np.argsort(-ncc)
    precision = np.cumsum(right[order]) / np.arange(1, len(order) + 1)
    ok = np.flatnonzero(precision >= 0.995)
    threshold = float(ncc[order][ok.max()]) if len(ok) else float("nan")
    # Logistic width by a one-parameter maximum likelihood around that threshold.
    widths = np.geomspace(0.002, 0.1, 60)
    loglik = [np.sum(np.where(right, -np.logaddexp(0, -(ncc - threshold) / w), -np.logaddexp(0, (ncc - threshold) / w)))
              for w in widths]
    width = float(widths[int(np.argmax(loglik))])
    print(f"{len(ncc)} points, {int((~right).sum())} wrong; >=99.5% right above NCC {threshold:.4f}; logistic width "
          f"{width:.4f}")
    confidence = confidence_from_ncc(ncc)
    for noise in dict.fromkeys(level):
        mine = level == noise
        sure = mine & (confidence > 0.5)
        print(f"  {noise:9s} confidence > 0.5 on {sure.sum() / mine.sum():6.1%} of points; of those "
              f"{right[sure].mean():.2%} right; right points below 0.5: {int((right & mine & ~sure).sum())}")


if __name__ == "__main__":
    main()

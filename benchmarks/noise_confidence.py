"""Is pure noise ever confident? And what does the noise guard cost right answers?

models/ebsd/confidence.py multiplies each answer's confidence by ``above_noise``: how rarely a
frame of pure noise, indexed by the same indexer, fits as well. This prints, for Poisson noise
frames of several sizes (300 each, phase Ni, PC 0.5 0.5 0.5), how many come out above
confidence 0.5 without and with the guard; and for simulated Ni scans (20x20 points, 60x60
patterns, moderate and hard noise, two seeds) and hcp Ti ones (tests/data/ti.cif, one seed) how
many points are above 0.5 without and with it.

    .venv/bin/python benchmarks/noise_confidence.py
"""

from __future__ import annotations

import logging

import numpy as np

from liveindex.models.ebsd.geometry import DetectorGeometry
from liveindex.models.ebsd.indexer import ScanIndexer
from liveindex.models.ebsd.master_patterns import phases_from_spec, register
from liveindex.models.ebsd.simulator import SimulatedScan

TI_CIF = __import__("pathlib").Path(__file__).resolve().parents[1] / "tests" / "data" / "ti.cif"


def confident(indexer: ScanIndexer, frames: np.ndarray, background) -> tuple[int, int]:
    """Points above confidence 0.5 without the noise guard, and with it."""
    guard = indexer._noise_scores
    indexer._noise_scores = None
    without = int((indexer.index(frames, background).confidence > 0.5).sum())
    indexer._noise_scores = guard
    return without, int((indexer.index(frames, background).confidence > 0.5).sum())


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    for size in (8, 12, 16, 24, 60):
        indexer = ScanIndexer(DetectorGeometry((size, size), pc=(0.5, 0.5, 0.5)), ["ni"], progress=False,
                              indexer="templates", min_confidence=0.0)
        frames = np.random.default_rng(5).poisson(500, (300, size, size)).astype(np.float32)
        without, with_guard = confident(indexer, frames, None)
        print(f"noise {size:2d}x{size:<2d}: of 300 frames above confidence 0.5: {without:3d} without the guard, "
              f"{with_guard} with it", flush=True)
    ti = register(phases_from_spec(f"ti={TI_CIF}")[0])
    for phase, seeds in (("ni", (3, 4)), (ti, (3,))):
        for noise in ("moderate", "hard"):
            for seed in seeds:
                scan = SimulatedScan((20, 20), noise=noise, phase=phase, seed=seed, grain_size=2)
                indexer = ScanIndexer(scan.geometry, [phase], progress=False, indexer="templates", min_confidence=0.0)
                without, with_guard = confident(indexer, scan.render(0, scan.size), indexer.new_background())
                print(f"simulated {phase.split('-')[0]}, {noise} noise, seed {seed}: of 400 points above 0.5: "
                      f"{without} without the guard, {with_guard} with it", flush=True)


if __name__ == "__main__":
    main()

"""Patterns/s and memory of one worker's indexer with one, two and four phases.

A simulated Ni scan (moderate noise) is indexed with the phases ni; ni + fe; ni + fe + ni3al
+ hcp Ti (tests/data/ti.cif), template matching on (the network covers ni/fe/ni3al only, so
every run matches templates: the same path for all). Each indexer is built first (its
dictionaries from the cache, or built now), then the scan is indexed twice and the faster
pass kept; each phase count runs in a fresh process, whose peak resident memory
(ru_maxrss) is the worker's footprint with those phases.

    .venv/bin/python benchmarks/phase_scaling.py [--scan 30x30] [--noise moderate]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

SETS = {1: "ni", 2: "ni,fe", 4: f"ni,fe,ni3al,{Path(__file__).resolve().parents[1] / 'tests' / 'data' / 'ti.cif'}"}


def run_one(phases: str, scan: str, noise: str) -> dict:
    import resource

    import numpy as np

    from liveindex.models.crystal import disorientation_by_phase
    from liveindex.models.ebsd.files import array_source
    from liveindex.models.ebsd.master_patterns import phases_from_spec
    from liveindex.models.ebsd.simulator import SimulatedScan, parse_nav_shape
    from liveindex.stream.offline import index_source

    records = phases_from_spec(phases)
    sim = SimulatedScan(parse_nav_shape(scan), noise=noise, seed=21, grain_size=1)
    frames = sim.render(0, sim.size)
    source = array_source(frames, geometry=sim.geometry, phases=records, name="phase-scaling")
    index_source(array_source(frames[:64], geometry=sim.geometry, phases=records), progress=False,
                 indexer="templates", min_confidence=0.0)  # builds and warms everything up
    best = None
    for _ in range(2):
        fields, seconds = index_source(source, progress=False, indexer="templates", min_confidence=0.0)
        best = seconds if best is None else min(best, seconds)
    right = fields["phase_id"] == 0
    error = disorientation_by_phase(fields["quaternion"], sim.truth, np.zeros(sim.size, int), records[:1])
    return {"phases": [r.name for r in records], "patterns_per_s": round(sim.size / best, 1),
            "right_phase": round(float(right.mean()), 4), "within_3deg": round(float(np.mean(error < 3)), 4),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scan", default="30x30")
    parser.add_argument("--noise", default="moderate")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: one phase set
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.scan, args.noise)))
        return 0
    rows = []
    for count, phases in SETS.items():
        out = subprocess.run([sys.executable, __file__, "--one", phases, "--scan", args.scan, "--noise", args.noise],
                             capture_output=True, text=True, check=True).stdout
        rows.append((count, json.loads(out.strip().splitlines()[-1])))
    one = rows[0][1]["patterns_per_s"]
    print(f"{'phases':>6s} {'patterns/s':>10s} {'vs one':>7s} {'right phase':>11s} {'<3 deg':>7s} {'peak RSS':>9s}  names")
    for count, r in rows:
        print(f"{count:6d} {r['patterns_per_s']:10.0f} {r['patterns_per_s'] / one:6.2f}x {100 * r['right_phase']:10.1f}% "
              f"{100 * r['within_3deg']:6.1f}% {r['peak_rss_mb']:7.0f} MB  {', '.join(r['phases'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

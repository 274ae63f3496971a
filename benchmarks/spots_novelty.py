"""The spot latent maps' novelty on simulated 4D-STEM scans: is a missing phase marked, and are
unsure grains of listed phases left alone?

A 40x40 precession scan of the simulator (models/spots/simulator.py: Voronoi grains, an
amorphous disc) of ferrite, austenite and cementite, and with ``--missing`` hcp Ti too (a
phase not in the list), indexed with the three steel phases as ``liveindex index`` does
(stream/offline.py: index_source, then the finished scan's latent maps); prints, per truth
phase, the points with novelty >= 0.5, and the line ``liveindex index`` prints about points
that fit no listed phase (stream/scan_state.py missing_phase_warning: it asks "is a phase
missing?" only where the latent maps find a population no listed phase explains). ``--all-missing``
makes every grain hcp Ti, a scan of no listed phase at all. ``--no-gate`` runs without the match-score gate
(models/latent/clusters.py QUALITY_GATE), for comparison.

    .venv/bin/python benchmarks/spots_novelty.py --noise hard --seed 9
    .venv/bin/python benchmarks/spots_novelty.py --noise hard --seed 9 --missing
    .venv/bin/python benchmarks/spots_novelty.py --noise moderate --seed 5 --all-missing
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from liveindex.models import modality as modalities
from liveindex.models.arrays import ArraySource
from liveindex.models.crystal import record_from_cif
from liveindex.models.latent import clusters as latent_clusters
from liveindex.models.spots.phases import phases_from_spec
from liveindex.models.spots.setup import check_setup
from liveindex.models.spots.simulator import SimulatedSpotScan
from liveindex.stream.offline import index_source, latent_maps
from liveindex.stream.protocol import ScanStart
from liveindex.stream.scan_state import missing_phase_warning

TI_CIF = Path(__file__).resolve().parents[1] / "tests" / "data" / "ti.cif"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--noise", default="moderate", choices=["clean", "moderate", "hard"])
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--missing", action="store_true", help="hcp Ti grains too, not in the list")
    p.add_argument("--all-missing", action="store_true",
                   help="every grain hcp Ti: a scan of no listed phase at all (the line must ask)")
    p.add_argument("--size", type=int, default=40, help="the scan is SIZE x SIZE points")
    p.add_argument("--no-gate", action="store_true", help="the novelty without the match-score gate")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.no_gate:
        latent_clusters.QUALITY_GATE = np.inf
    listed = phases_from_spec("ferrite,austenite,cementite")
    ti = record_from_cif(str(TI_CIF), name="ti")
    # --all-missing: the scan's only phase is Ti, so truth phase 0 is Ti (named so below).
    phases = [ti] if args.all_missing else listed + ([ti] if args.missing else [])
    setup = check_setup({"kv": 200.0, "calibration": 0.03, "precession": 1.0}, (128, 128))
    n = args.size
    scan = SimulatedSpotScan((n, n), phases, setup, noise=args.noise, seed=args.seed)
    frames = np.concatenate([scan.render(i, min(200, scan.size - i)) for i in range(0, scan.size, 200)]).reshape(
        n, n, 128, 128)
    source = ArraySource(frames, modality=modalities.load("spots"), setup=setup, phases=listed, name="scan")
    maps, _ = index_source(source, threads=args.threads, providers="cpu", progress=False, bundle="default")
    start = ScanStart.from_header({"scan": "scan", **source.scan_start()})
    novel = latent_maps(maps, start)["novelty"] >= latent_clusters.NOVEL
    truth = scan.truth_phase.ravel()
    names = {-1: "amorphous", **{i: ph.name for i, ph in enumerate(phases)}}
    per_phase = {names[p]: {"points": int((truth == p).sum()), "novel": int(novel[truth == p].sum()),
                            "novel_share": round(float(novel[truth == p].mean()), 4)} for p in np.unique(truth)}
    listed_points = (truth >= 0) & (truth < len(listed)) if not args.all_missing else np.zeros(truth.shape, bool)
    line = missing_phase_warning({"points": scan.size, "unexplained": int(np.count_nonzero(start.unexplained(maps))),
                                  "novel_points": int(novel.sum())})
    report = {"set": {"noise": args.noise, "seed": args.seed, "size": n, "missing": args.missing,
                      "all_missing": args.all_missing, "gate": not args.no_gate},
              "per_truth_phase": per_phase, "listed_points_novel": int(novel[listed_points].sum()), "line": line}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

"""The spot networks (models/spots/network.py) on the side-by-side benchmark's set: the networks
alone (phase, and the orientation network's best template turned in-plane by its correlation,
no refinement) and the indexer without and with the bundle (``--indexer templates`` and
``hybrid``), same frames, same run, one after the other.

    .venv/bin/python benchmarks/spots_networks.py --n 1200 --noise moderate --seed 7 --json out.json
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import time

import numpy as np
from spots_side_by_side import finish_report, summary  # benchmarks/, beside this script

from liveindex.models.crystal import record_from_cif
from liveindex.models.spots.evaluate import make_set, score_answers
from liveindex.models.spots.indexer import SpotIndexer, find_centers
from liveindex.models.spots.phases import phases_from_spec
from liveindex.models.spots.setup import check_setup
from liveindex.models.spots.templates import in_plane

log = logging.getLogger("spots_networks")
HERE = os.path.dirname(os.path.abspath(__file__))


def run(indexer, frames):
    indexer.index(frames[:64])  # warm-up
    start = time.perf_counter()
    parts = [indexer.index(frames[i:i + 256]) for i in range(0, len(frames), 256)]
    rate = len(frames) / (time.perf_counter() - start)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, rate


def networks_alone(indexer, frames):
    """The networks' own answer: the classifier's phase, the orientation network's best template
    of that phase at its correlated in-plane angle."""
    data = frames.astype(np.float32)
    start = time.perf_counter()
    polar = indexer.matcher.match(data, find_centers(data))[3]
    matched = time.perf_counter() - start
    start = time.perf_counter()
    probs, features = indexer.network.phase_probabilities(polar)
    templates, alpha, _ = indexer.network.candidates(polar, features, probs.argmax(1))
    network_s = time.perf_counter() - start
    q = in_plane(indexer.template_q[templates[:, 0]], alpha[:, 0])
    phase = indexer.template_phase[templates[:, 0]]
    return {"phase_id": phase, "quaternion": q, "classifier_phase": probs.argmax(1)}, network_s, matched


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1200)
    p.add_argument("--noise", default="moderate", choices=["clean", "moderate", "hard"])
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--bundle", default="default")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--absent", type=int, default=0, help="also index this many patterns of hcp Ti (not in the list)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    phases = phases_from_spec("ferrite,austenite,cementite")
    setup = check_setup({"kv": 200.0, "calibration": 0.03, "precession": 1.0}, (128, 128))
    ev = make_set(phases, setup, args.n, noise=args.noise, seed=args.seed, center_jitter=False)
    report = {"set": {"n": args.n, "noise": args.noise, "seed": args.seed}, "bundle": args.bundle,
              "load_before": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}
    hybrid = SpotIndexer(setup, phases, (128, 128), threads=args.threads, bundle=args.bundle)
    alone, network_s, matcher_s = networks_alone(hybrid, ev.frames)
    report["networks_alone"] = summary(score_answers(alone, ev.quaternions, ev.phase_id, phases))
    report["networks_alone"]["classifier_right_phase"] = round(float((alone["classifier_phase"] == ev.phase_id).mean()), 4)
    report["networks_alone"]["network_ms_per_pattern"] = round(1e3 * network_s / args.n, 3)
    report["networks_alone"]["polar_image_ms_per_pattern"] = round(1e3 * matcher_s / args.n, 3)
    log.info("networks alone: %s", report["networks_alone"])
    absent = None
    if args.absent:
        ti = record_from_cif(os.path.join(HERE, "..", "tests", "data", "ti.cif"), name="ti")
        absent = make_set([ti], setup, args.absent, noise=args.noise, seed=args.seed + 1, center_jitter=False)
    for name, bundle in (("templates", None), ("hybrid", args.bundle)):
        indexer = hybrid if bundle else SpotIndexer(setup, phases, (128, 128), threads=args.threads)
        fields, rate = run(indexer, ev.frames)
        scores = score_answers(fields, ev.quaternions, ev.phase_id, phases)
        report[name] = summary(scores, rate)
        sure = fields["confidence"] > 0.5
        report[name]["above_confidence_0.5"] = round(float(sure.mean()), 4)
        report[name]["right_above_0.5"] = round(float(scores["right"][sure].mean()), 4) if sure.any() else None
        if absent is not None:  # a phase not in the list: how many of its points look sure
            report[name]["absent_ti_above_0.5"] = round(float((indexer.index(absent.frames)["confidence"] > 0.5).mean()), 4)
        log.info("%s: %s", name, report[name])
    finish_report(report, args.json)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()

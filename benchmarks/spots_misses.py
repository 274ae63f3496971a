"""What the spot indexer's misses are: how many spots their patterns have, and whether the
truth and the answer would give different patterns at all.

Indexes an evaluation set of benchmarks/spots_side_by_side.py (the shipped networks first, as
``liveindex index``), then for every pattern counts its strong spots at the truth (kinematical
intensity above 10% of the pattern's strongest, between 4 and 62 pixels from the beam, at the
set's median rel-rod width) and reports the share right (phase and within 3 degrees modulo
180) by that count. For the misses of the right phase it renders the truth's and the answer's
patterns without noise or intensity spread (same beam centre and blur, gamma 0.5, the direct
beam masked) and correlates them: near 1, the two orientations give the same pattern, and no
indexer that reads this pattern can tell them apart. Then it reads each miss as the simulator
made it: on the refinement's blurred square-root image (where Poisson noise has one variance
everywhere), each predicted spot's value against the prediction scaled to fit, with the noise
of the image's background and the simulator's own per-spot intensity spread (``chi_square``),
for the answer and for the truth refined from itself: the share of misses where that
likelihood prefers the truth. Near one half, the pattern does not say which one it is.

    .venv/bin/python benchmarks/spots_misses.py --n 1200 --noise moderate --seed 7
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from liveindex.models.crystal import quaternion_multiply
from liveindex.models.spots.diffraction import rotation_matrices
from liveindex.models.spots.evaluate import EXCITATION_RANGE, make_set, score_answers
from liveindex.models.spots.indexer import FINE_STEPS, SPOT_BLUR_PX, SpotIndexer, blur_polar, find_centers
from liveindex.models.spots.phases import phases_from_spec
from liveindex.models.spots.setup import check_setup
from liveindex.models.spots.simulator import NOISE_LEVELS, SpotNoise, SpotPatternRenderer

SPOT_BINS = ((0, 3), (3, 5), (5, 7), (7, 10), (10, 15), (15, 25), (25, 10_000))


def strong_spots(renderer: SpotPatternRenderer, quaternions: np.ndarray, phase_id: np.ndarray, width: float):
    """(N,) the number of spots of each truth above 10% of its pattern's strongest, on the frame."""
    out = np.zeros(len(phase_id), int)
    cal = renderer.setup["calibration"]
    for p in range(len(renderer.phases)):
        mine = np.flatnonzero(phase_id == p)
        if not len(mine):
            continue
        xy, inten = renderer.spots(p, quaternions[mine].astype(np.float64), width)
        r = np.hypot(xy[..., 0], xy[..., 1]) / cal
        rel = inten / np.maximum(inten.max(1, keepdims=True), 1e-12)
        out[mine] = ((rel > 0.1) & (r > 4) & (r < 62)).sum(1)
    return out


def pattern_correlation(renderer: SpotPatternRenderer, phase: int, a: np.ndarray, b: np.ndarray, width: float) -> float:
    """The correlation of two orientations' noise-free patterns (gamma 0.5, the direct beam masked)."""
    h, w = renderer.pattern_shape
    xy, inten = renderer.spots(phase, np.stack([a, b]).astype(np.float64), width)
    centre = np.array([[w / 2, h / 2]] * 2)
    img = np.sqrt(renderer.render(xy, inten, centre, SpotNoise(None, 1.2, 0.0, 0.0), np.random.default_rng(0))
                  .astype(np.float64))
    img[:, h // 2 - 8:h // 2 + 9, w // 2 - 8:w // 2 + 9] = 0.0
    x, y = (v.ravel() - v.mean() for v in img)
    return float(x @ y / np.sqrt((x @ x) * (y @ y)))


def chi_square(indexer: SpotIndexer, phase: int, q: np.ndarray, image: np.ndarray, spread: float) -> float:
    """The mean chi-square of one orientation on one blurred polar image (gamma 0.5): each
    predicted spot above 5% of the strongest (in square-root units) read bilinearly (the
    refinement's own read, ``SpotRefiner.spot_reads``), against c * sqrt(I) with c fitted by
    weighted least squares; the variance the background's (robust, the whole image) plus the
    spot's own spread (half the log-normal's, in square-root units)."""
    refiner = indexer.refiners[phase]
    m = rotation_matrices(q[None].astype(np.float64))
    g, f2 = refiner._subset(m)
    w, seen = (v[0] for v in refiner.spot_reads(m, g, f2, image[None], np.zeros(1, np.int64)))
    keep = (w > 0) & (w >= 0.05 * max(w.max(), 1e-12))
    w, seen = w[keep], seen[keep]
    background = 1.4826 * np.median(np.abs(image - np.median(image)))
    c = (w @ seen) / max(w @ w, 1e-12)
    for _ in range(3):
        var = background**2 + (0.5 * spread * c * w) ** 2
        c = (w * seen / var).sum() / (w * w / var).sum()
    var = background**2 + (0.5 * spread * c * w) ** 2
    return float(((seen - c * w) ** 2 / var).mean())


def noise_model_preference(indexer: SpotIndexer, ev, misses: np.ndarray, answers: np.ndarray, spread: float):
    """Of the misses, how many the noise-model likelihood (chi_square) prefers the truth refined
    from itself to the answer: (preferred, of)."""
    frames = ev.frames[misses].astype(np.float32)
    polar = indexer.matcher.match(frames, find_centers(frames))[3]
    blurred = blur_polar(polar, SPOT_BLUR_PX, indexer.grid.r_min)
    phase = ev.phase_id[misses].astype(int)
    rows = np.arange(len(misses))
    truth, _ = indexer._refine(ev.quaternions[misses].astype(np.float64), phase, blurred, rows, FINE_STEPS)
    prefer = sum(chi_square(indexer, p, t, img, spread) < chi_square(indexer, p, a, img, spread)
                 for p, t, a, img in zip(phase, truth, answers[misses], blurred))
    return int(prefer), len(misses)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1200)
    p.add_argument("--noise", default="moderate", choices=["clean", "moderate", "hard"])
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args(argv)
    phases = phases_from_spec("ferrite,austenite,cementite")
    setup = check_setup({"kv": 200.0, "calibration": 0.03, "precession": 1.0}, (128, 128))
    ev = make_set(phases, setup, args.n, noise=args.noise, seed=args.seed, center_jitter=False)
    indexer = SpotIndexer(setup, phases, (128, 128), bundle="default")
    parts = [indexer.index(ev.frames[i:i + 64]) for i in range(0, args.n, 64)]
    fields = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
    scores = score_answers(fields, ev.quaternions, ev.phase_id, phases)
    right = scores["right"]
    renderer = SpotPatternRenderer(phases, setup)
    width = float(np.mean(EXCITATION_RANGE))
    spots = strong_spots(renderer, ev.quaternions, ev.phase_id, width)
    by_spots = []
    for lo, hi in SPOT_BINS:
        m = (spots >= lo) & (spots < hi)
        by_spots.append({"strong_spots": f"{lo}-{hi - 1}" if hi < 10_000 else f"{lo}+", "patterns": int(m.sum()),
                         "right": round(float(right[m].mean()), 4) if m.any() else None, "misses": int((~right[m]).sum())})
    misses = np.flatnonzero(~right & (fields["phase_id"] == ev.phase_id))
    corr = np.array([pattern_correlation(renderer, int(ev.phase_id[i]), ev.quaternions[i], fields["quaternion"][i],
                                         width) for i in misses])
    # For scale: the same truths against themselves tilted 3 degrees about the lab x axis (the
    # smallest error counted a miss), where a pattern does tell them apart.
    tilt = np.array([np.cos(np.deg2rad(1.5)), np.sin(np.deg2rad(1.5)), 0.0, 0.0])
    tilted = quaternion_multiply(ev.quaternions[misses].astype(np.float64), tilt)
    corr_3deg = np.array([pattern_correlation(renderer, int(ev.phase_id[i]), ev.quaternions[i], t, width)
                          for i, t in zip(misses, tilted)])
    prefer, of = noise_model_preference(indexer, ev, misses, fields["quaternion"],
                                        NOISE_LEVELS[args.noise].intensity_spread)
    report = {"set": {"n": args.n, "noise": args.noise, "seed": args.seed},
              "right": round(float(right.mean()), 4), "by_strong_spots": by_spots,
              "misses_right_phase": int(len(misses)), "misses_wrong_phase": int((~right).sum() - len(misses)),
              "misses_error_deg_10_50_90": np.percentile(scores["errors_mod180"][misses], [10, 50, 90]).round(1).tolist()
              if len(misses) else None,
              "misses_noise_free_correlation_10_25_50_75_90": np.percentile(corr, [10, 25, 50, 75, 90]).round(4).tolist()
              if len(corr) else None,
              "same_truths_tilted_3deg_correlation_10_25_50_75_90":
              np.percentile(corr_3deg, [10, 25, 50, 75, 90]).round(4).tolist() if len(corr) else None,
              "misses_noise_model_prefers_truth": f"{prefer} of {of}",
              "misses_above_confidence_0.5": int((fields["confidence"][~right] > 0.5).sum())}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

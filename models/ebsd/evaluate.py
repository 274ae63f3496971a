"""Validation figures of a network bundle, on a freshly simulated held-out set (no torch).

The held-out set is rendered with its own seed (never a training seed) from each phase's
master patterns, over the bundle's geometry range, and corrupted as the simulated detector
does at each named noise level (stream/simulator.py: its background, contrast and true
Poisson noise, not the training-time variation). The same seed and size give the same
figures, so ``liveindex models eval`` reproduces what ``bundle.json`` records.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from . import training_data as td
from .codebook import disorientation_deg

log = logging.getLogger(__name__)

EVAL_SEED = 20_240_404
EVAL_SOURCES = (("ni", "dynamical"), ("ni", "kinematical"), ("fe", "kinematical"), ("ni3al", "kinematical"))
NOISES = ("clean", "moderate", "hard")
# Pairs of phases told apart with the answer restricted to the two (a scan's expected phases),
# each on the sources that make the comparison: Ni's dynamical pattern against kinematical Fe
# or Ni3Al mixes in "dynamical vs kinematical look"; kinematical against kinematical does not.
PAIRS = {
    "ni_vs_fe": (("ni", "fe"), (("ni", "dynamical"), ("fe", "kinematical"))),
    "ni_vs_fe_kinematical": (("ni", "fe"), (("ni", "kinematical"), ("fe", "kinematical"))),
    "ni_vs_ni3al": (("ni", "ni3al"), (("ni", "dynamical"), ("ni3al", "kinematical"))),
    "ni_vs_ni3al_kinematical": (("ni", "ni3al"), (("ni", "kinematical"), ("ni3al", "kinematical"))),
}


def source_key(source) -> str:
    return f"{source[0]}-{source[1]}"


def held_out_set(n_per_source: int, *, seed: int = EVAL_SEED) -> dict[str, td.CleanSet]:
    out = {}
    for k, (name, kind) in enumerate(EVAL_SOURCES):
        out[source_key((name, kind))] = td.render_clean(n_per_source, seed=seed + 7919 * (k + 1),
                                                        sources=((name, kind, 1.0),))
    return out


def evaluate(model, n_per_source: int = 1000, *, seed: int = EVAL_SEED) -> dict:
    """Figures for ``model`` (a NetworkModel) on the held-out set: confusion, pairwise phase
    accuracy, orientation error percentiles per source and noise level."""
    sets = held_out_set(n_per_source, seed=seed)
    phases = model.phases
    results = {"n_per_source": n_per_source, "seed": seed, "phases": phases, "noise": {}}
    for noise in NOISES:
        rng = np.random.default_rng((seed, NOISES.index(noise)))
        per = {}
        for key, clean in sets.items():
            flat = td.preprocess(td.camera_frames(clean.images, rng, noise))
            per[key] = (clean, flat) + model.predict(flat)
        confusion = {key: np.bincount(p[2], minlength=len(phases)).tolist() for key, p in per.items()}
        orientation = {}
        for key, (clean, _, _, quat, _, oconf) in per.items():
            err = disorientation_deg(quat, clean.rotations)
            sure = oconf >= 0.5
            orientation[key] = {
                "median_deg": round(float(np.median(err)), 3),
                "p90_deg": round(float(np.percentile(err, 90)), 3),
                "p95_deg": round(float(np.percentile(err, 95)), 3),
                "within_3deg": round(float((err <= 3).mean()), 4),
                "confident_fraction": round(float(sure.mean()), 4),
                "median_deg_when_confident": round(float(np.median(err[sure])), 3) if sure.any() else None,
                "within_3deg_when_confident": round(float((err[sure] <= 3).mean()), 4) if sure.any() else None,
            }
        pairs = {}
        for name, (pair, sources) in PAIRS.items():
            right = total = 0
            for source in sources:
                clean, flat = per[source_key(source)][:2]
                pred, *_ = model.predict(flat, allowed=pair)
                right += int((pred == phases.index(source[0])).sum())
                total += len(pred)
            pairs[name] = round(right / total, 4)
        results["noise"][noise] = {"confusion": confusion, "pair_accuracy": pairs, "orientation": orientation}
    return results


def inference_cost(model, *, batch: int = 256, repeats: int = 20) -> dict:
    """Per-pattern cost of the network alone at ``batch`` (best of ``repeats`` runs): every
    phase allowed (all code books), and a one-phase scan (Ni: its code book only)."""
    rng = np.random.default_rng(0)
    flat = rng.standard_normal((batch, model.n_pixels)).astype(np.float32)
    flat /= np.linalg.norm(flat, axis=1, keepdims=True)

    def best_and_median(allowed):
        model.predict(flat, allowed=allowed)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model.predict(flat, allowed=allowed)
            times.append(time.perf_counter() - t0)
        return round(1e3 * min(times) / batch, 4), round(1e3 * float(np.median(times)) / batch, 4)

    best, median = best_and_median(None)
    one_best, _ = best_and_median([model.phases[0]])
    return {"batch": batch, "per_pattern_ms_best": best, "per_pattern_ms_median": median,
            "one_phase_ms_best": one_best, "one_phase": model.phases[0],
            "provider": model.provider, "intra_op_threads": 1, "int8_code_scoring": bool(model.quantized)}


def format_figures(figures: dict, recorded: dict | None = None) -> str:
    """A plain-text table of the figures, with the recorded ones beside them when given."""
    lines = []

    def both(now, then):
        return f"{now}" if then is None else f"{now} (bundle: {then})"

    for noise, fig in figures["noise"].items():
        rec = (recorded or {}).get("noise", {}).get(noise, {}) if recorded else {}
        lines.append(f"noise {noise}: held-out {figures['n_per_source']} patterns per source, seed {figures['seed']}")
        lines.append("  phase pair accuracy: " + ", ".join(
            f"{k} {both(v, rec.get('pair_accuracy', {}).get(k))}" for k, v in fig["pair_accuracy"].items()))
        lines.append("  confusion (rows: truth source, columns: predicted " + "/".join(figures["phases"]) + "):")
        for key, row in fig["confusion"].items():
            lines.append(f"    {key:16s} {row}" + (f"  (bundle: {rec['confusion'][key]})" if rec.get("confusion") else ""))
        lines.append("  orientation error (deg):")
        for key, o in fig["orientation"].items():
            r = rec.get("orientation", {}).get(key, {})
            lines.append(f"    {key:16s} median {both(o['median_deg'], r.get('median_deg'))}, p90 {o['p90_deg']}, "
                         f"p95 {o['p95_deg']}, within 3 deg {both(o['within_3deg'], r.get('within_3deg'))}, "
                         f"confident {o['confident_fraction']} (median {o['median_deg_when_confident']})")
    return "\n".join(lines)

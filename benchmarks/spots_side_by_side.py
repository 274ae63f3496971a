"""liveindex's spot indexer and pyxem 0.21's template matching on the same precession patterns,
in the same run, on the same cores.

The evaluation set (models/spots/evaluate.py, fixed seed): ferrite, austenite and cementite
(CIFs), 128x128 frames, 200 kV, 1 deg precession, rel-rod widths 0.025-0.05/A, spot
intensities varying log-normally, blur, direct beam, a diffuse ring, Poisson noise (levels
``clean``, ``moderate``, ``hard``); orientations random on SO(3), a fraction ``--near-zone``
near low-index zone axes. The beam centre sits at the frame centre for both tools (pyxem's
``calibration.center = None``); liveindex still finds it in each frame.

pyxem (``pip install -e .[spots-bench]``; pyxem 0.21.0 installs beside liveindex without
changing numpy, orix, diffsims or onnxruntime): diffsims ``SimulationGenerator`` library on
orix's ``get_sample_reduced_fundamental`` grid per phase, ``get_azimuthal_integral2d``
(360 azimuths, ``mean=True``), gamma 0.5, ``get_orientation``, ``to_crystal_map``. Its
patterns/s count the polar transform and the matching, not the library (liveindex's count
everything from raw frames; its library is cached on disk). pyxem's image y axis runs the other
way from liveindex's renderer (as in pyxem's own simulated data, which flips diffsims'
patterns upside down): on 40 clean ferrite patterns pyxem found 0% within 3 deg as given or
transposed and 30-37% upside down, so it gets them upside down (``--pyxem-flip``).

liveindex runs as ``liveindex index`` does (``--threads`` pages at once, each on one-thread
ONNX sessions; ``--one-indexer``: one indexer, a page after another, as this benchmark ran
before: the refinement's numpy then has one core).

Also reports the calibration of liveindex's confidence: the fraction of points right (phase
and within 3 deg modulo 180) above confidence 0.5, on the set plus ``--absent`` patterns of a
phase not in the list (hcp titanium).

    .venv/bin/python benchmarks/spots_side_by_side.py --n 1200 --noise moderate --threads 2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import time
import warnings

import numpy as np

from liveindex.models.crystal import record_from_cif
from liveindex.models.spots.evaluate import make_set, score_answers
from liveindex.models.spots.indexer import SpotIndexer
from liveindex.models.spots.phases import phases_from_spec
from liveindex.models.spots.setup import check_setup

log = logging.getLogger("spots_side_by_side")
HERE = os.path.dirname(os.path.abspath(__file__))


def summary(scores: dict, rate: float) -> dict:
    out = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in scores.items()
           if not isinstance(v, np.ndarray)}
    out["patterns_per_s"] = round(rate, 1)
    return out


def run_liveindex(frames, phases, setup, *, resolution: float, threads: int, providers: str, refine: bool = True,
                  pages: bool = True):
    """liveindex's fields and patterns/s. ``pages``: as ``liveindex index`` runs (stream/offline.py's
    index_source: ``threads`` pages at once, each on one-thread sessions; no latent maps, which
    pyxem has no counterpart of); else one indexer with ``threads``-thread sessions, a page of 256
    after another (the refinement's numpy then runs on one core)."""
    if pages:
        from liveindex.models import modality as modalities
        from liveindex.models.arrays import ArraySource
        from liveindex.stream.offline import index_source

        def source(patterns):
            made = ArraySource(patterns, modality=modalities.load("spots"), setup=setup, phases=phases, name="set")
            made.fit_latent = False
            return made

        options = {"resolution": resolution, "refine": refine, "latent": False}
        index_source(source(frames[:64]), threads=threads, providers=providers, progress=False, **options)  # warm-up
        fields, elapsed = index_source(source(frames), threads=threads, providers=providers, progress=False, **options)
        return fields, len(frames) / elapsed
    indexer = SpotIndexer(setup, phases, frames.shape[1:], resolution=resolution, refine=refine,
                          providers=providers, threads=threads)
    indexer.index(frames[:64])  # warm-up
    start = time.perf_counter()
    parts = [indexer.index(frames[i:i + 256]) for i in range(0, len(frames), 256)]
    elapsed = time.perf_counter() - start
    fields = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return fields, len(frames) / elapsed


def run_pyxem(frames, phases, setup, *, resolution: float, flip: bool, excitation: float = 0.05):
    import pyxem as pxm
    from diffsims.generators.simulation_generator import SimulationGenerator
    from orix.sampling import get_sample_reduced_fundamental

    cal = setup["calibration"]
    h, w = frames.shape[1:]
    orix_phases = [p.orix_phase() for p in phases]
    generator = SimulationGenerator(setup["kv"], precession_angle=setup["precession"], minimum_intensity=1e-4)
    rotations = [get_sample_reduced_fundamental(resolution=resolution, point_group=p.point_group)
                 for p in orix_phases]
    start = time.perf_counter()
    sims = generator.calculate_diffraction2d(orix_phases, rotation=rotations, max_excitation_error=excitation,
                                             reciprocal_radius=cal * min(h, w) / 2, with_direct_beam=False)
    library_s = time.perf_counter() - start
    data = frames[:, ::-1] if flip else frames
    signal = pxm.signals.ElectronDiffraction2D(data.astype(np.float32)[None])
    for axis in signal.axes_manager.signal_axes:
        axis.scale, axis.units = cal, "1/A"
    # The beam sits at pixel (w/2, h/2) (row h/2 - 1 once flipped); pyxem's axes put 0 there.
    signal.axes_manager.signal_axes[0].offset = -(w // 2) * cal
    signal.axes_manager.signal_axes[1].offset = -((h // 2 - 1) if flip else h // 2) * cal
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        polar = signal.get_azimuthal_integral2d(npt=min(h, w) // 2, npt_azim=360, inplace=False, mean=True)
        polar = polar**0.5
        result = polar.get_orientation(sims, n_best=1)
        rotations_out = result.to_rotation(flatten=True)
    elapsed = time.perf_counter() - start
    q = np.asarray(rotations_out.data, np.float64).reshape(-1, 4)
    # The template index (column 0) -> phase, as pyxem's to_phase_index (which fails for n_best=1
    # in 0.21: "setting an array element with a sequence").
    index = np.asarray(result.data, np.float64).reshape(-1, 4)[:, 0].astype(int)
    phase = np.searchsorted(np.cumsum([r.size for r in rotations]), index, side="right").astype(np.int16)
    return {"phase_id": phase, "quaternion": q}, len(frames) / elapsed, library_s, sum(r.size for r in rotations)


def calibration_report(fields, right, absent_fields) -> dict:
    conf = np.concatenate([fields["confidence"], absent_fields["confidence"]])
    ok = np.concatenate([right, np.zeros(len(absent_fields["confidence"]), bool)])
    above = conf > 0.5
    absent_above = float((absent_fields["confidence"] > 0.5).mean())
    return {"points": int(len(conf)), "above_0.5": int(above.sum()), "fraction_above": round(float(above.mean()), 4),
            "right_above_0.5": round(float(ok[above].mean()), 4) if above.any() else None,
            "absent_phase_above_0.5": round(absent_above, 4)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1200, help="patterns (default 1200)")
    p.add_argument("--noise", default="moderate", choices=["clean", "moderate", "hard"])
    p.add_argument("--near-zone", type=float, default=0.0, help="fraction near low-index zone axes (default 0)")
    p.add_argument("--calibration", type=float, default=0.03, help="1/A per pixel (default 0.03: +-1.9/A)")
    p.add_argument("--resolution", type=float, default=2.0, help="liveindex library, degrees (default 2)")
    p.add_argument("--pyxem-resolution", type=float, nargs="*", default=[2.0],
                   help="pyxem library sampling(s), degrees (default 2); none to skip pyxem")
    p.add_argument("--pyxem-flip", choices=("auto", "yes", "no"), default="yes",
                   help="give pyxem the frames upside down (its image y axis; default yes)")
    p.add_argument("--absent", type=int, default=300, help="patterns of a phase absent from the list (hcp Ti)")
    p.add_argument("--threads", type=int, default=2,
                   help="cores for liveindex: pages at once on one-thread sessions (default 2)")
    p.add_argument("--one-indexer", action="store_true",
                   help="liveindex as one indexer with --threads-thread sessions, a page after another (the "
                        "rate this benchmark reported before the pages of `liveindex index`)")
    p.add_argument("--providers", default="cpu")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    phases = phases_from_spec("ferrite,austenite,cementite")
    setup = check_setup({"kv": 200.0, "calibration": args.calibration, "precession": 1.0}, (128, 128))
    ev = make_set(phases, setup, args.n, noise=args.noise, seed=args.seed, near_zone=args.near_zone,
                  center_jitter=False)
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    report = {"set": {"n": args.n, "noise": args.noise, "near_zone": args.near_zone, "calibration": args.calibration,
                      "seed": args.seed, "phases": [p.name for p in phases]}, "load_before": load}

    fields, rate = run_liveindex(ev.frames, phases, setup, resolution=args.resolution, threads=args.threads,
                                 providers=args.providers, pages=not args.one_indexer)
    scores = score_answers(fields, ev.quaternions, ev.phase_id, phases)
    report["liveindex"] = summary(scores, rate)
    report["liveindex"]["ambiguous_flagged"] = round(float(fields["ambiguous"].mean()), 4)
    log.info("liveindex: %s", report["liveindex"])
    if args.absent:
        ti = record_from_cif(os.path.join(HERE, "..", "tests", "data", "ti.cif"), name="ti")
        absent = make_set([ti], setup, args.absent, noise=args.noise, seed=args.seed + 1, center_jitter=False)
        absent_fields, _ = run_liveindex(absent.frames, phases, setup, resolution=args.resolution,
                                         threads=args.threads, providers=args.providers, pages=not args.one_indexer)
        report["confidence"] = calibration_report(fields, scores["right"], absent_fields)
        log.info("confidence: %s", report["confidence"])
    for res in args.pyxem_resolution:
        flips = (True, False) if args.pyxem_flip == "auto" else (args.pyxem_flip == "yes",)
        for flip in flips:
            try:
                px_fields, px_rate, lib_s, n_templates = run_pyxem(ev.frames, phases, setup, resolution=res, flip=flip)
            except ImportError as exc:
                report[f"pyxem_{res:g}deg"] = f"not installed ({exc}); pip install -e .[spots-bench]"
                break
            px = summary(score_answers(px_fields, ev.quaternions, ev.phase_id, phases), px_rate)
            px.update(library_s=round(lib_s, 1), templates=n_templates, flipped=flip)
            report[f"pyxem_{res:g}deg" + ("" if len(flips) == 1 else f"_flip{int(flip)}")] = px
            log.info("pyxem %g deg (flipped %s): %s", res, flip, px)
            if "patterns_per_s" in px:
                report["liveindex"][f"speedup_vs_pyxem_{res:g}deg"] = round(rate / px_rate, 1)
    report["load_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()

"""liveindex's spot indexer, pyxem 0.21's template matching and py4DSTEM 0.14's ACOM on the same
precession patterns, in the same run, on the same cores.

The evaluation set (models/spots/evaluate.py, fixed seed): ferrite, austenite and cementite
(CIFs), 128x128 frames, 200 kV, 1 deg precession, rel-rod widths 0.025-0.05/A, spot
intensities varying log-normally, blur, direct beam, a diffuse ring, Poisson noise (levels
``clean``, ``moderate``, ``hard``); orientations random on SO(3), a fraction ``--near-zone``
near low-index zone axes. The beam centre sits at the frame centre for both tools (pyxem's
``calibration.center = None``); liveindex still finds it in each frame.

pyxem (``pip install -e .[spots-bench]``; pyxem 0.21.0 installs beside liveindex without
changing numpy, orix, diffsims or onnxruntime), used as its orientation-mapping examples do and
tuned to these frames (``run_pyxem``; tuned on seed 3, not on the reported seeds):

- library: diffsims ``SimulationGenerator`` (kV, precession) on orix's
  ``get_sample_reduced_fundamental`` grid per phase, ``max_excitation_error`` 0.0375/A (the
  middle of the set's rel-rod widths), ``minimum_intensity`` 0.01 (pyxem's examples use 0.05;
  1e-4 kept reflections no frame shows), out to the frame's inscribed radius, no direct beam.
- image axes: our renderer draws a spot at lab (x, y) at column cx + x/cal, row cy + y/cal,
  exactly as diffsims' ``get_diffraction_pattern`` (checked spot by spot: same positions and
  intensities). pyxem wants such frames with the columns reversed (``--pyxem-flip``, default
  yes): on 40 of diffsims' own clean ferrite patterns of random rotations indexed back, the
  columns reversed gave 65% within 3 deg exactly (as many as modulo 180 deg), upside down (what
  pyxem's simulated Si data do) 2.5% exactly but 65% modulo 180 deg (the answer turned 180 deg
  about the beam: upside down = columns reversed + a half turn), as given or both flips 0%
  (0-2.5% modulo 180 deg). The beam
  (pixel (w/2, h/2) here, column w/2 - 1 once reversed) is put at 0 of both signal axes.
- orientation: ``to_rotation`` (orix convention, crystal -> lab as diffsims simulates and
  diffraction.py uses; pyxem puts the in-plane angle into phi1 and applies the mirror factor)
  is then right as it stands: no inverse, no sign change (the check above scores it directly).
- preprocessing (timed): pyxem's "difference of gaussians" background (sigma 1 and 8 px) on the
  frames; ``get_azimuthal_integral2d`` (64 radii out to the templates' radius, 360 azimuths,
  ``mean=True``); pyxem's polar "radial median" background (removes the direct beam and the
  diffuse ring); gamma 0.5; the pattern's mean subtracted, as ``get_orientation``'s docstring
  suggests, so that a template spot on empty background scores about 0. Without these the
  normalised templates with the most spots (cementite) win on background: on 60 moderate
  frames the old way (full radial range to the corners, no background) called 60 of 60
  cementite (35% right phase); the radial median alone 55 of 60; with the mean subtracted
  and the radial range 94% right phase, 68% within 3 deg; with the DoG too 90-96% and
  79-86% (60-90 frames, seeds 3 and 7).
- ``get_orientation`` with ``frac_keep`` 0.1 (pyxem's default; ``--pyxem-frac-keep``: 0.3
  gave 92% right phase, 87% within 3 deg on seed 3 against 90%, 79%, about 30% slower).

Measured (300 moderate frames, seed 7, load 2.5-2.7): 2 deg library 92.7% right phase, 74%
within 3 deg (77% mod 180), median 1.3 deg, 28.9 patterns/s; 1 deg 93.7%, 79% (82%), 1.1 deg,
16.4/s (the old harness: 35%, 0.6% (17%)); 2 deg with ``--pyxem-frac-keep 0.3`` 94.7%, 82%
(84%), 1.2 deg, 18.1/s. Of pyxem's time (120 frames, 2 deg) the polar transform took 75%, the
matching 17%, the two backgrounds 7%. Its wrong phases are mostly sparse patterns: 13 of
22 have at most 4 spots above 10% of the brightest (76% right among those 55 patterns, 96%
among the rest); 11 are ferrite called austenite, whose {111} ring (0.482/A) lies 0.4 px from
ferrite's {110} (0.493/A), inside one radial bin.

Its patterns/s count the background subtraction, polar transform, matching and ``to_rotation``
after a warm-up on 8 frames (numba compiles on first use), not the library (liveindex's count
everything from raw frames; its library is cached on disk).

py4DSTEM (``--py4dstem-python``; never in liveindex's venv: its pins differ): its ACOM runs in
its own interpreter as a subprocess (benchmarks/py4dstem_acom.py: frames and setup go through
a temporary folder as .npy + JSON, quaternions in liveindex's convention, phase ids and seconds
come back). Make that venv once with

    python3 -m venv /work/p4venv
    /work/p4venv/bin/pip install py4DSTEM==0.14.18 "pymatgen<2024.8.9" "numpy<2" "pandas<3"

(pymatgen, py4DSTEM's ``acom`` extra, reads the CIFs; on its own it pulls numpy 2, which
py4DSTEM 0.14.18 excludes, hence the pins). Orientation plans per phase (``zone_axis_range=
"auto"``, ``--py4dstem-zone-step`` 2 deg, in-plane 2 deg, 1 deg precession), Bragg disks with a
Gaussian probe kernel (sigma 1.2 px; the data has no vacuum probe; cross-correlation smoothed
by 1 px, 'poly' subpixel, peaks above 0.2% of the brightest (the direct beam), 4 px apart, at
most 70: py4DSTEM's defaults of 60 px spacing and 20 px edge would drop most spots of these
frames), Q pixel size and origin (the frame centre) calibrated, ``match_orientations`` per phase, the phase with the best
correlation. Its patterns/s count disk detection and matching, not the plans (``library_s``).

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


def summary(scores: dict, rate: float | None = None) -> dict:
    """score_answers' figures (rounded, no per-point arrays) and the rate where given."""
    out = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in scores.items()
           if not isinstance(v, np.ndarray)}
    if rate is not None:
        out["patterns_per_s"] = round(rate, 1)
    return out


def finish_report(report: dict, json_path: str | None) -> None:
    """The load after the run into ``report``, then print it and write it to ``json_path``."""
    report["load_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    text = json.dumps(report, indent=1)
    print(text)
    if json_path:
        with open(json_path, "w") as fh:
            fh.write(text)


def run_liveindex(frames, phases, setup, *, resolution: float, threads: int, providers: str, refine: bool = True,
                  pages: bool = True, bundle: str | None = "default"):
    """liveindex's fields and patterns/s. ``pages``: as ``liveindex index`` runs (stream/offline.py's
    index_source: ``threads`` pages at once, each on one-thread sessions; no latent maps, which
    pyxem has no counterpart of); else one indexer with ``threads``-thread sessions, a page of 256
    after another (the refinement's numpy then runs on one core). ``bundle``: the spot networks'
    bundle as ``--indexer hybrid`` uses it ("default": the shipped one), None for matching alone."""
    if pages:
        from liveindex.models import modality as modalities
        from liveindex.models.arrays import ArraySource
        from liveindex.stream.offline import index_source

        def source(patterns):
            made = ArraySource(patterns, modality=modalities.load("spots"), setup=setup, phases=phases, name="set")
            made.fit_latent = False
            return made

        options = {"resolution": resolution, "refine": refine, "latent": False, "bundle": bundle}
        index_source(source(frames[:64]), threads=threads, providers=providers, progress=False, **options)  # warm-up
        fields, elapsed = index_source(source(frames), threads=threads, providers=providers, progress=False, **options)
        return fields, len(frames) / elapsed
    indexer = SpotIndexer(setup, phases, frames.shape[1:], resolution=resolution, refine=refine,
                          providers=providers, threads=threads, bundle=bundle)
    indexer.index(frames[:64])  # warm-up
    start = time.perf_counter()
    parts = [indexer.index(frames[i:i + 256]) for i in range(0, len(frames), 256)]
    elapsed = time.perf_counter() - start
    fields = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return fields, len(frames) / elapsed


def matcher_of_revision(rev: str, folder):
    """The module models/spots/matcher.py was at git revision ``rev``, loaded from a file."""
    import importlib.util

    text = subprocess.run(["git", "show", f"{rev}:models/spots/matcher.py"], cwd=os.path.join(HERE, ".."),
                          capture_output=True, text=True, check=True).stdout
    # Its relative import of the templates' grid, made absolute, so that it loads from a file.
    path = folder / "matcher_then.py"
    path.write_text(text.replace("from .templates import", "from liveindex.models.spots.templates import"))
    spec = importlib.util.spec_from_file_location("matcher_then", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compare_indexers(ev, phases, setup, args) -> dict:
    """The whole indexer with this tree's matcher graph and with --against's, alternating: rates,
    accuracy, and how many answers differ pattern by pattern (everything else is this tree's)."""
    import tempfile
    from pathlib import Path

    from liveindex.models import modality as modalities
    from liveindex.models.spots import indexer as spot_indexer

    ours = (spot_indexer.build_graph, getattr(spot_indexer, "GRAPH_VERSION", ""))
    then = matcher_of_revision(args.against, Path(tempfile.mkdtemp()))
    graphs = {"this tree": ours, args.against: (then.build_graph, f"graph of {args.against}")}
    rates, fields = {k: [] for k in graphs}, {}
    out = {"load_before": " ".join(open("/proc/loadavg").read().split()[:3])}
    try:
        for _ in range(args.repeats):
            for name, (build, version) in graphs.items():
                spot_indexer.build_graph, spot_indexer.GRAPH_VERSION = build, version  # its own cached graph file
                modalities.load("spots")._indexers.clear()  # prepare keeps indexers by setup, not by graph
                fields[name], rate = run_liveindex(ev.frames, phases, setup, resolution=args.resolution,
                                                   threads=args.threads, providers=args.providers,
                                                   pages=not args.one_indexer)
                rates[name].append(round(rate, 1))
    finally:
        spot_indexer.build_graph, spot_indexer.GRAPH_VERSION = ours
    out["load_after"] = " ".join(open("/proc/loadavg").read().split()[:3])
    now, before = fields["this tree"], fields[args.against]
    for name in graphs:
        scores = score_answers(fields[name], ev.quaternions, ev.phase_id, phases)
        out[name] = {"patterns_per_s": rates[name], **{k: round(scores[k], 4) for k in
                                                       ("right_phase", "within3_mod180", "median_mod180_deg")}}
    out["differ"] = {"phase": int((now["phase_id"] != before["phase_id"]).sum()),
                     "quaternion_over_1e-5": int((np.abs(now["quaternion"] - before["quaternion"]).max(1) > 1e-5).sum()),
                     "reliability_over_1e-6": int((np.abs(now["reliability"] - before["reliability"]) > 1e-6).sum()),
                     "confidence_over_1e-6": int((np.abs(now["confidence"] - before["confidence"]) > 1e-6).sum())}
    return out


def time_matchers(frames, phases, setup, args) -> dict:
    """PolarMatcher.match alone on the set (this tree's graph and, with --against, the graph that
    revision's matcher.py builds from the same templates), alternating: wall and CPU seconds."""
    import tempfile
    from pathlib import Path

    from liveindex.models.spots import matcher as this
    from liveindex.models.spots.indexer import find_centers
    from liveindex.models.spots.templates import PolarGrid, build_library

    grid = PolarGrid.for_shape(frames.shape[1:])
    libraries = [build_library(p, setup, frames.shape[1:], grid, args.resolution) for p in phases]
    real, imag = (np.concatenate([getattr(lib, part) for lib in libraries]) for part in ("real", "imag"))
    modules = {"this tree": this}
    folder = Path(tempfile.mkdtemp())
    if args.against:
        modules[args.against] = matcher_of_revision(args.against, folder)
    data = frames.astype(np.float32)
    centers = find_centers(data)
    matchers = {}
    for i, (name, module) in enumerate(modules.items()):
        path = folder / f"graph-{i}.onnx"
        module.build_graph(path, real, imag, grid, frames.shape[1:], setup["ellipticity"])
        matchers[name] = module.PolarMatcher(path, frames.shape[1:], grid, setup["ellipticity"],
                                             providers=args.providers, threads=args.threads)
        matchers[name].match(data[:64], centers[:64])  # warm-up
    wall, cpu, answers = {k: [] for k in matchers}, {k: [] for k in matchers}, {}
    load_before = " ".join(open("/proc/loadavg").read().split()[:3])
    for _ in range(args.repeats):
        for name, matcher in matchers.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            parts = [matcher.match(data[i:i + 256], centers[i:i + 256]) for i in range(0, len(data), 256)]
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            answers[name] = [np.concatenate(p) for p in zip(*parts)]
    out = {"patterns": len(data), "threads": args.threads, "load_before": load_before,
           "load_after": " ".join(open("/proc/loadavg").read().split()[:3])}
    for name in matchers:
        out[name] = {"patterns_per_s_best": round(len(data) / min(wall[name]), 1),
                     "wall_s": [round(t, 3) for t in wall[name]], "cpu_s": [round(t, 3) for t in cpu[name]]}
    if args.against:
        (s_now, t_now, a_now, _), (s_then, t_then, a_then, _) = answers["this tree"], answers[args.against]
        out["agreement"] = {"best_two_templates": float((t_now[:, :2] == t_then[:, :2]).all(1).mean()),
                            "their_angles": float((a_now[:, :2] == a_then[:, :2]).all(1).mean()),
                            "top_k_same_set": float(np.mean([set(x) == set(y) for x, y in zip(t_now, t_then)])),
                            "max_score_difference_best_two": float(np.abs(s_now[:, :2] - s_then[:, :2]).max())}
    return out


def _pyxem_signal(frames, cal: float, mirror: bool):
    """The frames as pyxem's ElectronDiffraction2D, calibrated, the beam (pixel (w/2, h/2) of our
    renderer) at 0 of both signal axes; ``mirror``: columns reversed (pyxem's image axes, above)."""
    import pyxem as pxm

    h, w = frames.shape[1:]
    data = frames[:, :, ::-1] if mirror else frames
    signal = pxm.signals.ElectronDiffraction2D(np.ascontiguousarray(data, np.float32)[None])
    for axis in signal.axes_manager.signal_axes:
        axis.scale, axis.units = cal, "1/A"
    signal.axes_manager.signal_axes[0].offset = -((w - 1 - w // 2) if mirror else w // 2) * cal
    signal.axes_manager.signal_axes[1].offset = -(h // 2) * cal
    return signal


def _pyxem_index(signal, sims, radius: float, npt: int, frac_keep: float):
    """pyxem's preprocessing and matching (see the module docstring): difference-of-Gaussians
    background on the frames, polar transform out to the templates' radius, per-radius median
    over azimuth subtracted, gamma 0.5, the pattern's mean subtracted; then get_orientation."""
    background_free = signal.subtract_diffraction_background("difference of gaussians", min_sigma=1, max_sigma=8,
                                                             inplace=False)
    polar = background_free.get_azimuthal_integral2d(npt=npt, npt_azim=360, radial_range=(0.0, radius),
                                                     inplace=False, mean=True)
    polar = polar.subtract_diffraction_background("radial median", inplace=False) ** 0.5
    polar.data = polar.data - polar.data.mean(axis=(-2, -1), keepdims=True)
    return polar.get_orientation(sims, n_best=1, frac_keep=frac_keep)


def run_pyxem(frames, phases, setup, *, resolution: float, flip: bool, excitation: float | None = None,
              minimum_intensity: float = 0.01, frac_keep: float = 0.1):
    import hyperspy.api as hs
    from diffsims.generators.simulation_generator import SimulationGenerator
    from orix.sampling import get_sample_reduced_fundamental

    from liveindex.models.spots.evaluate import EXCITATION_RANGE

    hs.preferences.General.show_progressbar = False
    cal = setup["calibration"]
    h, w = frames.shape[1:]
    radius = cal * min(h, w) / 2
    excitation = float(np.mean(EXCITATION_RANGE)) if excitation is None else excitation
    orix_phases = [p.orix_phase() for p in phases]
    generator = SimulationGenerator(setup["kv"], precession_angle=setup["precession"],
                                    minimum_intensity=minimum_intensity)
    rotations = [get_sample_reduced_fundamental(resolution=resolution, point_group=p.point_group)
                 for p in orix_phases]
    start = time.perf_counter()
    sims = generator.calculate_diffraction2d(orix_phases, rotation=rotations, max_excitation_error=excitation,
                                             reciprocal_radius=radius, with_direct_beam=False)
    library_s = time.perf_counter() - start
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Warm-up (numba compiles the polar transform and the matching on first use), not timed.
        _pyxem_index(_pyxem_signal(frames[:8], cal, flip), sims, radius, min(h, w) // 2, frac_keep).to_rotation()
        start = time.perf_counter()
        result = _pyxem_index(_pyxem_signal(frames, cal, flip), sims, radius, min(h, w) // 2, frac_keep)
        rotations_out = result.to_rotation(flatten=True)
        elapsed = time.perf_counter() - start
    q = np.asarray(rotations_out.data, np.float64).reshape(-1, 4)
    # The template index (column 0) -> phase, as pyxem's to_phase_index (which fails for n_best=1
    # in 0.21: "setting an array element with a sequence").
    index = np.asarray(result.data, np.float64).reshape(-1, 4)[:, 0].astype(int)
    phase = np.searchsorted(np.cumsum([r.size for r in rotations]), index, side="right").astype(np.int16)
    return {"phase_id": phase, "quaternion": q}, len(frames) / elapsed, library_s, sum(r.size for r in rotations)


def phase_cif(record) -> str:
    """The CIF a phase came from (py4DSTEM reads the CIF itself)."""
    from liveindex.models.spots.phases import DATA

    source = str(record.source or "")
    path = DATA / f"{source.split(':', 1)[1]}.cif" if source.startswith("builtin:") else source
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no CIF for phase {record.name} (source {source!r})")
    return str(path)


def run_py4dstem(frames, phases, setup, *, python: str, zone_step: float, in_plane_step: float,
                 options: dict | None = None):
    """py4DSTEM's ACOM (benchmarks/py4dstem_acom.py) in its own interpreter ``python``: frames and
    setup through a temporary folder. Fields (liveindex's convention), patterns/s (Bragg disks +
    matching, not the orientation plans) and py4DSTEM's timing and plan sizes."""
    import tempfile

    h, w = frames.shape[1:]
    center = setup.get("center") or (h // 2, w // 2)  # liveindex's renderer: beam at (h/2, w/2)
    job = {"calibration": setup["calibration"], "kv": setup["kv"], "precession": setup["precession"],
           "center": [float(center[0]), float(center[1])], "zone_step": zone_step, "in_plane_step": in_plane_step,
           "phases": [{"name": p.name, "cif": phase_cif(p)} for p in phases], "detect": {}}
    for key, value in (options or {}).items():
        if isinstance(value, dict) and isinstance(job.get(key), dict):
            job[key].update(value)
        else:
            job[key] = value
    with tempfile.TemporaryDirectory(prefix="py4dstem-") as folder:
        np.save(os.path.join(folder, "frames.npy"), np.ascontiguousarray(frames))
        with open(os.path.join(folder, "job.json"), "w") as fh:
            json.dump(job, fh)
        done = subprocess.run([python, os.path.join(HERE, "py4dstem_acom.py"), folder], capture_output=True, text=True,
                              check=False)
        if done.returncode:
            raise RuntimeError(f"py4dstem_acom.py failed (exit {done.returncode}): {done.stderr.strip()[-800:]}")
        result = dict(np.load(os.path.join(folder, "result.npz")))
        with open(os.path.join(folder, "timing.json")) as fh:
            timing = json.load(fh)
    fields = {"phase_id": result["phase_id"].astype(np.int16), "quaternion": result["quaternion"]}
    timing["peaks_median"] = float(np.median(result["peaks"]))
    timing["matrix"] = result["matrix"]
    return fields, len(frames) / timing["index_s"], timing


def py4dstem_importable(python: str) -> str | None:
    """None when ``python`` imports py4DSTEM and pymatgen (from_CIF's reader), else why not."""
    try:
        done = subprocess.run([python, "-c", "import py4DSTEM, pymatgen.io.cif; print(py4DSTEM.__version__)"],
                              capture_output=True, text=True, timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{python} does not run ({exc})"
    if done.returncode:
        return f"{python} cannot import py4DSTEM/pymatgen: {(done.stderr.strip().splitlines() or ['?'])[-1]}"
    return None


def check_mapping(matrix, fields, ev, phases) -> list:
    """The candidates for liveindex's R from py4DSTEM's M (M P, P M, M.T P, P M.T over the 48 signed
    permutations P, made proper) scored on the set: the five best by median disorientation.
    Run on --noise clean to pin py4dstem_acom.MAPPING."""
    import itertools

    from liveindex.models.spots.diffraction import matrices_to_quaternions

    pid = fields["phase_id"]
    chosen = matrix[np.arange(len(pid)), np.maximum(pid, 0)]
    rows = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            p = np.zeros((3, 3))
            p[[0, 1, 2], list(perm)] = signs
            for name, base in (("M", chosen), ("M.T", np.transpose(chosen, (0, 2, 1)))):
                for side in ("M P", "P M"):
                    r = base @ p if side == "M P" else p @ base
                    r = r * np.sign(np.linalg.det(r))[:, None, None]
                    s = score_answers({"phase_id": pid, "quaternion": matrices_to_quaternions(r)}, ev.quaternions,
                                      ev.phase_id, phases)
                    rows.append({"R": side.replace("M", name), "P": p.astype(int).tolist(),
                                 "median_deg": round(s["median_deg"], 2), "within3": round(s["within3"], 4)})
    rows.sort(key=lambda row: row["median_deg"])
    return rows[:5]


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
                   help="give pyxem the frames with the columns reversed (its image axes; default yes)")
    p.add_argument("--pyxem-frac-keep", type=float, default=0.1,
                   help="pyxem get_orientation's frac_keep (default 0.1, its own)")
    p.add_argument("--absent", type=int, default=300, help="patterns of a phase absent from the list (hcp Ti)")
    p.add_argument("--threads", type=int, default=2,
                   help="cores for liveindex: pages at once on one-thread sessions (default 2)")
    p.add_argument("--one-indexer", action="store_true",
                   help="liveindex as one indexer with --threads-thread sessions, a page after another (the "
                        "rate this benchmark reported before the pages of `liveindex index`)")
    p.add_argument("--indexer", choices=("hybrid", "templates"), default="hybrid",
                   help="hybrid (default, as liveindex index): the shipped spot networks first; templates: matching alone")
    p.add_argument("--providers", default="cpu")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--matcher-only", action="store_true",
                   help="time PolarMatcher.match alone (--threads-thread sessions), best of --repeats, and stop")
    p.add_argument("--against", metavar="REV",
                   help="also the matcher graph of git revision REV, the two alternating (--repeats runs each), and "
                        "whether their answers agree pattern by pattern: the matcher's (--matcher-only) or the "
                        "indexer's (no pyxem then)")
    p.add_argument("--repeats", type=int, default=5, help="with --against or --matcher-only: runs of each (default 5)")
    p.add_argument("--py4dstem-python", metavar="PYTHON",
                   help="also py4DSTEM's ACOM, run by this interpreter (a separate venv, see above); skipped if not given")
    p.add_argument("--py4dstem-zone-step", type=float, nargs="*", default=[2.0],
                   help="py4DSTEM orientation plan's zone-axis step(s), degrees (default 2)")
    p.add_argument("--py4dstem-in-plane-step", type=float, default=2.0, help="its in-plane step, degrees (default 2)")
    p.add_argument("--py4dstem-job", default="{}",
                   help="JSON merged into py4dstem_acom.py's job (e.g. '{\"corr_kernel_size\": 0.06, \"detect\": "
                        "{\"minRelativeIntensity\": 0.005}}')")
    p.add_argument("--py4dstem-check-mapping", action="store_true",
                   help="also score the 96 candidate mappings of py4DSTEM's matrices (use with --noise clean)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    phases = phases_from_spec("ferrite,austenite,cementite")
    setup = check_setup({"kv": 200.0, "calibration": args.calibration, "precession": 1.0}, (128, 128))
    ev = make_set(phases, setup, args.n, noise=args.noise, seed=args.seed, near_zone=args.near_zone,
                  center_jitter=False)
    if args.matcher_only:
        print(json.dumps(time_matchers(ev.frames, phases, setup, args), indent=1))
        return
    if args.against:
        print(json.dumps(compare_indexers(ev, phases, setup, args), indent=1))
        return
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    report = {"set": {"n": args.n, "noise": args.noise, "near_zone": args.near_zone, "calibration": args.calibration,
                      "seed": args.seed, "phases": [p.name for p in phases]}, "load_before": load}

    bundle = "default" if args.indexer == "hybrid" else None
    report["set"]["indexer"] = args.indexer
    fields, rate = run_liveindex(ev.frames, phases, setup, resolution=args.resolution, threads=args.threads,
                                 providers=args.providers, pages=not args.one_indexer, bundle=bundle)
    scores = score_answers(fields, ev.quaternions, ev.phase_id, phases)
    report["liveindex"] = summary(scores, rate)
    report["liveindex"]["ambiguous_flagged"] = round(float(fields["ambiguous"].mean()), 4)
    log.info("liveindex: %s", report["liveindex"])
    if args.absent:
        ti = record_from_cif(os.path.join(HERE, "..", "tests", "data", "ti.cif"), name="ti")
        absent = make_set([ti], setup, args.absent, noise=args.noise, seed=args.seed + 1, center_jitter=False)
        absent_fields, _ = run_liveindex(absent.frames, phases, setup, resolution=args.resolution,
                                         threads=args.threads, providers=args.providers, pages=not args.one_indexer,
                                         bundle=bundle)
        report["confidence"] = calibration_report(fields, scores["right"], absent_fields)
        log.info("confidence: %s", report["confidence"])
    for res in args.pyxem_resolution:
        flips = (True, False) if args.pyxem_flip == "auto" else (args.pyxem_flip == "yes",)
        for flip in flips:
            try:
                px_fields, px_rate, lib_s, n_templates = run_pyxem(ev.frames, phases, setup, resolution=res, flip=flip,
                                                                   frac_keep=args.pyxem_frac_keep)
            except ImportError as exc:
                report[f"pyxem_{res:g}deg"] = f"not installed ({exc}); pip install -e .[spots-bench]"
                break
            px = summary(score_answers(px_fields, ev.quaternions, ev.phase_id, phases), px_rate)
            px.update(library_s=round(lib_s, 1), templates=n_templates, flipped=flip)
            report[f"pyxem_{res:g}deg" + ("" if len(flips) == 1 else f"_flip{int(flip)}")] = px
            log.info("pyxem %g deg (flipped %s): %s", res, flip, px)
            if "patterns_per_s" in px:
                report["liveindex"][f"speedup_vs_pyxem_{res:g}deg"] = round(rate / px_rate, 1)
    if not args.py4dstem_python:
        report["py4dstem"] = "skipped: no --py4dstem-python (a venv with py4DSTEM, see the docstring)"
    else:
        why = py4dstem_importable(args.py4dstem_python)
        if why:
            report["py4dstem"] = f"skipped: {why}"
        for step in ([] if why else args.py4dstem_zone_step):
            key = f"py4dstem_{step:g}deg"
            try:
                p4_fields, p4_rate, timing = run_py4dstem(ev.frames, phases, setup, python=args.py4dstem_python,
                                                          zone_step=step, in_plane_step=args.py4dstem_in_plane_step,
                                                          options=json.loads(args.py4dstem_job))
            except (RuntimeError, FileNotFoundError) as exc:
                report[key] = f"failed: {exc}"
                log.info("py4DSTEM %g deg failed: %s", step, exc)
                continue
            p4 = summary(score_answers(p4_fields, ev.quaternions, ev.phase_id, phases), p4_rate)
            p4.update(library_s=round(timing["plan_s"], 1), detect_s=round(timing["detect_s"], 1),
                      match_s=round(timing["match_s"], 1), zones=timing["zones"],
                      in_plane_steps=timing["in_plane_steps"], k_max=timing["k_max"],
                      peaks_median=timing["peaks_median"], unmatched=int((p4_fields["phase_id"] < 0).sum()),
                      version=timing["py4DSTEM"], options={"zone_step": step, "in_plane_step":
                                                           args.py4dstem_in_plane_step, **json.loads(args.py4dstem_job)})
            if args.py4dstem_check_mapping:
                p4["mapping_candidates"] = check_mapping(timing["matrix"], p4_fields, ev, phases)
            report[key] = p4
            log.info("py4DSTEM %g deg: %s", step, p4)
            report["liveindex"][f"speedup_vs_py4dstem_{step:g}deg"] = round(rate / p4_rate, 1)
    finish_report(report, args.json)


if __name__ == "__main__":
    main()

"""py4DSTEM's ACOM on a stack of spot patterns, for benchmarks/spots_side_by_side.py.

Runs in py4DSTEM's own interpreter (a separate virtual environment, see spots_side_by_side.py's
docstring), never in liveindex's: it imports nothing from liveindex.

    /work/p4venv/bin/python benchmarks/py4dstem_acom.py FOLDER

FOLDER holds ``frames.npy`` (N, H, W) and ``job.json``: ``calibration`` (1/A per pixel), ``kv``,
``precession`` (deg), ``center`` ([row, column] of the beam), ``phases`` ([{"name", "cif"}]) and
the options below. Writes ``result.npz`` into FOLDER: ``quaternion`` (N, 4, liveindex's
convention), ``phase_id`` (N, -1 where no phase matched), ``corr`` (N, phases), ``matrix`` (N,
phases, 3, 3: py4DSTEM's own orientation matrices), ``peaks`` (N,), and ``timing.json``:
``plan_s`` (orientation plans, all phases), ``detect_s`` (Bragg disk detection), ``match_s``
(matching, all phases), ``index_s`` (detect + match: what patterns/s counts).

The workflow is py4DSTEM's ACOM tutorial's: ``Crystal.from_CIF`` (pymatgen reads the CIF;
``primitive=False, conventional_standard_structure=False`` so that the cell stays in the CIF's
setting: pymatgen's conventional standard cell turns cementite's Pnma a, b, c into c, a, b),
``calculate_structure_factors(k_max)``, ``orientation_plan(zone_axis_range="auto", ...)`` (the
point group's fundamental zone of zone axes from pymatgen), ``find_Bragg_disks`` on a DataCube
(1, N, H, W) with a synthetic Gaussian probe kernel (the data has no vacuum probe), Q pixel size
and origin calibrated, ``match_orientations`` per phase; the phase of a pattern is the one
with the highest correlation (py4DSTEM's per-phase correlations, each plan normalised alike).

Conventions. py4DSTEM's orientation matrix M maps a crystal Cartesian vector g (column) to the
lab as ``M.T @ g`` (orientation_plan: ``g = R.T @ g_vec_all``), with qx along the image's first
axis (rows) and qy along its columns; liveindex maps g (row) to the lab as ``g @ R`` with lab x
the columns and lab y the rows. So liveindex's R = M @ MAPPING, MAPPING swapping x and y (the
image transposed) and reversing z (py4DSTEM's beam runs along -z): on 60 clean patterns
(seed 7, all three phases, 2-deg plans) this gave a median disorientation of 0.93 deg and 95%
within 3 deg, the next best of the 96 candidates (R = M P, P M, M.T P or P M.T for all signed
permutations P, made proper) 36 deg and none within 3 deg (``--py4dstem-check-mapping`` in
spots_side_by_side.py repeats the check).
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings

import numpy as np

# liveindex's R from py4DSTEM's M: R = M @ MAPPING (see the module docstring).
MAPPING = np.array([[0.0, -1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])


def gaussian_kernel(shape, sigma):
    """A unit-sum Gaussian probe kernel centred on pixel (0, 0), wrapped (py4DSTEM's kernels sit
    at the origin so that correlation peaks fall on the disks' centres)."""
    h, w = shape
    y = np.minimum(np.arange(h), h - np.arange(h))[:, None]
    x = np.minimum(np.arange(w), w - np.arange(w))[None, :]
    k = np.exp(-(x**2 + y**2) / (2 * sigma**2))
    return k / k.sum()


def matrices_to_quaternions(m):
    """(M, 3, 3) proper rotation matrices -> (M, 4) unit quaternions (w, x, y, z), w >= 0, the
    inverse of liveindex's rotation_matrices (orix's Rotation.to_matrix convention)."""
    m = np.asarray(m, np.float64)
    out = np.zeros((len(m), 4))
    for i, r in enumerate(m):
        t = np.trace(r)
        if t > 0:
            s = np.sqrt(t + 1.0) * 2
            q = [0.25 * s, (r[2, 1] - r[1, 2]) / s, (r[0, 2] - r[2, 0]) / s, (r[1, 0] - r[0, 1]) / s]
        elif r[0, 0] > r[1, 1] and r[0, 0] > r[2, 2]:
            s = np.sqrt(1.0 + r[0, 0] - r[1, 1] - r[2, 2]) * 2
            q = [(r[2, 1] - r[1, 2]) / s, 0.25 * s, (r[0, 1] + r[1, 0]) / s, (r[0, 2] + r[2, 0]) / s]
        elif r[1, 1] > r[2, 2]:
            s = np.sqrt(1.0 + r[1, 1] - r[0, 0] - r[2, 2]) * 2
            q = [(r[0, 2] - r[2, 0]) / s, (r[0, 1] + r[1, 0]) / s, 0.25 * s, (r[1, 2] + r[2, 1]) / s]
        else:
            s = np.sqrt(1.0 + r[2, 2] - r[0, 0] - r[1, 1]) * 2
            q = [(r[1, 0] - r[0, 1]) / s, (r[0, 2] + r[2, 0]) / s, (r[1, 2] + r[2, 1]) / s, 0.25 * s]
        out[i] = q
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out * np.where(out[:, :1] < 0, -1.0, 1.0)


def main(folder):
    import py4DSTEM
    from py4DSTEM.process.diffraction import Crystal

    with open(os.path.join(folder, "job.json")) as fh:
        job = json.load(fh)
    frames = np.load(os.path.join(folder, "frames.npy")).astype(np.float32)
    n, h, w = frames.shape
    cal = float(job["calibration"])
    k_max = float(job.get("k_max") or cal * min(h, w) / 2)
    mapping = np.asarray(job["mapping"], float) if job.get("mapping") is not None else MAPPING  # "mapping": a check's
    progress = bool(job.get("progress", False))

    # Orientation plans (not counted in patterns/s).
    crystals = []
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for phase in job["phases"]:
            crystal = Crystal.from_CIF(phase["cif"], primitive=False, conventional_standard_structure=False)
            crystal.calculate_structure_factors(k_max)
            crystal.orientation_plan(
                zone_axis_range="auto",
                angle_step_zone_axis=float(job.get("zone_step", 2.0)),
                # py4DSTEM's coarse-to-fine search: a sieve at this step, then the zone_step plan
                # within refine_range of its best zone axes (None: the whole plan at zone_step).
                angle_coarse_zone_axis=job.get("zone_coarse_step"),
                angle_refine_range=job.get("refine_range"),
                angle_step_in_plane=float(job.get("in_plane_step", 2.0)),
                accel_voltage=float(job["kv"]) * 1e3,
                corr_kernel_size=float(job.get("corr_kernel_size", 0.08)),
                sigma_excitation_error=float(job.get("sigma_excitation_error", 0.02)),
                precession_angle_degrees=float(job["precession"]) or None,
                power_intensity=float(job.get("power_intensity", 0.25)),
                power_intensity_experiment=float(job.get("power_intensity_experiment", 0.25)),
                progress_bar=progress,
            )
            crystals.append(crystal)
    plan_s = time.perf_counter() - start
    zones = [int(c.orientation_num_zones) for c in crystals]
    in_plane = [int(c.orientation_in_plane_steps) for c in crystals]

    datacube = py4DSTEM.DataCube(data=frames[None])
    probe = gaussian_kernel((h, w), float(job.get("probe_sigma", 1.2)))
    det = job.get("detect", {})
    # Bragg disks + matching: what patterns/s counts.
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bragg = datacube.find_Bragg_disks(
            template=probe,
            corrPower=float(det.get("corrPower", 1.0)),
            sigma_cc=float(det.get("sigma_cc", 1.0)),
            subpixel=det.get("subpixel", "poly"),
            minAbsoluteIntensity=float(det.get("minAbsoluteIntensity", 0.0)),
            minRelativeIntensity=float(det.get("minRelativeIntensity", 0.002)),
            relativeToPeak=int(det.get("relativeToPeak", 0)),
            minPeakSpacing=float(det.get("minPeakSpacing", 4)),
            edgeBoundary=int(det.get("edgeBoundary", 2)),
            maxNumPeaks=int(det.get("maxNumPeaks", 70)),
        )
        detect_s = time.perf_counter() - start
        row0, col0 = job["center"]
        bragg.calibration.set_Q_pixel_size(cal)
        bragg.calibration.set_Q_pixel_units("A^-1")
        bragg.calibration.set_origin((float(row0), float(col0)))
        bragg.setcal(center=True, ellipse=False, pixel=True, rotate=False)
        start_match = time.perf_counter()
        maps = [c.match_orientations(bragg, num_matches_return=1, progress_bar=progress) for c in crystals]
    match_s = time.perf_counter() - start_match
    index_s = time.perf_counter() - start

    corr = np.stack([m.corr[0, :, 0] for m in maps], 1)  # (N, phases)
    matrix = np.stack([m.matrix[0, :, 0] for m in maps], 1)  # (N, phases, 3, 3)
    best = np.argmax(corr, 1)
    phase_id = np.where(corr.max(1) > 0, best, -1).astype(np.int16)
    chosen = matrix[np.arange(n), best]
    r = chosen @ mapping
    r *= np.sign(np.linalg.det(r))[:, None, None]  # a check's improper candidate -> proper (Friedel pairs)
    quaternion = matrices_to_quaternions(r)
    peaks = np.array([bragg.raw[0, i].data.shape[0] for i in range(n)])
    np.savez(os.path.join(folder, "result.npz"), quaternion=quaternion, phase_id=phase_id, corr=corr,
             matrix=matrix, peaks=peaks)
    timing = {"plan_s": plan_s, "detect_s": detect_s, "match_s": match_s, "index_s": index_s,
              "zones": zones, "in_plane_steps": in_plane, "k_max": k_max, "py4DSTEM": py4DSTEM.__version__,
              "numpy": np.__version__, "mapping": np.asarray(mapping).tolist()}
    with open(os.path.join(folder, "timing.json"), "w") as fh:
        json.dump(timing, fh)


if __name__ == "__main__":
    main(sys.argv[1])

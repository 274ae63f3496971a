"""The vendors' own text formats of an orientation map: EDAX/TSL ``.ang`` (OIM) and Oxford
``.ctf`` (AZtec, Channel 5), laid out as the vendors write them, so that OIM, AZtec, MTEX,
orix and kikuchipy read them as their own.

Nothing here knows a modality: the columns come from the declared fields (``phase_id``,
``quaternion``, ``confidence``, and the writers' two named fields ``iq`` and ``fit``, see
models/modality.py), the header values from the modality's ``ExportHeader`` (None where the
sink could not ask it: the PC and working distance are then written as 0, OIM's "unknown").

Layouts follow real files as orix's readers and their tests document them (orix
``io/plugins/ang.py`` and ``ctf.py``; the OIM v7 and AZtec headers in orix's test fixtures):

.ang (OIM v7): ``#`` header with the PC (x-star, y-star, z-star, TSL convention),
    WorkingDistance (mm), one block per phase (MaterialName, Formula, Info, Symmetry as OIM's
    Laue code, LatticeConstants in angstrom and degrees, NumberFamilies and hklFamilies
    ``h k l use intensity show``, ElasticConstants, Categories), the grid, then 10 columns:
    phi1 Phi phi2 (radians) x y (microns) IQ CI phase SEM fit. Not indexed: Euler angles
    4 pi, CI -1, phase 0, fit 180 (as OIM writes them); indexed phases are numbered 1..n in
    the order of the scan's phases (the header lists them last first, as OIM 7.2 expects).
    Orientations in orix's convention are OIM's: the sample frame is EDAX TSL's (RD, TD, ND),
    and hexagonal and trigonal crystals have x || a in both (MTEX reads OIM's with "X||a").

.ctf: the Channel Text File header (Prj, Author, JobMode, cells and steps, the acquisition
    line with KV, TiltAngle, WorkingDistance), ``Phases n`` and one line per phase
    (a;b;c  alpha;beta;gamma  name  Laue group number  space group), then 11 tab-separated
    columns: Phase X Y Bands Error Euler1 Euler2 Euler3 MAD BC BS, Euler angles in degrees.
    Phase 0 is not indexed (Error 3, "no solution"). Oxford's Euler convention differs from
    orix's twice: the sample frame is turned 90 degrees about the normal (kikuchipy's
    reference-frame tutorial: orix = Oxford * Rz(-90 deg), i.e. phi1_oxford = phi1 - 90), and
    hexagonal and trigonal crystals have x || a* (MTEX's default, which it reads .ctf with)
    instead of x || a (phi2_oxford = phi2 + 30). ``orientations_from_ctf`` undoes both.
"""

from __future__ import annotations

import math

import numpy as np

from liveindex.models.modality import FIT_FIELD, QUALITY_FIELD

from .protocol import ScanStart

# OIM's "Symmetry" codes and Oxford's Laue group numbers, by the orix Laue class name.
TSL_SYMMETRY = {"-1": 1, "2/m": 2, "mmm": 22, "4/m": 4, "4/mmm": 42, "-3": 3, "-3m": 32, "6/m": 6, "6/mmm": 62,
                "m-3": 23, "m-3m": 43}
OXFORD_LAUE = {"-1": 1, "2/m": 2, "mmm": 3, "4/m": 4, "4/mmm": 5, "-3": 6, "-3m": 7, "6/m": 8, "6/mmm": 9,
               "m-3": 10, "m-3m": 11}
HEXAGONAL_AXES = ("-3", "-3m", "6/m", "6/mmm")  # Laue classes on hexagonal axes (a = b, gamma 120)
OXFORD_SAMPLE_TURN_DEG = -90.0  # phi1: Oxford's sample frame against orix's (EDAX TSL's)
OXFORD_HEX_TURN_DEG = 30.0  # phi2: x || a* (Oxford) against x || a (orix, OIM)
ANG_NOT_INDEXED_EULER = 4 * math.pi
ANG_NOT_INDEXED_FIT = 180.0
CTF_NO_SOLUTION = 3  # Oxford's error code of a point without a solution


def columns(maps: dict, start: ScanStart) -> dict[str, np.ndarray]:
    """What both formats need, one value a point: indexed mask, x and y (microns), IQ,
    confidence and fit (NaN where the scan has no such field)."""
    ny, nx = start.nav_shape
    dy, dx = start.step
    yy, xx = np.mgrid[0:ny, 0:nx]
    n = ny * nx
    indexed = np.asarray(maps["phase_id"]) >= 0

    def scalar(name, default):
        return np.asarray(maps[name], np.float64) if name in maps else np.full(n, default)

    return {"indexed": indexed, "x": (xx.ravel() * dx).astype(np.float64), "y": (yy.ravel() * dy).astype(np.float64),
            "iq": np.nan_to_num(scalar(QUALITY_FIELD, 0.0)), "confidence": np.nan_to_num(scalar("confidence", 1.0)),
            "fit": scalar(FIT_FIELD, np.nan)}


def bunge_euler(quaternion: np.ndarray) -> np.ndarray:
    """(N, 4) orix quaternions -> (N, 3) Bunge Euler angles in radians (phi1 and phi2 in
    [0, 2 pi), Phi in [0, pi]), as orix's ``Rotation.to_euler``."""
    from orix.quaternion import Rotation

    return np.asarray(Rotation(np.asarray(quaternion, np.float64)).to_euler(), np.float64)


def write_ang(path, maps: dict, start: ScanStart, header=None, *, scan_id: str = "") -> None:
    """The scan as an OIM v7 .ang file (see the module's notes)."""
    cols = columns(maps, start)
    indexed = cols["indexed"]
    euler = bunge_euler(maps["quaternion"])
    euler[~indexed] = ANG_NOT_INDEXED_EULER
    ci = np.where(indexed, cols["confidence"], -1.0)
    fit = np.where(indexed, np.nan_to_num(cols["fit"], nan=0.0), ANG_NOT_INDEXED_FIT)
    phase = np.where(indexed, np.asarray(maps["phase_id"]) + 1, 0)
    sem = np.zeros(len(phase))
    text = "\n".join(_ang_header(start, header, scan_id)) + "\n"
    rows = np.column_stack([euler, cols["x"], cols["y"], cols["iq"], ci, phase, sem, fit])
    fmt = "%9.5f %9.5f %9.5f %12.5f %12.5f %10.5f %7.4f %2d %6d %8.4f"
    with open(path, "w") as f:
        f.write(text)
        np.savetxt(f, rows, fmt=fmt)


def _ang_header(start: ScanStart, header, scan_id: str) -> list[str]:
    ny, nx = start.nav_shape
    dy, dx = start.step
    pc = header.pc_tsl if header is not None and header.pc_tsl is not None else (0.0, 0.0, 0.0)
    wd = header.working_distance_mm if header is not None and header.working_distance_mm is not None else 0.0
    lines = ["# TEM_PIXperUM          1.000000",
             f"# x-star                {pc[0]:.6f}",
             f"# y-star                {pc[1]:.6f}",
             f"# z-star                {pc[2]:.6f}",
             f"# WorkingDistance       {wd:.6f}",
             "#"]
    # OIM 7.2 reads the phase blocks last first (orix's writer does the same).
    for number, phase in reversed(list(enumerate(start.phases, start=1))):
        a, b, c, alpha, beta, gamma = phase.lattice
        families = phase.hkl_families()
        lines += [f"# Phase {number}",
                  f"# MaterialName  \t{phase.name}",
                  f"# Formula     \t{phase.name}",
                  f"# Info \t\tspace group {phase.space_group}, point group {phase.point_group_name}",
                  f"# Symmetry              {TSL_SYMMETRY[phase.laue.name]}",
                  f"# LatticeConstants      {a:.3f} {b:.3f} {c:.3f} {alpha:7.3f} {beta:7.3f} {gamma:7.3f}",
                  f"# NumberFamilies        {len(families)}"]
        lines += [f"# hklFamilies   \t{h:2d} {k:2d} {l:2d} 1 {intensity:.6f} 1" for (h, k, l), intensity in families]
        lines += ["# ElasticConstants \t" + " ".join(["0.000000"] * 6)] * 6
        lines += ["# Categories0 0 0 0 0 ", "#"]
    lines += ["# GRID: SqrGrid",
              f"# XSTEP: {dx:.6f}",
              f"# YSTEP: {dy:.6f}",
              f"# NCOLS_ODD: {nx}",
              f"# NCOLS_EVEN: {nx}",
              f"# NROWS: {ny}",
              "#",
              "# OPERATOR: \tliveindex",
              "#",
              "# SAMPLEID: \t",
              "#",
              f"# SCANID: \t{scan_id}",
              "#",
              "# liveindex: IQ is the pattern quality field (iq), CI the calibrated confidence, fit the fit field "
              "(lower is better; 0 where the scan has none)",
              "#"]
    return lines


def oxford_euler_degrees(quaternion: np.ndarray, phase_id: np.ndarray, phases) -> np.ndarray:
    """(N, 3) Bunge Euler angles in degrees in Oxford's convention (see the module's notes);
    zeros where not indexed."""
    euler = np.degrees(bunge_euler(quaternion))
    phase_id = np.asarray(phase_id)
    euler[:, 0] += OXFORD_SAMPLE_TURN_DEG
    for p, phase in enumerate(phases):
        if phase.laue.name in HEXAGONAL_AXES:
            euler[phase_id == p, 2] += OXFORD_HEX_TURN_DEG
    euler[:, 0] %= 360.0
    euler[:, 2] %= 360.0
    euler[phase_id < 0] = 0.0
    return euler


def orientations_from_ctf(euler_degrees: np.ndarray, laue_names) -> np.ndarray:
    """(N, 4) orix quaternions from Oxford-convention Euler angles (degrees) and each point's
    Laue class name: undoes ``oxford_euler_degrees`` (for reading .ctf files back)."""
    from orix.quaternion import Rotation

    euler = np.array(euler_degrees, np.float64)
    euler[:, 0] -= OXFORD_SAMPLE_TURN_DEG
    euler[np.isin(np.asarray(laue_names), HEXAGONAL_AXES), 2] -= OXFORD_HEX_TURN_DEG
    return np.asarray(Rotation.from_euler(np.radians(euler)).data, np.float64)


def write_ctf(path, maps: dict, start: ScanStart, header=None, *, scan_id: str = "") -> None:
    """The scan as an Oxford Channel Text File (see the module's notes)."""
    cols = columns(maps, start)
    indexed = cols["indexed"]
    euler = oxford_euler_degrees(maps["quaternion"], maps["phase_id"], start.phases)
    phase = np.where(indexed, np.asarray(maps["phase_id"]) + 1, 0)
    error = np.where(indexed, 0, CTF_NO_SOLUTION)
    bands = np.zeros(len(phase), int)  # liveindex detects no bands
    mad = np.where(indexed, np.nan_to_num(cols["fit"], nan=0.0), 0.0)
    bc = np.clip(np.rint(255.0 * cols["iq"]), 0, 255).astype(int)  # band contrast 0..255, as AZtec's
    bs = np.zeros(len(phase), int)  # no band slope
    rows = np.column_stack([phase, cols["x"], cols["y"], bands, error, euler, mad, bc, bs])
    fmt = "%d\t%.4f\t%.4f\t%d\t%d\t%.4f\t%.4f\t%.4f\t%.4f\t%d\t%d"
    with open(path, "w") as f:
        f.write("\n".join(_ctf_header(start, header, scan_id, coverage=float(indexed.mean()) if len(indexed) else 0.0))
                + "\n")
        np.savetxt(f, rows, fmt=fmt)


def _ctf_header(start: ScanStart, header, scan_id: str, *, coverage: float) -> list[str]:
    ny, nx = start.nav_shape
    dy, dx = start.step

    def known(name, default=0.0):
        value = getattr(header, name, None) if header is not None else None
        return default if value is None else value

    acquisition = ["Euler angles refer to Sample Coordinate system (CS0)!", "Mag", "0.0000",
                   "Coverage", f"{round(100 * coverage)}", "Device", "0",
                   "KV", f"{known('energy_kv'):.4f}", "TiltAngle", f"{known('sample_tilt_deg'):.4f}", "TiltAxis", "0",
                   "WorkingDistance", f"{known('working_distance_mm'):.4f}"]
    lines = ["Channel Text File",
             f"Prj\t{scan_id}",
             "Author\tliveindex",
             "JobMode\tGrid",
             f"XCells\t{nx}",
             f"YCells\t{ny}",
             f"XStep\t{dx:.4f}",
             f"YStep\t{dy:.4f}",
             "AcqE1\t0.0000",
             "AcqE2\t0.0000",
             "AcqE3\t0.0000",
             "\t".join(acquisition),
             f"Phases\t{len(start.phases)}"]
    for phase in start.phases:
        a, b, c, alpha, beta, gamma = phase.lattice
        lines.append(f"{a:.3f};{b:.3f};{c:.3f}\t{alpha:.3f};{beta:.3f};{gamma:.3f}\t{phase.name}\t"
                     f"{OXFORD_LAUE[phase.laue.name]}\t{phase.space_group}\t\t\tliveindex")
    lines.append("Phase\tX\tY\tBands\tError\tEuler1\tEuler2\tEuler3\tMAD\tBC\tBS")
    return lines

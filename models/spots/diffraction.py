"""Kinematical spot patterns, vectorised over many orientations at once.

The reciprocal lattice and the structure factors come from diffsims (``ReciprocalLatticeVector``,
``get_kinematical_intensities`` with Lobato scattering factors, the phase as orix builds it);
the geometry (Ewald sphere, excitation error, precession) follows diffsims'
``SimulationGenerator.get_intersecting_reflections`` line by line, but for (M, 3, 3) rotation
matrices in one array operation: diffsims loops over orientations in Python (about 2 ms each),
which is too slow for a library of thousands of templates and for refinement. The test
``test_spots_match_diffsims`` checks positions and intensities against ``SimulationGenerator``.

Convention (diffsims', orix's): a crystal vector g is seen in the lab as ``~R * g``, i.e.
``R.T @ g`` with ``R`` the orientation's rotation matrix; the beam runs along lab z; lab x is
the pattern's column axis, lab y its row axis.

Scan rotation (``scan_frame``): orientations are measured in the diffraction image's frame;
the scan rotation turns them about the beam into the scan's (sample's) frame.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from liveindex.models.crystal import PhaseRecord, quaternion_multiply, structure_factors
from liveindex.models.errors import InputError

MIN_RELATIVE_F2 = 1e-4  # reflections weaker than this (|F|^2 of the strongest) are left out


@dataclass(frozen=True)
class Reflections:
    """One phase's reciprocal lattice within a radius: hkl (G, 3), Cartesian g in the
    crystal frame (G, 3) in 1/angstrom, and kinematical |F|^2 (G,)."""

    hkl: np.ndarray
    g: np.ndarray
    f2: np.ndarray


def wavelength(kv: float) -> float:
    """Relativistic electron wavelength in angstrom."""
    from diffsims.utils.sim_utils import get_electron_wavelength

    return float(get_electron_wavelength(kv))


FIRST_REFLECTION_SEARCH = 1.5  # 1/angstrom: where the error below looks for a phase's first reflection


@functools.lru_cache(maxsize=32)
def _reflections(record: PhaseRecord, reciprocal_radius: float) -> Reflections:
    from diffsims.crystallography import ReciprocalLatticeVector

    phase = record.orix_phase()
    try:
        vectors = ReciprocalLatticeVector.from_min_dspacing(phase, 1.0 / reciprocal_radius)
    except ValueError:  # orix: not even the shortest lattice vector lies within the radius
        vectors = None
    if vectors is None or vectors.size == 0:
        raise _out_of_reach(record, reciprocal_radius)
    hkl = np.asarray(vectors.hkl, float)
    g = np.asarray(vectors.data, float)
    # |F|^2 from each reflection's own structure factor (models/crystal.py structure_factors):
    # diffsims' get_kinematical_intensities moves the atoms of a cell in orix's alignment, which
    # for hexagonal and trigonal cells gave forbidden reflections intensity (hcp Ti's 111: 0.32
    # of the strongest) and took it from allowed ones (its 100: 0.07 for 0.30).
    f2 = np.abs(structure_factors(phase, hkl, "lobato")) ** 2
    if not f2.max() > 0:  # only systematically absent ones within the radius
        raise _out_of_reach(record, reciprocal_radius)
    keep = f2 > MIN_RELATIVE_F2 * f2.max()
    return Reflections(hkl[keep], g[keep], f2[keep])


def _out_of_reach(record: PhaseRecord, reciprocal_radius: float) -> InputError:
    """The frames reach too little of reciprocal space to show any of the phase's spots (a tiny
    frame, or a calibration off by a factor): say how far they reach and where its first spot is."""
    first = None
    if reciprocal_radius < FIRST_REFLECTION_SEARCH:
        try:
            first = _reflections(record, FIRST_REFLECTION_SEARCH)
        except InputError:
            pass
    where = "it has no reflection that close"
    if first is not None:
        length = np.linalg.norm(first.g, axis=1)
        hkl = " ".join(str(round(v)) for v in first.hkl[np.argmin(length)])
        where = f"its first reflection ({hkl}) lies at {length.min():.2f} 1/angstrom"
    return InputError(f"phase {record.name}: the frames reach only {reciprocal_radius:.2f} 1/angstrom from the direct "
                      f"beam (the calibration times the frame's radius) and {where}; check --calibration (1/angstrom "
                      "per pixel) or give larger frames")


def reflections(record: PhaseRecord, reciprocal_radius: float) -> Reflections:
    """The phase's allowed reflections with |g| <= ``reciprocal_radius`` (1/angstrom)."""
    return _reflections(record, round(float(reciprocal_radius), 6))


def lab_vectors(matrices: np.ndarray, g: np.ndarray) -> np.ndarray:
    """(M, 3, 3) orientation matrices, (G, 3) crystal vectors -> (M, G, 3) lab vectors (R.T @ g)."""
    return np.einsum("gi,mij->mgj", g, matrices, optimize=True)


def spot_intensities(lab: np.ndarray, f2: np.ndarray, *, wavelength_a: float, precession_deg: float,
                     excitation_width: float) -> np.ndarray:
    """(M, G, 3) lab vectors -> (M, G) kinematical intensities (0 where the reflection does not
    meet the Ewald sphere), as diffsims' SimulationGenerator with the Lorentzian precession model
    (precession > 0) or its Lorentzian shape factor (no precession)."""
    r_sphere = 1.0 / wavelength_a
    r_spot = np.sqrt(lab[..., 0] ** 2 + lab[..., 1] ** 2)
    z_spot = lab[..., 2]
    z_sphere = -np.sqrt(np.maximum(r_sphere**2 - r_spot**2, 0.0)) + r_sphere
    s = z_sphere - z_spot
    if precession_deg > 0:
        phi = np.deg2rad(precession_deg)
        p_z, p_t = r_sphere * np.cos(phi), r_sphere * np.sin(phi)
        up = p_z - np.sqrt(np.maximum(r_sphere**2 - (r_spot + p_t) ** 2, 0.0))
        down = p_z - np.sqrt(np.maximum(r_sphere**2 - (r_spot - p_t) ** 2, 0.0))
        hit = (z_spot - excitation_width <= up) & (z_spot + excitation_width >= down)
        sigma = np.pi / excitation_width
        u = sigma**2 * (r_spot**2 * phi**2 - s**2) + 1
        z = np.sqrt(u**2 + 4 * sigma**2 * s**2)
        factor = (sigma / np.pi) * np.sqrt(2 * (u + z) / z**2)
    else:
        hit = np.abs(s) < excitation_width
        # diffsims' default shape factor model ("lorentzian")
        sigma = np.pi / excitation_width
        factor = sigma / (np.pi * (sigma**2 * s**2 + 1))
    return np.where(hit, factor * f2, 0.0)


def rotation_matrices(quaternions: np.ndarray) -> np.ndarray:
    """(M, 4) unit quaternions (w, x, y, z) -> (M, 3, 3) rotation matrices, as orix's
    ``Rotation.to_matrix`` (checked in the tests)."""
    q = np.asarray(quaternions, np.float64)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    w, x, y, z = np.moveaxis(q, -1, 0)
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


def matrices_to_quaternions(m: np.ndarray) -> np.ndarray:
    """(M, 3, 3) rotation matrices -> (M, 4) unit quaternions with w >= 0."""
    from orix.quaternion import Rotation

    q = np.asarray(Rotation.from_matrix(np.asarray(m, np.float64)).data, np.float64).reshape(-1, 4)
    return q * np.where(q[:, :1] < 0, -1.0, 1.0)


def turn_about_beam(degrees: float) -> np.ndarray:
    """(4,) quaternion of a turn by ``degrees`` about lab z (the beam), from lab x towards lab y."""
    half = np.deg2rad(float(degrees)) / 2
    return np.array([np.cos(half), 0.0, 0.0, np.sin(half)])


def scan_frame(quaternions: np.ndarray, scan_rotation_deg: float) -> np.ndarray:
    """(M, 4) orientations in the diffraction image's frame -> the scan's (sample's) frame, w >= 0.

    ``scan_rotation_deg`` is the angle of the scan's x axis as seen in the diffraction image,
    from the image's x (column) axis towards its y (row) axis: a vector with scan-frame
    components v lies along Rz(theta) v in the image frame. R maps lab to crystal
    (g_crystal = R v_lab), so R_scan = R_image Rz(theta): the turn is right-multiplied.
    """
    q = quaternion_multiply(np.asarray(quaternions, np.float64), turn_about_beam(scan_rotation_deg))
    return q * np.where(q[..., :1] < 0, -1.0, 1.0)


def axis_rotations(axis: int, angles: np.ndarray) -> np.ndarray:
    """(M,) angles in radians -> (M, 3, 3) rotation matrices about lab/crystal axis 0, 1 or 2."""
    c, s = np.cos(angles), np.sin(angles)
    out = np.zeros((len(angles), 3, 3))
    i, j = [(1, 2), (2, 0), (0, 1)][axis]
    out[:, axis, axis] = 1.0
    out[:, i, i] = c
    out[:, j, j] = c
    out[:, i, j] = -s
    out[:, j, i] = s
    return out

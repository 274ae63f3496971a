"""Template libraries: one per phase, over the phase's own fundamental zone of beam directions.

A spot pattern's orientation is a beam direction (which crystal direction lies along the
beam) and an in-plane rotation. The library holds one template per beam direction in the
fundamental sector of the phase's proper rotation group (a Fibonacci grid on the sphere at
``resolution`` degrees, each direction kept where it is the representative of its orbit), so
a cubic phase at 2 degrees has about 440 templates and an orthorhombic one about 2600; the
in-plane rotation is searched by the matcher (matcher.py) in Fourier space.

Each template is stored as the angular Fourier coefficients (harmonics 2k, k = 1..K: spot
patterns are centrosymmetric) of its spots on the matcher's radial bins, with each spot's
radial and angular Gaussian blur, and unit norm. Libraries are cached on disk
(``<cache>/spot_templates/<hash>.npz``) by a content hash of what they are made from.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from liveindex.models.crystal import PhaseRecord, proper_operators, quaternion_multiply

from .diffraction import lab_vectors, matrices_to_quaternions, reflections, spot_intensities, wavelength

log = logging.getLogger(__name__)

VERSION = 2  # 2: hexagonal and trigonal phases' spot intensities (diffraction.py _reflections)
EXCITATION_WIDTH = 0.035  # 1/angstrom: the refinement's rel-rod width (thickness about 30 nm)
# The library's templates take a wider rel-rod: a template then also holds the spots that a beam
# direction up to about a grid step away excites, so the true direction's neighbour on the grid
# still matches.
MATCH_WIDTH = 0.06  # 0.035, 0.06, 0.09: 78.3, 78.7, 80.0% within 3 deg (300 clean patterns): within noise
SPOT_SIGMA = 1.2  # pixels: a spot's blur in the templates (the simulator's moderate blur)
INTENSITY_POWER = 0.5  # template weight |I|^0.5, as the patterns' gamma


# The matcher sums the polar image's radii in pairs (templates likewise): half the MatMul,
# 1.5x the patterns/s, the same accuracy on 300 moderate patterns; refinement reads every radius.
RADIAL_BIN = 2


@dataclass(frozen=True)
class PolarGrid:
    """The matcher's polar sampling: radii r_min..r_max in pixels (one bin a pixel), ``angles``
    bins over 360 degrees, ``harmonics`` K angular harmonics (2k, k = 1..K). K = 20 (3-degree
    detail) matched as well as 30 on 300 moderate patterns and ran 1.3x faster with 60 in-plane
    steps instead of 90."""

    r_min: float
    r_max: float
    angles: int = 360
    harmonics: int = 20

    @property
    def radii(self) -> np.ndarray:
        return np.arange(self.r_min, self.r_max + 1e-9, 1.0)

    @classmethod
    def for_shape(cls, pattern_shape, *, harmonics: int = 20) -> "PolarGrid":
        h, w = pattern_shape
        r_min = max(4.0, round(0.05 * min(h, w)))
        r_max = float(min(h, w) // 2 - 3)
        if (r_max - r_min + 1) % RADIAL_BIN:  # whole matching bins
            r_max -= (r_max - r_min + 1) % RADIAL_BIN
        return cls(r_min=r_min, r_max=r_max, harmonics=harmonics)


@dataclass
class Library:
    """One phase's templates: ``quaternions`` (N, 4) orientations at in-plane angle 0, and
    ``real``/``imag`` (N, R, K) Fourier coefficients of unit norm."""

    phase: PhaseRecord
    quaternions: np.ndarray
    real: np.ndarray
    imag: np.ndarray

    @property
    def size(self) -> int:
        return len(self.quaternions)


def sector_directions(space_group: int, resolution_deg: float) -> np.ndarray:
    """(N, 3) unit beam directions, a Fibonacci grid of about ``resolution_deg`` spacing over the
    fundamental sector of the space group's proper rotations (each direction kept where it is
    the one of its orbit closest to a fixed generic direction)."""
    n_sphere = int(np.ceil(4 * np.pi / np.deg2rad(resolution_deg) ** 2))
    i = np.arange(n_sphere) + 0.5
    z = 1 - 2 * i / n_sphere
    phi = np.pi * (1 + 5**0.5) * i
    rho = np.sqrt(1 - z**2)
    v = np.stack([rho * np.cos(phi), rho * np.sin(phi), z], 1)
    ops = proper_operators(space_group)
    from .diffraction import rotation_matrices

    mats = rotation_matrices(ops)  # (S, 3, 3)
    orbit = np.einsum("sij,nj->nsi", mats, v)  # (N, S, 3)
    generic = np.array([0.137, 0.271, 0.953])
    generic /= np.linalg.norm(generic)
    score = orbit @ generic
    return v[score[:, 0] >= score.max(axis=1) - 1e-12]


def directions_to_matrices(v: np.ndarray) -> np.ndarray:
    """(N, 3) unit directions -> (N, 3, 3) rotations R0 with R0 @ e_z = v (the smallest turn)."""
    z = np.array([0.0, 0.0, 1.0])
    axis = np.cross(z, v)
    s = np.linalg.norm(axis, axis=1)
    c = v[:, 2]
    k = np.where(s[:, None] > 1e-12, axis / np.maximum(s, 1e-12)[:, None], np.array([1.0, 0.0, 0.0]))
    kx = np.zeros((len(v), 3, 3))
    kx[:, 0, 1], kx[:, 0, 2], kx[:, 1, 0] = -k[:, 2], k[:, 1], k[:, 2]
    kx[:, 1, 2], kx[:, 2, 0], kx[:, 2, 1] = -k[:, 0], -k[:, 1], k[:, 0]
    return np.eye(3)[None] + s[:, None, None] * kx + (1 - c)[:, None, None] * (kx @ kx)


def fourier_templates(xy_px: np.ndarray, intensity: np.ndarray, grid: PolarGrid, *,
                      spot_sigma: float = SPOT_SIGMA) -> tuple[np.ndarray, np.ndarray]:
    """(N, G, 2) spot positions in pixels from the centre, (N, G) intensities -> unit-norm
    (N, R / RADIAL_BIN, K) real and imaginary angular Fourier coefficients (harmonics 2k, k = 1..K) of the
    blurred spots on the grid's radii. Convention: T(k) = sum w exp(-i 2k theta)."""
    radii = grid.radii
    k = np.arange(1, grid.harmonics + 1)
    r = np.hypot(xy_px[..., 0], xy_px[..., 1])
    theta = np.arctan2(xy_px[..., 1], xy_px[..., 0])
    w = np.where((r >= grid.r_min - 2) & (r <= grid.r_max + 2), np.abs(intensity) ** INTENSITY_POWER, 0.0)
    # Keep each template's spots only (tens of the phase's hundreds of reflections): 12x faster.
    width = max(int((w > 0).sum(axis=1).max()), 1)
    order = np.argsort(-w, axis=1)[:, :width]
    r, theta, w = (np.take_along_axis(a, order, 1) for a in (r, theta, w))
    n = len(r)
    real = np.zeros((n, len(radii), len(k)), np.float32)
    imag = np.zeros_like(real)
    chunk = 256
    for a in range(0, n, chunk):
        sl = slice(a, a + chunk)
        radial = np.exp(-0.5 * ((radii[None, None, :] - r[sl, :, None]) / spot_sigma) ** 2)  # (n, G, R)
        sigma_theta = spot_sigma / np.maximum(r[sl], 1.0)
        damp = np.exp(-0.5 * (2 * k[None, None, :] * sigma_theta[..., None]) ** 2)  # (n, G, K)
        phase = 2 * k[None, None, :] * theta[sl, :, None]
        amp = (w[sl, :, None] * damp)
        real[sl] = np.einsum("ngr,ngk->nrk", radial, amp * np.cos(phase), optimize=True)
        imag[sl] = -np.einsum("ngr,ngk->nrk", radial, amp * np.sin(phase), optimize=True)
    if RADIAL_BIN > 1:
        real = real.reshape(n, -1, RADIAL_BIN, len(k)).sum(2)
        imag = imag.reshape(n, -1, RADIAL_BIN, len(k)).sum(2)
    norm = np.sqrt((real**2 + imag**2).sum(axis=(1, 2), keepdims=True))
    norm = np.maximum(norm, 1e-12)
    return real / norm, imag / norm


def cache_dir() -> Path:
    """``<cache>/spot_templates``: the cache root by EBSD's rule (models/ebsd/cache.py, not
    imported here: one modality does not load another): ``LIVEINDEX_CACHE``, else
    ``$XDG_CACHE_HOME/liveindex``, else ``~/.cache/liveindex``."""
    root = os.environ.get("LIVEINDEX_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "liveindex"
    return Path(root) / "spot_templates"


def library_key(phase: PhaseRecord, setup: dict, pattern_shape, grid: PolarGrid, resolution: float) -> str:
    content = json.dumps({"v": VERSION, "phase": [phase.space_group, [round(x, 6) for x in phase.lattice],
                                                  [[a[0], *(round(x, 6) for x in a[1:])] for a in phase.atoms]],
                          "kv": setup["kv"], "cal": setup["calibration"], "prec": setup["precession"],
                          "shape": list(pattern_shape), "grid": [grid.r_min, grid.r_max, grid.harmonics, RADIAL_BIN],
                          "res": resolution, "width": MATCH_WIDTH}, sort_keys=True)
    return hashlib.sha256(content.encode()).hexdigest()[:20]


def build_library(phase: PhaseRecord, setup: dict, pattern_shape, grid: PolarGrid, resolution: float) -> Library:
    """The phase's library, from the cache or simulated (and cached)."""
    key = library_key(phase, setup, pattern_shape, grid, resolution)
    path = cache_dir() / f"{key}.npz"
    if path.is_file():
        try:
            with np.load(path) as data:
                library = Library(phase, data["quaternions"], data["real"], data["imag"])
        except (OSError, ValueError, KeyError) as exc:
            log.warning("template cache %s unreadable (%s); simulating again", path, exc)
        else:
            with contextlib.suppress(OSError):  # last used: the cache's size limit removes the oldest first
                os.utime(path)
            return library
    start = time.perf_counter()
    directions = sector_directions(phase.space_group, resolution)
    mats = directions_to_matrices(directions)
    g_max = (grid.r_max + 3) * setup["calibration"]
    refl = reflections(phase, g_max)
    reals, imags = [], []
    for a in range(0, len(mats), 512):
        lab = lab_vectors(mats[a:a + 512], refl.g)
        inten = spot_intensities(lab, refl.f2, wavelength_a=wavelength(setup["kv"]),
                                 precession_deg=setup["precession"], excitation_width=MATCH_WIDTH)
        re, im = fourier_templates(lab[..., :2] / setup["calibration"], inten, grid)
        reals.append(re)
        imags.append(im)
    q = matrices_to_quaternions(mats)
    library = Library(phase, q, np.concatenate(reals), np.concatenate(imags))
    log.info("spot templates %s: %d beam directions at %.1f deg in %.1f s", phase.name, library.size, resolution,
             time.perf_counter() - start)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, quaternions=library.quaternions, real=library.real, imag=library.imag)
    os.replace(tmp, path)
    return library


def in_plane(quaternions: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Orientation R0 @ Rz(alpha): (N, 4) template orientations and (N,) angles (radians)."""
    rz = np.stack([np.cos(alpha / 2), np.zeros_like(alpha), np.zeros_like(alpha), np.sin(alpha / 2)], -1)
    return quaternion_multiply(quaternions, rz)

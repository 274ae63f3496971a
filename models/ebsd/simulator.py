"""The simulated detector: a synthetic polycrystal rendered from a real master pattern.

Grains are Voronoi cells with random orientations. Each grain's pattern is simulated once
from the master pattern for the detector geometry, then every scan point gets its own
background and Poisson noise, so a 1000x1000 scan costs one simulation per grain.
Ground-truth orientations travel in the scan metadata so the sink can score live.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .geometry import DetectorGeometry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NoiseLevel:
    """Kikuchi band contrast over the background, and electron counts per pixel."""

    contrast: float
    counts: float | None  # None: no shot noise


NOISE_LEVELS = {
    "clean": NoiseLevel(contrast=0.5, counts=None),
    # Tuned so that 3 deg dictionary indexing finds ~98% (moderate) and ~93% (hard) of
    # points within 3 deg, close to kikuchipy's figures on the field's "hard" patterns.
    "moderate": NoiseLevel(contrast=0.35, counts=100.0),
    "hard": NoiseLevel(contrast=0.25, counts=30.0),
}


def parse_nav_shape(text: str) -> tuple[int, int]:
    """'40x30' -> (ny, nx) = (30, 40): width first, as microscopists say it."""
    try:
        nx, ny = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"scan size {text!r} must look like 40x40 (width x height)") from None
    if nx < 1 or ny < 1:
        raise ValueError(f"scan size {text!r} must be positive")
    return ny, nx


class SimulatedScan:
    """A polycrystal scan whose frames are rendered on demand, page by page."""

    def __init__(self, nav_shape=(40, 40), *, geometry: DetectorGeometry | None = None, noise: str = "moderate",
                 grain_size: float = 8.0, phase="ni", seed: int = 0, precipitate=None,
                 precipitate_share: float = 0.25, precipitate_radius: float = 2.5):
        """``precipitate``: a phase (key or record) of round particles, ``precipitate_radius``
        points across, covering about ``precipitate_share`` of the scan, each with the
        orientation of the grain it sits in (a cube-cube relation, as gamma prime in a
        superalloy's gamma matrix); its phase index in ``truth_phase`` is ``len(phases)``."""
        if noise not in NOISE_LEVELS:
            raise ValueError(f"noise level {noise!r} unknown; use one of {sorted(NOISE_LEVELS)}")
        self.nav_shape = tuple(nav_shape)
        self.geometry = geometry or DetectorGeometry()
        self.noise = noise
        # One phase key (or record), or several: then each grain gets one of them at random.
        self.phases = _phase_keys(phase)
        self.phase = self.phases[0]
        self.seed = seed
        rng = np.random.default_rng(seed)
        ny, nx = self.nav_shape
        n_grains = max(1, round(ny * nx / grain_size**2))
        seeds = rng.uniform((0, 0), (ny, nx), size=(n_grains, 2))
        yy, xx = np.mgrid[0:ny, 0:nx]
        points = np.stack([yy.ravel(), xx.ravel()], axis=1).astype(np.float32)
        self.grain_of_point = _nearest_seed(points, seeds.astype(np.float32))
        # Normalised 4D Gaussians are uniform on the rotation group.
        q = rng.standard_normal((n_grains, 4))
        q *= np.sign(q[:, :1]) / np.linalg.norm(q, axis=1, keepdims=True)
        self.grain_rotations = q.astype(np.float32)
        self.truth = self.grain_rotations[self.grain_of_point]  # (N, 4)
        # Drawn after the orientations, so a one-phase scan is the same as before phases came.
        self.grain_phase = (rng.integers(0, len(self.phases), n_grains) if len(self.phases) > 1
                            else np.zeros(n_grains, np.int64)).astype(np.int16)
        self.truth_phase = self.grain_phase[self.grain_of_point]  # (N,) index into self.phases
        self._grain_patterns = self._render_grains()
        self.precipitate = None
        if precipitate is not None:
            self._add_precipitates(precipitate, precipitate_share, precipitate_radius, rng)
        self._background = _background_shape(self.geometry)

    @property
    def size(self) -> int:
        return int(np.prod(self.nav_shape))

    def _render_grains(self) -> np.ndarray:
        from orix.quaternion import Rotation

        from liveindex.models.ebsd.master_patterns import master_pattern

        patterns = np.empty((len(self.grain_rotations), *self.geometry.pattern_shape), np.float32)
        for p, key in enumerate(self.phases):
            mine = np.flatnonzero(self.grain_phase == p)
            if not len(mine):
                continue
            sim = master_pattern(key).get_patterns(Rotation(self.grain_rotations[mine]),
                                                   self.geometry.kikuchipy_detector(), energy=self.geometry.energy_kv,
                                                   compute=True, dtype_out=np.float32, show_progressbar=False)
            patterns[mine] = np.asarray(sim.data, dtype=np.float32).reshape(-1, *self.geometry.pattern_shape)
        lo = patterns.min(axis=(1, 2), keepdims=True)
        hi = patterns.max(axis=(1, 2), keepdims=True)
        return (patterns - lo) / np.maximum(hi - lo, 1e-6)

    def _add_precipitates(self, phase, share: float, radius: float, rng) -> None:
        """Round particles of ``phase`` in every grain, in the grain's orientation: a second
        rendered pattern per grain, which the points inside a particle show."""
        from orix.quaternion import Rotation

        from liveindex.models.ebsd.master_patterns import master_pattern

        (key,) = _phase_keys(phase)
        self.precipitate = key
        ny, nx = self.nav_shape
        n = max(1, round(share * ny * nx / (np.pi * radius**2)))
        centres = rng.uniform((0, 0), (ny, nx), size=(n, 2)).astype(np.float32)
        yy, xx = np.mgrid[0:ny, 0:nx]
        points = np.stack([yy.ravel(), xx.ravel()], axis=1).astype(np.float32)
        nearest = _nearest_seed(points, centres)
        inside = ((points - centres[nearest]) ** 2).sum(1) <= radius**2
        sim = master_pattern(key).get_patterns(Rotation(self.grain_rotations), self.geometry.kikuchipy_detector(),
                                               energy=self.geometry.energy_kv, compute=True, dtype_out=np.float32,
                                               show_progressbar=False)
        extra = np.asarray(sim.data, dtype=np.float32).reshape(-1, *self.geometry.pattern_shape)
        lo, hi = extra.min(axis=(1, 2), keepdims=True), extra.max(axis=(1, 2), keepdims=True)
        extra = (extra - lo) / np.maximum(hi - lo, 1e-6)
        g = len(self.grain_rotations)
        self._grain_patterns = np.concatenate([self._grain_patterns, extra])
        self.grain_of_point = np.where(inside, self.grain_of_point + g, self.grain_of_point)
        self.truth_phase = np.where(inside, len(self.phases), self.truth_phase).astype(np.int16)

    def render(self, first: int, count: int) -> np.ndarray:
        """Frames ``first .. first+count-1`` as uint8 (count, H, W), like a real 8-bit camera."""
        level = NOISE_LEVELS[self.noise]
        rng = np.random.default_rng((self.seed, first))
        clean = self._grain_patterns[self.grain_of_point[first:first + count]]
        signal = self._background * (1.0 - level.contrast + level.contrast * clean)
        if level.counts is not None:
            signal = rng.poisson(signal * level.counts).astype(np.float32) / level.counts
        return np.clip(signal * 200.0, 0, 255).astype(np.uint8)


def _phase_keys(phase) -> list[str]:
    """A phase key, record or name, or a list of them -> phase keys (records are registered)."""
    from liveindex.models.crystal import PhaseRecord
    from liveindex.models.ebsd.master_patterns import check_phases, register

    items = list(phase) if isinstance(phase, (list, tuple)) else [phase]
    return check_phases([register(p) if isinstance(p, PhaseRecord) else p for p in items])


def _nearest_seed(points: np.ndarray, seeds: np.ndarray, chunk: int = 65536) -> np.ndarray:
    out = np.empty(len(points), dtype=np.int64)
    for start in range(0, len(points), chunk):
        d = ((points[start:start + chunk, None, :] - seeds[None]) ** 2).sum(-1)
        out[start:start + chunk] = d.argmin(1)
    return out


def _background_shape(geometry: DetectorGeometry) -> np.ndarray:
    """A broad bright lobe near the pattern centre falling off to the edges, as on a phosphor."""
    h, w = geometry.pattern_shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = geometry.pc[1] * h + 0.3 * h, geometry.pc[0] * w
    r2 = ((yy - cy) / (0.8 * h)) ** 2 + ((xx - cx) / (0.8 * w)) ** 2
    return (0.35 + 0.65 * np.exp(-r2)).astype(np.float32)

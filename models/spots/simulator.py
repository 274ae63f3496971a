"""A simulated 4D-STEM precession scan of a polycrystal: the modality's demo and publish source.

Grains are Voronoi cells, each with a random orientation (uniform on SO(3)), one of the
phases at random and its own excitation-error width (thickness); a disc of the scan is
amorphous (no spots, a strong diffuse ring: truth phase -1). Each grain's kinematical spots
(diffraction.py, the geometry diffsims uses) are computed once; every scan point then gets
its own spot-intensity variation, beam-centre drift (a slow ramp over the scan plus jitter),
the direct beam, a diffuse amorphous ring, Gaussian blur of each spot and Poisson noise, as
uint16 counts. Truth (orientation, phase, beam centre) goes to ``truth``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .diffraction import lab_vectors, reflections, rotation_matrices, scan_frame, spot_intensities, wavelength


@dataclass(frozen=True)
class SpotNoise:
    """Counts at the brightest spot (None: no shot noise), spot blur (pixels), the spread of
    spot intensities between scan points (log-normal sigma) and the beam-centre jitter (pixels)."""

    peak_counts: float | None
    blur: float
    intensity_spread: float
    jitter: float


NOISE_LEVELS = {
    "clean": SpotNoise(None, 1.0, 0.0, 0.0),
    "moderate": SpotNoise(60.0, 1.2, 0.25, 0.3),
    "hard": SpotNoise(20.0, 1.5, 0.4, 0.5),
}
DIRECT_BEAM_COUNTS = 8.0  # the direct beam over the brightest spot
STAMP = 4  # a spot is drawn on a (2 * STAMP + 1)^2 window
AMORPHOUS_G = 0.45  # 1/angstrom: the amorphous ring's radius (Fe-based metallic glass ~ 0.45)


def uniform_quaternions(rng, n: int) -> np.ndarray:
    """(n, 4) rotations uniform on SO(3), w >= 0."""
    q = rng.standard_normal((n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q * np.where(q[:, :1] < 0, -1.0, 1.0)


class SpotPatternRenderer:
    """Renders spot patterns of given orientations and phases for one setup (the simulator's
    and the tests' and benchmarks' engine)."""

    def __init__(self, phases, setup: dict, pattern_shape=(128, 128)):
        self.phases = list(phases)
        self.setup = dict(setup)
        self.pattern_shape = tuple(int(n) for n in pattern_shape)
        h, w = self.pattern_shape
        self.g_max = 0.5 * min(h, w) * self.setup["calibration"] * 1.05
        self.wavelength = wavelength(self.setup["kv"])

    def spots(self, phase: int, quaternions: np.ndarray, excitation_width) -> tuple[np.ndarray, np.ndarray]:
        """(M, 4) orientations of one phase -> lab (x, y) in 1/angstrom (M, G, 2), intensity (M, G)."""
        refl = reflections(self.phases[phase], self.g_max)
        lab = lab_vectors(rotation_matrices(quaternions), refl.g)
        width = np.asarray(excitation_width, float).reshape(-1, 1) if np.ndim(excitation_width) else excitation_width
        intensity = spot_intensities(lab, refl.f2, wavelength_a=self.wavelength, precession_deg=self.setup["precession"],
                                     excitation_width=width)
        return lab[..., :2], intensity

    def render(self, xy: np.ndarray, intensity: np.ndarray, centers: np.ndarray, noise: SpotNoise, rng,
               amorphous: np.ndarray | None = None, beam: np.ndarray | None = None) -> np.ndarray:
        """(B, G, 2) spot positions (1/angstrom), (B, G) intensities (0: absent), (B, 2) beam
        centres (x, y) -> (B, H, W) uint16 frames; ``beam``: (B,) direct-beam strength (default 1)."""
        h, w = self.pattern_shape
        b = len(xy)
        cal = self.setup["calibration"]
        ratio, angle = self.setup["ellipticity"]
        px = xy / cal
        if ratio != 1.0:  # stretch along the ellipse's axis
            c, s = np.cos(np.deg2rad(angle)), np.sin(np.deg2rad(angle))
            along = px[..., 0] * c + px[..., 1] * s
            px = px + (ratio - 1.0) * along[..., None] * np.array([c, s])
        top = np.maximum(intensity.max(axis=1, keepdims=True), 1e-12)
        amp = intensity / top
        if noise.intensity_spread:
            amp = amp * rng.lognormal(0.0, noise.intensity_spread, amp.shape)
        pos = px + centers[:, None, :]
        frames = np.zeros((b, h, w), np.float64)
        keep = (amp > 1e-3) & (np.abs(px[..., 0]) < w) & (np.abs(px[..., 1]) < h)
        bi, gi = np.nonzero(keep)
        _stamp(frames, bi, pos[bi, gi], amp[bi, gi], noise.blur)
        # The direct beam, broader and far brighter than any spot.
        strength = np.ones(b) if beam is None else np.asarray(beam, float)
        _stamp(frames, np.arange(b), centers, DIRECT_BEAM_COUNTS * strength, 2.0)
        yy, xx = np.mgrid[0:h, 0:w]
        r = np.hypot(xx[None] - centers[:, 0, None, None], yy[None] - centers[:, 1, None, None]) * cal
        ring = np.exp(-0.5 * ((r - AMORPHOUS_G) / 0.08) ** 2)
        level = np.full(b, 0.02) if amorphous is None else np.where(amorphous, 0.25, 0.02)
        frames += level[:, None, None] * ring + 0.01
        if noise.peak_counts is None:
            return np.clip(frames * 1000.0, 0, 65535).astype(np.uint16)
        return np.clip(rng.poisson(frames * noise.peak_counts), 0, 65535).astype(np.uint16)


def _stamp(frames: np.ndarray, frame_index: np.ndarray, pos: np.ndarray, amp: np.ndarray, sigma: float) -> None:
    """Add Gaussian spots (peak ``amp``) at subpixel (x, y) ``pos`` into ``frames`` (B, H, W), in place."""
    b, h, w = frames.shape
    if not len(pos):
        return
    offsets = np.arange(-STAMP, STAMP + 1)
    x0 = np.rint(pos[:, 0]).astype(int)
    y0 = np.rint(pos[:, 1]).astype(int)
    xs = x0[:, None, None] + offsets[None, None, :]
    ys = y0[:, None, None] + offsets[None, :, None]
    value = amp[:, None, None] * np.exp(-((xs - pos[:, 0, None, None]) ** 2 + (ys - pos[:, 1, None, None]) ** 2)
                                        / (2 * sigma**2))
    inside = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
    flat = (frame_index[:, None, None] * h + ys) * w + xs
    frames.reshape(-1)[:] += np.bincount(flat[inside], value[inside], minlength=b * h * w)


class SimulatedSpotScan:
    """A (ny, nx) scan of spot patterns rendered page by page (frames depend only on the seed
    and the first index, so a page can be read again)."""

    def __init__(self, nav_shape, phases, setup: dict, *, pattern_shape=(128, 128), noise: str = "moderate",
                 grain_size: float = 6.0, seed: int = 0, drift: float = 2.0):
        if noise not in NOISE_LEVELS:
            raise ValueError(f"noise level {noise!r} unknown; use one of {sorted(NOISE_LEVELS)}")
        self.nav_shape = tuple(int(n) for n in nav_shape)
        self.renderer = SpotPatternRenderer(phases, setup, pattern_shape)
        self.noise = NOISE_LEVELS[noise]
        self.seed = seed
        rng = np.random.default_rng(seed)
        ny, nx = self.nav_shape
        n = ny * nx
        n_grains = max(1, round(n / grain_size**2))
        seeds = rng.uniform((0, 0), (ny, nx), size=(n_grains, 2))
        yy, xx = np.mgrid[0:ny, 0:nx]
        points = np.stack([yy.ravel(), xx.ravel()], axis=1).astype(float)
        self.grain_of_point = ((points[:, None, :] - seeds[None]) ** 2).sum(-1).argmin(1)
        self.grain_q = uniform_quaternions(rng, n_grains)  # the scan's (sample's) frame: the truth
        # What the detector sees: the grains turned back by the scan rotation (diffraction.scan_frame).
        self.grain_q_image = scan_frame(self.grain_q, -float(setup.get("scan_rotation") or 0.0))
        self.grain_phase = rng.integers(0, len(phases), n_grains)
        self.grain_width = rng.uniform(0.015, 0.03, n_grains)  # 1/angstrom: thicker and thinner grains
        # The amorphous disc: about a tenth of the scan, away from nothing in particular.
        centre = rng.uniform((0, 0), (ny, nx))
        radius = 0.18 * min(ny, nx) + 0.5
        self.amorphous = ((points - centre) ** 2).sum(1) <= radius**2 if n >= 16 else np.zeros(n, bool)
        h, w = self.renderer.pattern_shape
        base = np.array(setup.get("center") or [w / 2, h / 2], float)
        ramp = np.stack([xx.ravel() / max(nx - 1, 1), yy.ravel() / max(ny - 1, 1)], 1) - 0.5
        self.centers = base + drift * ramp  # slow drift of the direct beam over the scan
        self.truth_q = self.grain_q[self.grain_of_point].astype(np.float32)
        self.truth_phase = np.where(self.amorphous, -1, self.grain_phase[self.grain_of_point]).astype(np.int16)
        self.truth_q[self.amorphous] = (1.0, 0.0, 0.0, 0.0)
        self._grain_spots = {}

    @property
    def size(self) -> int:
        return int(np.prod(self.nav_shape))

    def _spots_of_grains(self, grains: np.ndarray):
        for g in np.unique(grains):
            if g not in self._grain_spots:
                xy, inten = self.renderer.spots(int(self.grain_phase[g]), self.grain_q_image[g:g + 1],
                                                self.grain_width[g])
                self._grain_spots[g] = (xy[0], inten[0])
        width = max(len(self._grain_spots[g][1]) for g in np.unique(grains))
        xy = np.zeros((len(grains), width, 2))
        inten = np.zeros((len(grains), width))
        for i, g in enumerate(grains):
            a, b = self._grain_spots[g]
            xy[i, :len(b)] = a
            inten[i, :len(b)] = b
        return xy, inten

    def render(self, first: int, count: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, first))
        sl = slice(first, first + count)
        xy, inten = self._spots_of_grains(self.grain_of_point[sl])
        amorphous = self.amorphous[sl]
        inten[amorphous] = 0.0
        centers = self.centers[sl] + rng.normal(0.0, self.noise.jitter, (len(inten), 2)) if self.noise.jitter \
            else self.centers[sl]
        # The direct beam dims with thickness (narrower rel-rods): the virtual bright field shows
        # the grains; the amorphous film is thin.
        width = self.grain_width[self.grain_of_point[sl]]
        beam = np.where(amorphous, 1.2, 0.5 + (width - 0.015) / 0.015 * 0.6)
        return self.renderer.render(xy, inten, centers, self.noise, rng, amorphous=amorphous, beam=beam)

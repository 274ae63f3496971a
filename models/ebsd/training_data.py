"""Simulated training and validation data for the phase/orientation network.

Patterns are rendered from master patterns with kikuchipy's ``EBSDMasterPattern.get_patterns``
(the renderer the dictionary and the simulated detector use, so the truth quaternions are in
the same orix convention), then corrupted as a camera would (background shape, contrast,
Poisson noise, saturation, hot pixels) and preprocessed by ``stream.preprocess.Preprocessor``,
so the network sees exactly what a worker gives it: 60x60 camera frames (FRAME_SHAPE) binned to
the worker's working size, (B, 900) float32, zero-mean, unit-norm.

Rendering is the slow part, so clean patterns are rendered once (uint8, min-max scaled) and
each training epoch draws fresh backgrounds and noise for them.

No torch here: evaluation uses this module beside ONNX Runtime.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from liveindex.models.ebsd.geometry import DEFAULT_PC, DetectorGeometry
from liveindex.models.ebsd.preprocess import Preprocessor
from liveindex.models.ebsd.simulator import NOISE_LEVELS, _background_shape

log = logging.getLogger(__name__)

FRAME_SHAPE = (60, 60)  # camera frames, as the simulated detector and kikuchipy's Ni scan
WORKING_SHAPE = Preprocessor.for_shape(FRAME_SHAPE).working_shape  # what workers match at: 30x30
# (phase, master pattern kind, share of the training set). Ni is rendered from both its
# dynamical (EMsoft) and a kinematical master pattern so that "kinematical look" cannot be
# what tells Ni from Fe or Ni3Al, whose master patterns are kinematical only.
TRAIN_SOURCES = (("ni", "dynamical", 0.25), ("ni", "kinematical", 0.2), ("fe", "kinematical", 0.25),
                 ("ni3al", "kinematical", 0.3))
PHASES = ("ni", "fe", "ni3al")
RENDER_CHUNK = 64  # patterns sharing one geometry (kikuchipy's fixed-PC path is ~10x faster)


@dataclass(frozen=True)
class GeometryRange:
    """Detector geometries the network is trained on: jitter around one nominal geometry.

    The network is not told the PC: a PC shift moves the pattern as an orientation change
    would, so the PC range bounds the orientation error (0.015 of the width is about 1 deg),
    and a scan far outside it needs its own bundle. Refinement, which is told the PC, takes
    the error out.
    """

    pc_centre: tuple[float, float, float] = DEFAULT_PC
    pc_jitter: float = 0.015
    sample_tilt: tuple[float, float] = (69.0, 71.0)
    detector_tilt: tuple[float, float] = (-1.0, 1.0)
    working_shape: tuple[int, int] = WORKING_SHAPE
    energy_kv: float = 20.0

    def describe(self) -> str:
        return (f"PC {self.pc_centre[0]:.3f}, {self.pc_centre[1]:.3f}, {self.pc_centre[2]:.3f} "
                f"+-{self.pc_jitter:g}, sample tilt {self.sample_tilt[0]:g}-{self.sample_tilt[1]:g}, detector tilt "
                f"{self.detector_tilt[0]:g}-{self.detector_tilt[1]:g}, {self.energy_kv:g} kV, working size "
                f"{self.working_shape[0]}x{self.working_shape[1]}")

    def contains(self, geometry: DetectorGeometry) -> bool:
        working = Preprocessor.for_shape(geometry.pattern_shape).working_shape
        pc_ok = all(abs(v - c) <= self.pc_jitter + 1e-9 for v, c in zip(geometry.pc, self.pc_centre))
        return (tuple(working) == tuple(self.working_shape) and pc_ok
                and self.sample_tilt[0] <= geometry.sample_tilt <= self.sample_tilt[1]
                and self.detector_tilt[0] <= geometry.tilt <= self.detector_tilt[1]
                and abs(geometry.energy_kv - self.energy_kv) < 1e-6)

    def sample(self, rng: np.random.Generator, *, pattern_shape=FRAME_SHAPE) -> DetectorGeometry:
        pc = np.asarray(self.pc_centre) + rng.uniform(-self.pc_jitter, self.pc_jitter, 3)
        return DetectorGeometry(pattern_shape=pattern_shape, pc=tuple(pc), sample_tilt=rng.uniform(*self.sample_tilt),
                                tilt=rng.uniform(*self.detector_tilt), energy_kv=self.energy_kv)

    def to_json(self) -> dict:
        d = asdict(self)
        d["pc_low"] = [round(c - self.pc_jitter, 4) for c in self.pc_centre]
        d["pc_high"] = [round(c + self.pc_jitter, 4) for c in self.pc_centre]
        d["pc_convention"] = "bruker"
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    @classmethod
    def from_json(cls, d: dict) -> "GeometryRange":
        return cls(pc_centre=tuple(d["pc_centre"]), pc_jitter=d["pc_jitter"], sample_tilt=tuple(d["sample_tilt"]),
                   detector_tilt=tuple(d["detector_tilt"]), working_shape=tuple(d["working_shape"]),
                   energy_kv=d["energy_kv"])


@dataclass(frozen=True)
class Variation:
    """Camera-side variation drawn afresh for every pattern of every epoch."""

    contrast: tuple[float, float] = (0.2, 0.6)  # band contrast over the background
    counts: tuple[float, float] = (15.0, 600.0)  # electrons per unit intensity, log-uniform
    noiseless_fraction: float = 0.1
    binned_fraction: float = 0.25  # rendered at 120 px and binned 2x2, as a binned detector
    hot_pixel_fraction: float = 0.2  # patterns with 1-6 saturated pixels
    background_jitter: float = 0.25  # lobe centre moves by up to this fraction of the side

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


@dataclass
class CleanSet:
    """Rendered, noise-free patterns with their truth."""

    images: np.ndarray  # (N, 60, 60) uint8 (FRAME_SHAPE), min-max scaled
    phase: np.ndarray  # (N,) int64 index into PHASES
    source: np.ndarray  # (N,) int64 index into the sources used
    rotations: np.ndarray  # (N, 4) float32 unit quaternions, orix convention, truth
    pcs: np.ndarray  # (N, 3)
    sources: tuple = field(default=TRAIN_SOURCES)

    def __len__(self):
        return len(self.phase)


def random_rotations(rng: np.random.Generator, n: int) -> np.ndarray:
    """Uniform on SO(3) (normalised 4D Gaussians), as the simulated detector draws them."""
    q = rng.standard_normal((n, 4))
    q *= np.sign(q[:, :1]) / np.linalg.norm(q, axis=1, keepdims=True)
    return q.astype(np.float32)


def render_clean(n: int, *, seed: int, sources=TRAIN_SOURCES, geometry_range: GeometryRange = GeometryRange(),
                 variation: Variation = Variation(), progress: bool = False) -> CleanSet:
    """Render ``n`` noise-free patterns, sources in the given shares, geometry jittered."""
    import dask
    from orix.quaternion import Rotation

    from .master_patterns import master_pattern

    rng = np.random.default_rng(seed)
    shares = np.array([s[2] for s in sources], float)
    n_chunks = int(np.ceil(n / RENDER_CHUNK))
    chunk_source = rng.choice(len(sources), size=n_chunks, p=shares / shares.sum())
    images = np.empty((n_chunks * RENDER_CHUNK, *FRAME_SHAPE), np.uint8)
    rotations = random_rotations(rng, len(images))
    source = np.repeat(chunk_source, RENDER_CHUNK)
    pcs = np.empty((len(images), 3), np.float32)
    t0 = time.perf_counter()
    # One core: dask's threaded scheduler would take every core of a shared machine.
    with dask.config.set(scheduler="synchronous"):
        for c in range(n_chunks):
            name, kind, _ = sources[chunk_source[c]]
            binned = rng.random() < variation.binned_fraction
            shape = (2 * FRAME_SHAPE[0], 2 * FRAME_SHAPE[1]) if binned else FRAME_SHAPE
            geometry = geometry_range.sample(rng, pattern_shape=shape)
            sl = slice(c * RENDER_CHUNK, (c + 1) * RENDER_CHUNK)
            sim = master_pattern(name, kind).get_patterns(
                Rotation(rotations[sl]), geometry.kikuchipy_detector(), energy=geometry.energy_kv, compute=True,
                dtype_out=np.float32, show_progressbar=False)
            p = np.asarray(sim.data, np.float32).reshape(-1, *shape)
            if binned:
                p = p.reshape(len(p), FRAME_SHAPE[0], 2, FRAME_SHAPE[1], 2).mean(axis=(2, 4))
            lo = p.min(axis=(1, 2), keepdims=True)
            hi = p.max(axis=(1, 2), keepdims=True)
            images[sl] = np.round(255 * (p - lo) / np.maximum(hi - lo, 1e-6))
            pcs[sl] = geometry.pc
            if progress and c % 200 == 0:
                log.info("rendered %d / %d patterns (%.0f s)", c * RENDER_CHUNK, len(images), time.perf_counter() - t0)
    phase_of_source = np.array([PHASES.index(s[0]) for s in sources])
    keep = slice(0, n)
    return CleanSet(images[keep], phase_of_source[source][keep], source[keep], rotations[keep], pcs[keep], tuple(sources))


def random_background(rng: np.random.Generator, n: int, jitter: float) -> np.ndarray:
    """Smooth backgrounds: a bright lobe (moved, stretched) over a floor, plus a linear ramp."""
    h, w = FRAME_SHAPE
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy, xx = yy[None] / h, xx[None] / w
    cy = (DEFAULT_PC[1] + 0.3 + rng.uniform(-jitter, jitter, n))[:, None, None]
    cx = (DEFAULT_PC[0] + rng.uniform(-jitter, jitter, n))[:, None, None]
    sy = rng.uniform(0.5, 1.2, n)[:, None, None]
    sx = rng.uniform(0.5, 1.2, n)[:, None, None]
    floor = rng.uniform(0.15, 0.5, n)[:, None, None]
    lobe = np.exp(-(((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2))
    ramp = rng.uniform(-0.2, 0.2, (n, 1, 1)) * (yy - 0.5) + rng.uniform(-0.2, 0.2, (n, 1, 1)) * (xx - 0.5)
    return np.clip(floor + (1 - floor) * lobe + ramp, 0.05, None).astype(np.float32)


def corrupt(clean: np.ndarray, rng: np.random.Generator, variation: Variation = Variation()) -> np.ndarray:
    """Clean uint8 patterns -> 8-bit camera frames with random background, contrast, noise, hot pixels."""
    n = len(clean)
    x = clean.astype(np.float32) / 255.0
    contrast = rng.uniform(*variation.contrast, (n, 1, 1)).astype(np.float32)
    # A bank of 512 backgrounds per call, drawn from: measured 3x cheaper than one each.
    bank = random_background(rng, min(n, 512), variation.background_jitter)
    signal = bank[rng.integers(0, len(bank), n)] * (1.0 - contrast + contrast * x)
    counts = np.exp(rng.uniform(*np.log(variation.counts), (n, 1, 1))).astype(np.float32)
    # Gaussian approximation of Poisson shot noise: measured 6x faster than rng.poisson for
    # 60x60 frames, and epochs redraw the noise of every pattern. Validation frames use
    # true Poisson noise (camera_frames), so any mismatch shows in the figures.
    noise = rng.standard_normal(signal.shape, dtype=np.float32)
    noisy = signal + np.sqrt(signal / counts) * noise
    keep_clean = rng.random(n) < variation.noiseless_fraction
    noisy[keep_clean] = signal[keep_clean]
    frames = np.clip(noisy * rng.uniform(150, 250, (n, 1, 1)), 0, 255)
    hot = np.flatnonzero(rng.random(n) < variation.hot_pixel_fraction)
    for i in hot:
        k = rng.integers(1, 7)
        frames[i, rng.integers(0, FRAME_SHAPE[0], k), rng.integers(0, FRAME_SHAPE[1], k)] = 255
    return frames.astype(np.uint8)


def camera_frames(clean: np.ndarray, rng: np.random.Generator, noise: str) -> np.ndarray:
    """Frames as the simulated detector (stream/simulator.py) makes them at a named noise level."""
    level = NOISE_LEVELS[noise]
    background = _background_shape(DetectorGeometry())
    signal = background * (1.0 - level.contrast + level.contrast * clean.astype(np.float32) / 255.0)
    if level.counts is not None:
        signal = rng.poisson(signal * level.counts).astype(np.float32) / level.counts
    return np.clip(signal * 200.0, 0, 255).astype(np.uint8)


_PREPROCESSOR = Preprocessor.for_shape(FRAME_SHAPE)


def preprocess(frames: np.ndarray) -> np.ndarray:
    """The worker's preprocessing: (N, 60, 60) frames -> (N, 900) float32."""
    out = np.empty((len(frames), _PREPROCESSOR.n_pixels), np.float32)
    for start in range(0, len(frames), 4096):
        out[start:start + 4096], _ = _PREPROCESSOR(frames[start:start + 4096])
    return out

"""Spot patterns' features for the latent maps: in-plane-rotation-invariant polar features.

A grain's spot pattern turns about the beam when the grain (or the scan) turns about it, and
two grains of one phase differ in which reciprocal-lattice rows the Ewald sphere cuts: at
which radii the spots sit and at which angles to each other. So each frame is

1. divided by its own mean (the beam current) and square-rooted: the gamma that tames the
   direct beam and the strongest spots, and makes Poisson noise about even (variance 1/4);
2. sampled on a polar grid about its direct beam (the setup's centre, else the spot
   indexer's ``find_centers``, the same centre the indexer uses; the setup's ellipticity in
   the grid), from ``R_MIN`` (outside the direct beam) to ``R_MAX`` of the half-width;
3. Fourier-transformed along the angle at every radius; kept are the magnitudes of the even
   harmonics 0, 2, ..., 2(``HARMONICS`` - 1) (kinematical patterns are centrosymmetric: the
   odd ones are noise), averaged over each of ``BANDS`` bands of radii.

A turn of the pattern about its centre shifts the polar image along the angle, which changes
only the phases of the angular Fourier coefficients: the magnitudes stay put (up to the
interpolation of the grid; tests/models/spots/test_latent.py measures it). Harmonic 0 is the
radial profile (an amorphous ring shows there). What is lost is the angle between spots of
different bands, and mirror images look alike (not measured: grains that differ only so
fall into one cluster).

Per frame, with nothing learned from other frames, so every worker computes the same
features for the same frame; the scan's basis (models/latent/basis.py) comes with the
scan_start as EBSD's does.
"""

from __future__ import annotations

import logging

import numpy as np

from liveindex.models.latent.basis import FIT_TILES, TILE, LatentBasis, fit_basis, tile_starts

log = logging.getLogger(__name__)

# Embedding width: 24, not EBSD's 16. Measured on 50x50 scans of about 25 grains and an
# amorphous disc (benchmarks/latent.py --part d, seeds 1, 2, 3, an earlier version of these
# features): cluster map ARI 0.875 / 0.956 / 0.997 at 16 dims, 0.936 / 0.968 / 0.997 at 24,
# 0.949 / 0.968 / 0.997 at 32: at 16, grains of one phase with few spots merged. With these
# features, 32 against 24: seed 1 0.944 against 0.859, seed 4 0.756 against 0.777 (no clear gain).
DIMS = 24

BANDS = 16  # radius bands (rows of the feature image)
RADII_PER_BAND = 2  # polar radii sampled in a band (1.7 px apart on a 128 px pattern; spots are about 3 px wide)
HARMONICS = 8  # even angular harmonics 0, 2, ..., 14 (columns of the feature image)
ANGLES = 128  # polar samples a circle: 2.8 px apart at R_MAX of a 128 px pattern, about a spot's FWHM
R_MIN = 0.05  # of the pattern's smaller side: outside the direct beam (6.4 px on 128 px)
SUBPIXEL = 8  # the centre is placed to 1/8 px on the precomputed grids (1/4: a turn moved them 2x more)
R_MAX = 0.45  # of the smaller side: inside the frame with a few pixels of centre drift


def feature_shape(pattern_shape=None) -> tuple[int, int]:
    return BANDS, HARMONICS


class SpotFeatures:
    """The polar grid of one pattern shape and setup; ``__call__(frames)`` -> (B, P) features."""

    def __init__(self, setup: dict, pattern_shape):
        self.pattern_shape = h, w = tuple(int(v) for v in pattern_shape)
        self.center = setup.get("center")
        side = min(h, w)
        radii = np.linspace(R_MIN * side, R_MAX * side, BANDS * RADII_PER_BAND)
        theta = np.arange(ANGLES) * (2 * np.pi / ANGLES)
        dx = radii[:, None] * np.cos(theta)[None]
        dy = radii[:, None] * np.sin(theta)[None]
        ratio, angle = setup.get("ellipticity") or (1.0, 0.0)
        if ratio != 1.0:  # where the projector put a point of the undistorted pattern (as the simulator stretches)
            c, s = np.cos(np.deg2rad(angle)), np.sin(np.deg2rad(angle))
            along = (ratio - 1.0) * (dx * c + dy * s)
            dx, dy = dx + along * c, dy + along * s
        # The bilinear corners and weights of every sample for each of SUBPIXEL^2 sub-pixel
        # positions of the centre, made once: a page then adds one integer offset a frame
        # (measured: 0.6 ms a frame with them computed per frame, 0.25-0.3 ms so, before the
        # square root moved ahead of the interpolation).
        # The centre is placed to 1/SUBPIXEL px: 1/16 px at most off, far inside the jitter.
        # Samples are read in the order they lie in memory and put back in (radius, angle)
        # order after (fewer cache misses than in polar order).
        dx, dy = dx.ravel(), dy.ravel()
        self.order = np.argsort(np.floor(dy) * w + np.floor(dx), kind="stable")
        dx, dy = dx[self.order], dy[self.order]
        self.reach = int(np.ceil(max(np.abs(dx).max(), np.abs(dy).max()))) + 2
        sub = np.arange(SUBPIXEL) / SUBPIXEL
        x = sub[None, :, None] + dx[None, None, :]  # (1, Q, n): the centre's x fraction
        y = sub[:, None, None] + dy[None, None, :]  # (Q, 1, n): its y fraction (index y * Q + x)
        x0, y0 = np.floor(x), np.floor(y)
        fx, fy = np.broadcast_arrays((x - x0), (y - y0))
        self.offset = (y0 * w + x0).reshape(SUBPIXEL * SUBPIXEL, -1).astype(np.intp)
        fx, fy = fx.reshape(SUBPIXEL * SUBPIXEL, -1), fy.reshape(SUBPIXEL * SUBPIXEL, -1)
        self.weights = np.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], 1).astype(np.float32)
        self.harmonics = np.arange(HARMONICS) * 2

    def centers(self, frames: np.ndarray) -> np.ndarray:
        if self.center is not None:
            return np.tile(np.asarray(self.center, np.float64), (len(frames), 1))
        from .indexer import find_centers

        return find_centers(frames.astype(np.float32, copy=False))

    def __call__(self, frames: np.ndarray, centers: np.ndarray | None = None) -> np.ndarray:
        """(B, H, W) raw frames -> (B, BANDS * HARMONICS) float32; NaN rows for frames without counts."""
        frames = np.asarray(frames)
        b, h, w = frames.shape
        centers = self.centers(frames) if centers is None else np.asarray(centers, np.float64)
        # The frame's own centre, held where the grid stays inside the frame (a centre that far
        # out gives no useful features anyway), split into a pixel and a sub-pixel part.
        cx = np.clip(centers[:, 0], self.reach, w - 1 - self.reach)
        cy = np.clip(centers[:, 1], self.reach, h - 1 - self.reach)
        qx, qy = np.rint(cx * SUBPIXEL).astype(np.intp), np.rint(cy * SUBPIXEL).astype(np.intp)
        sub = (qy % SUBPIXEL) * SUBPIXEL + qx % SUBPIXEL
        base = (qy // SUBPIXEL) * w + qx // SUBPIXEL + np.arange(b, dtype=np.intp) * (h * w)
        level = frames.reshape(b, -1).mean(axis=1, dtype=np.float64).astype(np.float32)[:, None]
        # The gamma on every pixel, then the interpolation: measured, the square root of the
        # interpolated counts instead made the cluster map's ARI 0.882 against 0.968 (seed 2 of
        # benchmarks/latent.py --part d), for about 70 us a frame less.
        with np.errstate(invalid="ignore", divide="ignore"):  # NaN where a frame has no counts
            flat = np.sqrt(np.maximum(frames.reshape(b, -1).astype(np.float32), 0) / level).reshape(-1)
        samples = np.empty((b, self.offset.shape[1]), np.float32)
        for k in np.unique(sub):  # frames with the same sub-pixel centre share corners and weights
            rows = np.flatnonzero(sub == k)
            at = base[rows, None] + self.offset[k][None]
            wt = self.weights[k]
            samples[rows] = (flat.take(at) * wt[0] + flat.take(at + 1) * wt[1] + flat.take(at + w) * wt[2]
                             + flat.take(at + w + 1) * wt[3])
        polar = np.empty_like(samples)
        polar[:, self.order] = samples
        spectrum = np.abs(np.fft.rfft(polar.reshape(b, -1, ANGLES), axis=2)[:, :, self.harmonics]) / ANGLES
        out = spectrum.reshape(b, BANDS, RADII_PER_BAND, HARMONICS).mean(axis=2).reshape(b, -1)
        out[~np.isfinite(out).all(axis=1)] = np.nan
        return out.astype(np.float32)


def read_tiles_and_noise(read, nav_shape, features, count: int = FIT_TILES) -> tuple[np.ndarray, np.ndarray]:
    """(T, P) mean features of ``count`` 3x3 tiles (as basis.read_tiles) and (P,) each feature's
    point-to-point spread: the median over the tiles of its standard deviation inside a tile
    (the median: tiles across a boundary spread more)."""
    ny, nx = (int(v) for v in nav_shape)
    h, w = min(TILE, ny), min(TILE, nx)
    means, spreads = [], []
    for y, x in tile_starts(nav_shape, count):
        tile = np.concatenate([features(read(int((y + dy) * nx + x), w)) for dy in range(h)])
        means.append(tile.mean(axis=0))
        spreads.append(tile.std(axis=0))
    return np.stack(means).astype(np.float32), np.median(np.stack(spreads), axis=0).astype(np.float32)


def fit_scan_basis(source, dims: int = DIMS, tiles: int = FIT_TILES) -> LatentBasis:
    """The scan's basis from 3x3 tiles spread over it (models/latent/basis.py), on features
    divided by their point-to-point spread. basis.py scales features as Poisson counts
    (1/sqrt(mean)); these are magnitudes of Fourier coefficients of square-rooted counts,
    whose noise is about even, so the high harmonics at the outer radii (mostly noise, small
    means) would be weighted up and the radial profile down."""
    features = SpotFeatures(source.setup, source.pattern_shape)
    means, spread = read_tiles_and_noise(source.read, source.nav_shape, features, tiles)
    spread = np.maximum(spread, 0.05 * float(np.median(spread)) + 1e-12)
    centre = means.mean(axis=0)
    # Whitened tiles with mean exactly 1, so that basis.py's 1/sqrt(mean) scale is 1 on them.
    fitted = fit_basis((means - centre) / spread + 1.0, feature_shape(), dims)
    return LatentBasis(centre + spread * (fitted.mean - 1.0), (fitted.scale / spread).astype(np.float32),
                       fitted.components, fitted.feature_shape)


def embed(basis, features: SpotFeatures, frames: np.ndarray,
          centers: np.ndarray | None = None) -> np.ndarray:
    """(B, D) float16 embeddings of raw frames in the scan's basis or encoder (LatentBasis or
    LatentEncoder); NaN where there is none (latent off, or a scan_start without one) or a
    frame has no counts."""
    if basis is None or basis.dims != DIMS or basis.n_features != BANDS * HARMONICS:
        return np.full((len(frames), DIMS), np.nan, np.float16)  # the declared width only
    return basis.embed(features(frames, centers))

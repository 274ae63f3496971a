"""Pattern preprocessing shared by live frames and the simulated dictionary.

Both sides go through the same function so that normalised cross-correlation compares
like with like: bin to the working size, remove the smooth background (dynamic background
subtraction), then make every pattern zero-mean and unit-norm.
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass, replace

import numpy as np
from scipy.ndimage import gaussian_filter, gaussian_filter1d, zoom

from liveindex.models.arrays import bin_frames

# Patterns are binned so that their longer side is at most this: 60x60 frames are matched
# and refined at 30x30. The refinement brings the accuracy (0.05 deg on clean frames),
# so the match only has to land in the right basin, which 30x30 does as well as 60x60 at
# a quarter of the cost (docs/research/refine-spike/NOTE.md); the 3 deg dictionary of
# m-3m (30k templates) takes 110 MB.
MAX_WORKING_SIDE = 32


def blur_matrix(n: int, sigma: float) -> np.ndarray:
    """scipy's ``gaussian_filter1d(truncate=2, mode='reflect')`` along one axis, as an (n, n)
    matrix M (M @ x blurs x): the live frames' background blur, and the refinement graph's
    (models/refinement.py), are these products."""
    return gaussian_filter1d(np.eye(n), sigma, axis=0, truncate=2.0).astype(np.float32)


@dataclass(frozen=True, eq=False)
class Preprocessor:
    input_shape: tuple[int, int]
    working_shape: tuple[int, int]
    # Background blur in working pixels; 1/8 of the width as kikuchipy's default.
    sigma: float
    # Signal mask at the working size (True: the pixel carries pattern), or None: every pixel.
    mask: np.ndarray | None = None

    @classmethod
    def for_shape(cls, input_shape, max_side: int = MAX_WORKING_SIDE, *,
                  signal_mask: np.ndarray | None = None) -> "Preprocessor":
        """The worker's preprocessing for frames of ``input_shape``; ``signal_mask`` is a
        frame-size boolean array (True: signal), binned so that a working pixel counts only
        where all its frame pixels do."""
        h, w = (int(n) for n in input_shape)
        factor = max(1, math.ceil(max(h, w) / max_side))
        working = (max(2, round(h / factor)), max(2, round(w / factor)))
        plain = cls((h, w), working, sigma=working[1] / 8)
        if signal_mask is None:
            return plain
        mask = np.asarray(signal_mask)
        if mask.shape != (h, w):
            raise ValueError(f"the signal mask is {mask.shape[0]}x{mask.shape[1]} but the patterns are {h}x{w}; "
                             "make it at the detector's binning")
        binned = plain._to_working(mask[None].astype(np.float32))[0] > 0.999
        if binned.sum() < 0.1 * binned.size:
            raise ValueError(f"the signal mask keeps {int(binned.sum())} of {binned.size} working pixels; "
                             "True marks the pixels that carry the pattern")
        return replace(plain, mask=binned)

    @property
    def n_pixels(self) -> int:
        return self.working_shape[0] * self.working_shape[1]

    def __call__(self, patterns: np.ndarray, background: "StaticBackground | None" = None) -> tuple[np.ndarray, np.ndarray]:
        """(B, H, W) patterns of any dtype -> ((B, P) float32 zero-mean unit-norm, valid mask).

        With ``background``, the scan's static background is subtracted first. A pattern
        with a NaN or inf, or with no contrast at all, is not valid: its row is zero, so it
        matches nothing, and the caller reports it as not indexed.
        """
        x = self._to_working(patterns)
        finite = np.isfinite(x).all(axis=(1, 2))
        if not finite.all():
            x[~finite] = 0.0
        if background is not None:
            x -= background.update(x, finite)
        if self.mask is None:
            x -= self._blur(x)
            flat = x.reshape(len(x), -1)
            flat -= flat.mean(axis=1, keepdims=True)
        else:
            # Normalised convolution: the background under the mask from masked pixels only,
            # so the dark (or bright) outside never bleeds into it; outside pixels end at 0.
            m = self.mask.astype(np.float32)
            x *= m
            x -= self._blur(x) / self._mask_blur
            x *= m
            flat = x.reshape(len(x), -1)
            flat -= (flat.sum(axis=1, keepdims=True) / m.sum()) * m.reshape(1, -1)
        norm = np.linalg.norm(flat, axis=1, keepdims=True)
        valid = finite & (norm[:, 0] > 1e-6)
        np.divide(flat, norm, out=flat, where=norm > 1e-6)
        flat[~valid] = 0.0
        return flat, valid

    def _blur(self, images: np.ndarray) -> np.ndarray:
        """(B, h, w) -> their Gaussian blur (sigma ``self.sigma``, truncated at 2 sigma: as fast
        as 4 and the same matches), as two matrix products: 5x faster than scipy's filter."""
        rows, columns = self._blur_matrices
        return np.matmul(rows, images @ columns.T)

    @functools.cached_property
    def _blur_matrices(self) -> tuple[np.ndarray, np.ndarray]:
        return blur_matrix(self.working_shape[0], self.sigma), blur_matrix(self.working_shape[1], self.sigma)

    @functools.cached_property
    def _mask_blur(self) -> np.ndarray:
        """The mask's own blur, the normaliser of the masked background (once per Preprocessor)."""
        return np.maximum(self._blur(self.mask[None].astype(np.float32))[0], 1e-3)

    def _to_working(self, patterns: np.ndarray) -> np.ndarray:
        if patterns.ndim != 3 or tuple(patterns.shape[1:]) != self.input_shape:
            raise ValueError(f"patterns of shape {patterns.shape} do not match (B, {self.input_shape})")
        h, w = self.input_shape
        wh, ww = self.working_shape
        if (h, w) == (wh, ww):
            return patterns.astype(np.float32, copy=True)
        if h % wh == 0 and w % ww == 0:
            return bin_frames(patterns, h // wh, w // ww)
        # Sizes that do not divide: linear resampling keeps the fractional PC valid.
        return zoom(patterns.astype(np.float32), (1, wh / h, ww / w), order=1)


RUNNING_BACKGROUND_SMOOTHING = 30  # Gaussian sigma = working width / this


class StaticBackground:
    """The static background of one scan: the mean of its frames, at the working size.

    Real detectors add a fixed intensity shape (the phosphor, the beam's spread) that the
    dynamic (blur) background removal leaves partly in place; subtracting the scan's mean
    frame first is the field's standard (kikuchipy's ``remove_static_background``). On real
    Ni patterns at 30x30 it raises the match score from 0.10 to 0.30 and makes 7 of 9 points
    agree with kikuchipy's dictionary indexing instead of 2. Either supplied (a frame
    recorded without a sample, or the mean of an earlier scan) or a running mean of the
    frames seen so far, which converges within the first pages.
    """

    def __init__(self, supplied: "np.ndarray | dict | None" = None):
        # One (h, w) array, or {(h, w): array} for each size the frames are preprocessed at.
        if supplied is None:
            self.supplied = {}
        elif isinstance(supplied, dict):
            self.supplied = {tuple(k): np.asarray(v, np.float32) for k, v in supplied.items()}
        else:
            array = np.asarray(supplied, np.float32)
            self.supplied = {array.shape: array}
        self._sums: dict[tuple, tuple[np.ndarray, int]] = {}  # size -> (sum of its frames, count)
        self._lock = threading.Lock()  # pages of one scan may be indexed on several threads

    def update(self, working: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Fold (B, h, w) frames at one preprocessing size into that size's mean; returns the
        mean (h, w) float32."""
        size = tuple(working.shape[1:])
        if self.supplied:
            if size not in self.supplied:
                shapes = ", ".join(f"{h}x{w}" for h, w in self.supplied)
                raise ValueError(f"the supplied static background is {shapes}; frames here are {size[0]}x{size[1]}: "
                                 "supply it at the detector's binning")
            return self.supplied[size]
        with self._lock:
            if valid.any():
                page_sum = working[valid].sum(axis=0, dtype=np.float64)
                total, count = self._sums.get(size, (0.0, 0))
                self._sums[size] = (total + page_sum, count + int(valid.sum()))
            if size not in self._sums:
                return np.zeros(size, np.float32)
            total, count = self._sums[size]
        # Smoothed by about one working pixel: a scan of few large grains leaves their
        # Kikuchi bands in the mean, and subtracting them sharp hurt (hard noise, 40x40 of
        # ~25 grains: 95.8% within 3 deg, 96.9% with no static background, 97.1% smoothed);
        # smoothing more (2 px) undid the gain on kikuchipy's real Ni scan.
        mean = (total / count).astype(np.float32)
        return gaussian_filter(mean, working.shape[2] / RUNNING_BACKGROUND_SMOOTHING, truncate=2.0)

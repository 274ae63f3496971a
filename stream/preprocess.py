"""Pattern preprocessing shared by live frames and the simulated dictionary.

Both sides go through the same function so that normalised cross-correlation compares
like with like: bin to the working size, remove the smooth background (dynamic background
subtraction), then make every pattern zero-mean and unit-norm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter, zoom

# Patterns are binned so that their longer side is at most this: 60x60 frames are matched
# and refined at 30x30. The refinement brings the accuracy (0.05 deg on clean frames),
# so the match only has to land in the right basin, which 30x30 does as well as 60x60 at
# a quarter of the cost (docs/research/refine-spike/NOTE.md); the 3 deg dictionary of
# m-3m (30k templates) takes 110 MB.
MAX_WORKING_SIDE = 32


@dataclass(frozen=True)
class Preprocessor:
    input_shape: tuple[int, int]
    working_shape: tuple[int, int]
    # Background blur in working pixels; 1/8 of the width as kikuchipy's default.
    sigma: float

    @classmethod
    def for_shape(cls, input_shape, max_side: int = MAX_WORKING_SIDE) -> "Preprocessor":
        h, w = (int(n) for n in input_shape)
        factor = max(1, math.ceil(max(h, w) / max_side))
        working = (max(2, round(h / factor)), max(2, round(w / factor)))
        return cls((h, w), working, sigma=working[1] / 8)

    @property
    def n_pixels(self) -> int:
        return self.working_shape[0] * self.working_shape[1]

    def __call__(self, patterns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, H, W) patterns of any dtype -> ((B, P) float32 zero-mean unit-norm, valid mask).

        A pattern with a NaN or inf, or with no contrast at all, is not valid: its row is
        zero, so it matches nothing, and the caller reports it as not indexed.
        """
        x = self._to_working(patterns)
        finite = np.isfinite(x).all(axis=(1, 2))
        if not finite.all():
            x[~finite] = 0.0
        # truncate=2 measured 1.7x faster than the default 4 with the same matches.
        x -= gaussian_filter(x, (0, self.sigma, self.sigma), truncate=2.0)
        flat = x.reshape(len(x), -1)
        flat -= flat.mean(axis=1, keepdims=True)
        norm = np.linalg.norm(flat, axis=1, keepdims=True)
        valid = finite & (norm[:, 0] > 1e-6)
        np.divide(flat, norm, out=flat, where=norm > 1e-6)
        flat[~valid] = 0.0
        return flat, valid

    def _to_working(self, patterns: np.ndarray) -> np.ndarray:
        if patterns.ndim != 3 or tuple(patterns.shape[1:]) != self.input_shape:
            raise ValueError(f"patterns of shape {patterns.shape} do not match (B, {self.input_shape})")
        h, w = self.input_shape
        wh, ww = self.working_shape
        if (h, w) == (wh, ww):
            return patterns.astype(np.float32, copy=True)
        if h % wh == 0 and w % ww == 0:
            fy, fx = h // wh, w // ww
            x = patterns.reshape(len(patterns), wh, fy, ww, fx).astype(np.float32)
            return x.mean(axis=(2, 4), dtype=np.float32)
        # Sizes that do not divide: linear resampling keeps the fractional PC valid.
        return zoom(patterns.astype(np.float32), (1, wh / h, ww / w), order=1)

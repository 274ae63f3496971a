"""EBSD's features for the latent maps: each frame binned to at most 32 px a side and
divided by its own mean (the beam current drifts; the static background is common to the
scan and goes with the basis' mean). Per frame, with nothing learned from other frames, so
every worker computes the same features for the same frame (the indexer's own
preprocessing subtracts each worker's running background, which differs between workers).
About 13-26 µs a 60x60 frame on this loaded 2-core machine, against about 360 µs to
index it there (benchmarks/latent.py: a worker's page takes 1.8% longer with it)."""

from __future__ import annotations

import logging

import numpy as np

from liveindex.models.arrays import bin_frames
from liveindex.models.latent.basis import DEFAULT_DIMS, FIT_TILES, LatentBasis, fit_basis, read_tiles

log = logging.getLogger(__name__)

MAX_SIDE = 32


def _factor(pattern_shape) -> int:
    return max(1, -(-max(int(v) for v in pattern_shape) // MAX_SIDE))


def feature_shape(pattern_shape) -> tuple[int, int]:
    f = _factor(pattern_shape)
    return int(pattern_shape[0]) // f, int(pattern_shape[1]) // f


def features(frames: np.ndarray) -> np.ndarray:
    """(B, H, W) raw frames -> (B, P) float32 features; rows of a frame without signal are NaN."""
    n, h, w = frames.shape
    f = _factor((h, w))
    binned = bin_frames(frames[:, : h - h % f, : w - w % f], f, f).reshape(n, -1)
    level = binned.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(level > 0, binned / level, np.nan).astype(np.float32)


def frames_from_features(feats: np.ndarray, feature_shape, pattern_shape) -> np.ndarray:
    """(K, P) features -> (K, H, W) float32 frames: each binned pixel repeated over its block
    (the indexer bins them back), at a mean level of 100 counts."""
    f = _factor(pattern_shape)
    h, w = (int(v) for v in pattern_shape)
    images = np.maximum(np.asarray(feats, np.float32), 0).reshape(len(feats), *feature_shape) * 100.0
    out = np.zeros((len(feats), h, w), np.float32)
    big = np.repeat(np.repeat(images, f, axis=1), f, axis=2)
    out[:, : big.shape[1], : big.shape[2]] = big
    return out


def fit_scan_basis(source, dims: int = DEFAULT_DIMS, tiles: int = FIT_TILES) -> LatentBasis:
    """The scan's basis from 3x3 tiles spread over it (models/latent/basis.py)."""
    return fit_basis(read_tiles(source.read, source.nav_shape, features, tiles), feature_shape(source.pattern_shape),
                     dims)


def embed(basis, frames: np.ndarray) -> np.ndarray:
    """(B, D) float16 embeddings of raw frames in the scan's basis or encoder (LatentBasis or
    LatentEncoder); NaN where there is none (latent off, or a scan_start without one) or a
    frame has no signal."""
    if basis is None or basis.dims != DEFAULT_DIMS or basis.n_features != int(np.prod(feature_shape(frames.shape[1:]))):  # the declared width only (a peer's basis may differ)
        return np.full((len(frames), DEFAULT_DIMS), np.nan, np.float16)
    return basis.embed(features(frames))

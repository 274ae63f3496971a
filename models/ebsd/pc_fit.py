"""Projection-centre calibration on a scan's first frames: ``liveindex calibrate FILE`` and
``liveindex index --refine-pc``.

The frames are preprocessed as the workers preprocess them (the same static background and
signal mask), averaged with their most similar frames, and the sharpest of several looks go
to the global search (pc_search.py). The search replaced a local Nelder-Mead fit on the
refined NCC of the scan's sure points, which recovered a PC 0.015 off but not one 0.05 off.
"""

from __future__ import annotations

import logging

import numpy as np

from liveindex.models.errors import InputError

from .geometry import DetectorGeometry
from .pc_search import AVERAGED, PATTERNS, SEARCH_RANGE, PCSearchResult, average_similar, choose_patterns, search_pc

log = logging.getLogger(__name__)


def calibrate_pc(frames: np.ndarray, geometry: DetectorGeometry, phases, *, signal_mask: np.ndarray | None = None,
                 static_background: np.ndarray | None = None, search_range: float = SEARCH_RANGE,
                 points: int = PATTERNS, threads: int = 0, providers=None) -> PCSearchResult:
    """Search the PC within ``geometry.pc`` ± ``search_range`` on ``frames`` ((N, H, W) raw,
    a scan's first points); ``phases``: phase keys."""
    from .preprocess import Preprocessor, StaticBackground

    frames = np.asarray(frames)
    if frames.ndim != 3 or tuple(frames.shape[1:]) != tuple(geometry.pattern_shape):
        raise InputError(f"calibration frames of shape {frames.shape} do not match the detector's "
                         f"{geometry.pattern_shape[0]}x{geometry.pattern_shape[1]} patterns")
    try:
        preprocess = Preprocessor.for_shape(geometry.pattern_shape, signal_mask=signal_mask)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    supplied = None
    if static_background is not None:
        if tuple(static_background.shape) != tuple(geometry.pattern_shape):
            raise InputError(f"the static background is {static_background.shape[0]}x{static_background.shape[1]} but "
                             f"the scan's patterns are {geometry.pattern_shape[0]}x{geometry.pattern_shape[1]}; "
                             "record it with the same detector binning")
        supplied = preprocess._to_working(np.asarray(static_background, np.float32)[None])[0]
    # Without a supplied background, the running mean of these frames: all of them at once.
    flat, valid = preprocess(frames, StaticBackground(supplied))
    # Fewer than ~16 frames a look is too few to average without mixing grains (kikuchipy's
    # 3x3 Ni scan: two grains in 9 points).
    flat = average_similar(flat, valid, min(AVERAGED, int(valid.sum()) // 16))
    rows = choose_patterns(flat, valid, preprocess.working_shape, points)
    return search_pc(flat[rows], geometry, phases, working_shape=preprocess.working_shape, sigma=preprocess.sigma,
                     mask=preprocess.mask, search_range=search_range, threads=threads, providers=providers)


POOR_FIT = 0.15  # mean NCC below which the patterns are not explained at any PC searched


def log_fit(fit: PCSearchResult) -> None:
    log.info("%s", fit.describe())
    if fit.ncc_after < POOR_FIT:
        log.warning("the patterns fit poorly even at the fitted projection centre (mean NCC %.3f; above 0.4 is usual): "
                    "check --phases, the PC convention (--pc-convention) and the sample tilt (--tilt)", fit.ncc_after)
    if fit.at_edge:
        log.warning("the fitted projection centre lies at the edge of the searched ±%g; the true one may lie "
                    "further: run liveindex calibrate again from it (--pc %s)", fit.search_range,
                    " ".join(f"{v:.4f}" for v in fit.geometry.pc))

"""Index one scan's frames: preprocess, match templates, refine, and say how sure we are.

Workers and ``liveindex index`` both go through this class, so live and offline results
are the same for the same frames. For each page:

1. preprocess to the working size (30x30 for 60x60 frames);
2. match every expected phase's template dictionary; the best score picks the phase and
   the starting orientation (top ``CANDIDATES`` templates are kept);
3. refine that orientation with Gauss-Newton against patterns rendered from the master
   pattern (stream/refiner.py); the refined NCC is the evidence;
4. rescue: where the refined NCC is below the confidence threshold, the match probably
   landed in the wrong basin, so up to ``RESCUE_CANDIDATES`` more templates that are
   distinct orientations (more than ``DISTINCT_DEG`` apart) are refined too and the best
   refined NCC wins. On good frames almost no point needs it;
5. confidence = sigmoid((NCC - threshold) / width), calibrated so that points above 0.5
   are within 3 deg of the truth at least 99% of the time (benchmarks/calibrate_confidence.py);
   points below ``min_confidence`` get phase -1.
"""

from __future__ import annotations

import logging

import numpy as np

from liveindex.models.dictionary import DEFAULT_RESOLUTION, DictionarySpec, load_or_build
from liveindex.models.phases import check_phases, point_group

from .errors import InputError
from .geometry import DetectorGeometry
from .indexer import IndexResult, TemplateIndexer, choose_providers
from .preprocess import Preprocessor, StaticBackground
from .protocol import METHOD_CODE
from .refiner import Refiner, quaternion_multiply

log = logging.getLogger(__name__)

CANDIDATES = 16  # templates kept per pattern by the matcher
RESCUE_CANDIDATES = 5  # distinct extra starts refined for a point whose first refinement looks wrong
DISTINCT_DEG = 6.0
# Refined NCC at 30x30 -> confidence; fitted by benchmarks/calibrate_confidence.py.
CONFIDENCE_THRESHOLD = 0.19
CONFIDENCE_WIDTH = 0.015
DEFAULT_MIN_CONFIDENCE = 0.0


def confidence_from_ncc(ncc: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-(np.asarray(ncc, np.float64) - CONFIDENCE_THRESHOLD) / CONFIDENCE_WIDTH))).astype(
        np.float32)


def dictionary_spec(phase: str, geometry: DetectorGeometry, resolution: float = DEFAULT_RESOLUTION) -> DictionarySpec:
    """The template dictionary a scan with this geometry is matched against."""
    working = geometry.with_shape(Preprocessor.for_shape(geometry.pattern_shape).working_shape)
    binned = min(geometry.pattern_shape[0] // working.pattern_shape[0],
                 geometry.pattern_shape[1] // working.pattern_shape[1])
    return DictionarySpec(phase, working, resolution, supersample=2 if binned >= 2 else 1)


def load_dictionary(phase: str, geometry: DetectorGeometry, resolution: float = DEFAULT_RESOLUTION, **options):
    """The scan's dictionary with the matcher ScanIndexer uses, from the cache or built now."""
    return load_or_build(dictionary_spec(phase, geometry, resolution), top_k=CANDIDATES, **options)


class ScanIndexer:
    def __init__(self, geometry: DetectorGeometry, phases, *, resolution: float = DEFAULT_RESOLUTION,
                 providers: str = "auto", threads: int = 0, progress: bool = True, reason: str = "",
                 refine: bool = True, min_confidence: float = DEFAULT_MIN_CONFIDENCE,
                 static_background: np.ndarray | None = None):
        self.geometry = geometry
        self.phases = check_phases(phases)
        self.preprocess = Preprocessor.for_shape(geometry.pattern_shape)
        self.min_confidence = float(min_confidence)
        self._background = None
        if static_background is not None:
            if tuple(static_background.shape) != tuple(geometry.pattern_shape):
                raise InputError(f"the static background is {static_background.shape[0]}x{static_background.shape[1]} "
                                 f"but the scan's patterns are {geometry.pattern_shape[0]}x{geometry.pattern_shape[1]}; "
                                 "record it with the same detector binning")
            self._background = self.preprocess._to_working(static_background[None].astype(np.float32))[0]
        self.indexers, self.refiners = [], []
        for phase in self.phases:
            dictionary = load_dictionary(phase, geometry, resolution, reason=reason, progress=progress)
            indexer = TemplateIndexer(dictionary, providers=providers, threads=threads)
            indexer.warm_up(self.preprocess.n_pixels)
            self.indexers.append(indexer)
            if refine:
                self.refiners.append(Refiner(phase, geometry, self.preprocess.working_shape, self.preprocess.sigma,
                                             providers=choose_providers(providers), threads=threads))
        self._symmetry = [point_group(p).proper_subgroup.data.astype(np.float64) for p in self.phases]

    def new_background(self) -> StaticBackground:
        """A scan's static background: the supplied frame, or else the scan's running mean."""
        return StaticBackground(self._background)

    @property
    def provider(self) -> str:
        return self.indexers[0].provider

    @property
    def model_name(self) -> str:
        """What answers, for the live page: the matchers, refinement, and where they run."""
        refined = " + Gauss-Newton refinement" if self.refiners else ""
        return f"template matching {'+'.join(i.dictionary.spec.key for i in self.indexers)}{refined} on {self.provider}"

    def index(self, patterns: np.ndarray, background: StaticBackground | None = None) -> IndexResult:
        """(B, H, W) raw patterns -> results; NaN/inf or blank patterns come back not indexed.

        ``background``: the scan's static background (one per scan, kept by the caller)."""
        flat, valid = self.preprocess(patterns, background)
        scores, indices = zip(*(indexer.match(flat) for indexer in self.indexers))
        best_scores = np.stack([s[:, 0] for s in scores])  # (phases, B)
        phase = np.argmax(best_scores, axis=0)
        top_score = best_scores[phase, np.arange(len(flat))]
        quaternion = np.empty((len(flat), 4), np.float32)
        for p, indexer in enumerate(self.indexers):
            mine = phase == p
            quaternion[mine] = indexer.dictionary.rotations[indices[p][mine, 0]]
        result = IndexResult(
            phase_id=phase.astype(np.int16), quaternion=quaternion,
            confidence=np.clip(top_score, 0.0, 1.0).astype(np.float32),
            method=np.full(len(flat), METHOD_CODE["tm"], np.uint8), score=top_score.astype(np.float32))
        if self.refiners:
            for p in range(len(self.phases)):
                mine = np.flatnonzero((phase == p) & valid)
                if len(mine):
                    self._refine(p, flat[mine], indices[p][mine], result, mine)
            result.confidence = confidence_from_ncc(result.score)
            result.method[:] = METHOD_CODE["refined"]
        unsure = result.confidence < self.min_confidence
        result.phase_id[~valid | unsure] = -1
        result.confidence[~valid] = 0.0
        result.method[~valid] = METHOD_CODE["none"]
        return result

    def _refine(self, p: int, flat: np.ndarray, candidates: np.ndarray, result: IndexResult, rows: np.ndarray) -> None:
        refiner, rotations = self.refiners[p], self.indexers[p].dictionary.rotations
        q, ncc = refiner.refine(flat, rotations[candidates[:, 0]])
        doubtful = np.flatnonzero(ncc < CONFIDENCE_THRESHOLD)
        if len(doubtful):
            starts = self._distinct_starts(p, rotations[candidates[doubtful]])  # (D, R, 4)
            r = starts.shape[1]
            q_more, ncc_more = refiner.refine(np.repeat(flat[doubtful], r, axis=0), starts.reshape(-1, 4))
            ncc_more = ncc_more.reshape(-1, r)
            best = ncc_more.argmax(axis=1)
            better = ncc_more[np.arange(len(doubtful)), best] > ncc[doubtful]
            pick = doubtful[better]
            q[pick] = q_more.reshape(-1, r, 4)[np.flatnonzero(better), best[better]]
            ncc[pick] = ncc_more[np.flatnonzero(better), best[better]]
        result.quaternion[rows] = q
        result.score[rows] = ncc

    def _distinct_starts(self, p: int, candidates: np.ndarray) -> np.ndarray:
        """(D, K, 4) ranked templates -> (D, R, 4): the next best templates that are more than
        DISTINCT_DEG from the first and from each other (a repeat of the last where too few)."""
        symmetry = self._symmetry[p]
        # |<a, b·s>| over the proper symmetry operators s: cos of half the disorientation.
        candidates64 = candidates.astype(np.float64)
        equivalents = quaternion_multiply(candidates64[:, :, None, :], symmetry[None, None])  # (D, K, S, 4)
        dots = np.abs(np.einsum("dkc,dlsc->dkls", candidates64, equivalents))
        close = dots.max(axis=3) > np.cos(np.radians(DISTINCT_DEG) / 2)  # (D, K, K)
        out = np.empty((len(candidates), RESCUE_CANDIDATES, 4), np.float32)
        for d in range(len(candidates)):
            chosen = [0]
            for k in range(1, candidates.shape[1]):
                if not close[d, k, chosen].any():
                    chosen.append(k)
                    if len(chosen) > RESCUE_CANDIDATES:
                        break
            extra = chosen[1:] or [1]
            extra += [extra[-1]] * (RESCUE_CANDIDATES - len(extra))
            out[d] = candidates[d, extra]
        return out

"""Index one scan's frames: preprocess, find a start, refine, and say how sure we are.

Workers and ``liveindex index`` both go through this class, so live and offline results
are the same for the same frames. Three modes (``indexer``):

- ``hybrid`` (default): the network (models/network.py) gives phase and a starting
  orientation; frames it is unsure of, and frames whose network start refines to a poor fit
  (NCC below the confidence threshold), go to template matching. Where the bundle does not
  cover the scan (geometry outside its range, or a phase it does not know), the whole scan
  uses template matching and the log says why;
- ``network``: the network only (an error where the bundle does not cover the scan);
- ``templates``: template matching only.

Per page:

1. preprocess to the working size (30x30 for 60x60 frames);
2. network and/or template matching: matching scores every expected phase's dictionary;
   the best score picks the phase and the starting orientation (top ``CANDIDATES`` kept);
3. refine the start with Gauss-Newton against patterns rendered from the master pattern
   (stream/refiner.py); the refined NCC is the evidence;
4. rescue (template matching): where the refined NCC is below the confidence threshold, the
   match probably landed in the wrong basin, so up to ``RESCUE_CANDIDATES`` more templates
   that are distinct orientations (more than ``DISTINCT_DEG`` apart) are refined too and
   the best refined NCC wins. On good frames almost no point needs it;
5. confidence (models/ebsd/confidence.py, ``_judge``) from the refined NCC, the share of the
   pattern's structure the answer explains and, for matched points, the reliability;
   calibrated by benchmarks/calibrate_confidence.py so that points above 0.5 are right
   (phase and within 3 deg) at least 99% of the time on its sets; points below ``min_confidence`` get phase -1. Without refinement: the network's
   phase x orientation confidence, or template matching's best NCC.

Results carry the method: nn, tm, nn+refined, tm+refined (protocol.METHODS).
"""

from __future__ import annotations

import functools
import logging

import numpy as np

from liveindex.models.crystal import PhaseRecord, quaternion_multiply
from liveindex.models.ebsd.dictionary import DEFAULT_RESOLUTION, DictionarySpec, load_or_build, working_geometry
from liveindex.models.ebsd.master_patterns import check_phases, point_group, record_of, register
from liveindex.models.errors import InputError
from liveindex.models.onnx_runtime import choose_providers

from .compiled_refinement import MAX_FINE_SIDE
from .confidence import above_noise, confidence, explained_share, noise_frames, white_noise_share
from .geometry import DetectorGeometry
from .matcher import TemplateIndexer
from .preprocess import Preprocessor, StaticBackground
from .refiner import Refiner
from .results import METHOD_CODE, IndexResult
from .symmetry_check import AGREEMENT, symmetry_agreement

log = logging.getLogger(__name__)

CANDIDATES = 16  # templates kept per pattern by the matcher
RESCUE_CANDIDATES = 10  # distinct extra starts refined for a point whose first refinement looks wrong
DISTINCT_DEG = 5.0
PAGE_CANDIDATES = 8  # orientations of a page's sure points tried for its still-doubtful points
PAGE_MIN_POINTS = 4  # ... each found at this many points at least: a grain, not a coincidence
# Refined NCC at 30x30 below which an answer is doubtful: rescued, matched again.
CONFIDENCE_THRESHOLD = 0.19
DEFAULT_MIN_CONFIDENCE = 0.0
# A second phase whose best template scores within this of the first's is refined too.
CONTENTION = 0.05
# Where more than this share of a page stays doubtful after the coarse first pass (hard noise),
# the next PAGES_WITHOUT_COARSE pages are matched on every pixel straight away (at hard noise a
# coarse page costs both passes for most of its points: tried again one page in eleven).
COARSE_MAX_DOUBTFUL = 0.1
PAGES_WITHOUT_COARSE = 10
# A distinct second solution scoring within this fraction of the answer's flags the point
# (pseudo-symmetry): relative, as template NCCs scale with the pattern's noise.
PSEUDO_SYMMETRY_MARGIN = 0.03
# A sure-looking answer whose best distinct template scored within this ratio of its own has that
# solution refined too (_refine_contested); right answers read 1.6-3 at moderate noise.
CONTESTED_RELIABILITY = 1.3
# The most a phase whose rendered patterns lack its symmetry reads (symmetry_check.py): an even
# chance, as its answer and the variant that renders alike are; not above 0.5, so never "sure",
# and not below the default --min-confidence 0.5, so the map is still drawn.
UNSURE_SYMMETRY_CONFIDENCE = 0.5


def dictionary_spec(phase: str, geometry: DetectorGeometry, resolution: float = DEFAULT_RESOLUTION,
                    mask: np.ndarray | None = None) -> DictionarySpec:
    """The template dictionary a scan with this geometry (and working-size signal mask) is matched against."""
    working, supersample = working_geometry(geometry)
    bits = None if mask is None else np.packbits(np.asarray(mask, bool).reshape(-1)).tobytes()
    return DictionarySpec(phase, working, resolution, supersample=supersample, mask_bits=bits)


def load_dictionary(phase: str, geometry: DetectorGeometry, resolution: float = DEFAULT_RESOLUTION,
                    mask: np.ndarray | None = None, **options):
    """The scan's dictionary with the matcher ScanIndexer uses, from the cache or built now."""
    return load_or_build(dictionary_spec(phase, geometry, resolution, mask), top_k=CANDIDATES, **options)


INDEXERS = ("hybrid", "network", "templates")
# Network answers below these go to template matching (hybrid only). The refined NCC is the
# real gate (a network start that refines below CONFIDENCE_THRESHOLD is matched again), so
# these only spare refinement of answers that are plainly unsure.
PHASE_GATE = 0.9
ORIENTATION_GATE = 0.5
# Where the network answers less than this share of a page (or of its first NETWORK_PROBE
# patterns), the page's rest and the next PAGES_WITHOUT_NETWORK pages skip it; then it is
# tried again.
NETWORK_MIN_SHARE = 0.5
PAGES_WITHOUT_NETWORK = 3
NETWORK_PROBE = 32  # patterns the network answers first on a page, to see whether it can read them


@functools.lru_cache(maxsize=4)
def load_network(bundle: str | None, providers: str, threads: int):
    """One NetworkModel per bundle and settings in a process (workers index many scans)."""
    from liveindex.models.ebsd.network import NetworkModel

    model = NetworkModel.load(bundle, providers=providers, threads=threads)
    model.warm_up()
    return model


class ScanIndexer:
    def __init__(self, geometry: DetectorGeometry, phases, *, resolution: float = DEFAULT_RESOLUTION,
                 providers: str = "auto", threads: int = 0, progress: bool = True, reason: str = "",
                 refine: bool = True, min_confidence: float = DEFAULT_MIN_CONFIDENCE,
                 static_background: np.ndarray | None = None, signal_mask: np.ndarray | None = None,
                 indexer: str = "hybrid", bundle: str | None = None):
        if indexer not in INDEXERS:
            raise InputError(f"indexer {indexer!r} is not one of {', '.join(INDEXERS)}")
        self.geometry = geometry
        self.phases = check_phases([register(p) if isinstance(p, PhaseRecord) else p for p in phases])
        try:
            self.preprocess = Preprocessor.for_shape(geometry.pattern_shape, signal_mask=signal_mask)
            # The last refinement steps' size (models/ebsd/fine_refinement.py), where finer.
            fine = Preprocessor.for_shape(geometry.pattern_shape, MAX_FINE_SIDE, signal_mask=signal_mask)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        self.fine_preprocess = fine if refine and fine.working_shape != self.preprocess.working_shape else None
        self.min_confidence = float(min_confidence)
        self.mode = indexer
        self._pages_without_network = 0
        self._pages_without_coarse = 0
        self._background = None
        if static_background is not None:
            if tuple(static_background.shape) != tuple(geometry.pattern_shape):
                raise InputError(f"the static background is {static_background.shape[0]}x{static_background.shape[1]} "
                                 f"but the scan's patterns are {geometry.pattern_shape[0]}x{geometry.pattern_shape[1]}; "
                                 "record it with the same detector binning")
            self._background = {prep.working_shape: prep._to_working(static_background[None].astype(np.float32))[0]
                                for prep in (self.preprocess, self.fine_preprocess) if prep is not None}
        self.network = None
        if indexer != "templates":
            self._load_network(bundle, providers, threads)
        self.indexers, self.refiners = [], []
        for phase in self.phases:
            if self.mode != "network":
                dictionary = load_dictionary(phase, geometry, resolution, self.preprocess.mask, reason=reason,
                                             progress=progress)
                matcher = TemplateIndexer(dictionary, providers=providers, threads=threads)
                matcher.warm_up(self.preprocess.n_pixels)
                self.indexers.append(matcher)
        self._providers, self._threads = providers, threads
        self._symmetry = [point_group(p).proper_subgroup.data.astype(np.float64) for p in self.phases]
        self._noise_scores = None
        self._unsure_symmetry = [False] * len(self.phases)
        if refine:
            self.refine_at(geometry)
            self._white_share = white_noise_share(self.preprocess)
            self._check_symmetry()
            self._noise_scores = self._scores_on_noise()

    def _check_symmetry(self) -> None:
        """Phases whose rendered patterns lack their point group's symmetry (models/ebsd/
        symmetry_check.py) are indexed with their confidence held at 0.5 at most, and the log says so."""
        for p, refiner in enumerate(self.refiners):
            agreement = symmetry_agreement(refiner, self._symmetry[p])
            if agreement < AGREEMENT:
                self._unsure_symmetry[p] = True
                log.warning("phase %s: its master pattern does not have the symmetry of point group %s (patterns "
                            "turned by one of its rotations correlate %.2f; a monoclinic cell with b unique or a trigonal "
                            "one on rhombohedral axes does this, as orix puts the two- or three-fold along c: give the "
                            "phase as a CIF, which liveindex re-describes), so an answer can be a variant of the truth "
                            "that renders alike: its confidence is held at 0.5 at most", record_of(self.phases[p]).name,
                            point_group(self.phases[p]).name, agreement)

    def _scores_on_noise(self) -> np.ndarray:
        """The refined NCCs this indexer gives frames of pure noise (models/ebsd/confidence.py
        above_noise), through the whole path; the page counters (which pages skip the network or
        the coarse pass, set by doubtful pages as noise is) are left as they were."""
        counters = self._pages_without_network, self._pages_without_coarse
        result = self.index(noise_frames(self.preprocess))
        self._pages_without_network, self._pages_without_coarse = counters
        return result.score[np.isfinite(result.score)]

    def refine_at(self, geometry: DetectorGeometry) -> None:
        """Refine against patterns rendered for ``geometry`` (a fitted projection centre, say);
        the starts (network, dictionary) stay those of the geometry the scan was given with:
        they only have to land in the right basin."""
        fine = self.fine_preprocess
        self.refiners = [Refiner(phase, geometry, self.preprocess.working_shape, self.preprocess.sigma,
                                 mask=self.preprocess.mask, providers=choose_providers(self._providers),
                                 threads=self._threads, fine_shape=None if fine is None else fine.working_shape,
                                 fine_mask=None if fine is None else fine.mask) for phase in self.phases]
        for refiner in self.refiners:
            refiner.warm_up()

    def _load_network(self, bundle, providers: str, threads: int) -> None:
        """The network, where its bundle covers this scan; the hybrid falls back to templates where not."""
        network = load_network(None if bundle is None else str(bundle), providers, threads)
        problems = []
        if not network.covers(self.geometry):
            problems.append(f"the scan's geometry ({self.geometry.cache_key()}, {self.geometry.pattern_shape[0]}x"
                            f"{self.geometry.pattern_shape[1]}) is outside the bundle's range "
                            f"({network.geometry_range.describe()})")
        missing = [p for p in self.phases if p not in network.phases]
        if missing:
            problems.append(f"the bundle has no phase {', '.join(missing)} (it knows {', '.join(network.phases)})")
        if self.preprocess.mask is not None:
            problems.append("the scan has a signal mask and the bundle was trained on whole patterns")
        if problems:
            if self.mode == "network":
                raise InputError(f"the network cannot index this scan: {'; '.join(problems)}; use --indexer hybrid "
                                 "or templates, or a bundle trained for it (liveindex models train)")
            log.warning("template matching only for this scan: %s", "; ".join(problems))
            self.mode = "templates"
            return
        self.network = network
        self._allowed = network.phase_indices(self.phases)
        self._scan_phase = np.full(len(network.phases), -1, np.int16)  # network phase index -> scan phase index
        self._scan_phase[self._allowed] = np.arange(len(self.phases))

    def new_background(self) -> StaticBackground:
        """A scan's static background: the supplied frame, or else the scan's running mean."""
        return StaticBackground(self._background)

    @property
    def provider(self) -> str:
        return (self.indexers[0] if self.indexers else self.network).provider

    @property
    def model_name(self) -> str:
        """What answers, for the live page: network, matchers, refinement, and where they run."""
        parts = []
        if self.network is not None:
            parts.append(f"network {self.network.folder.name} bundle")
        if self.indexers:
            matching = f"template matching {'+'.join(i.dictionary.spec.key for i in self.indexers)}"
            parts.append(matching + (" where the network is unsure" if self.network is not None else ""))
        refined = " + Gauss-Newton refinement" if self.refiners else ""
        return f"{', '.join(parts)}{refined} on {self.provider}"

    def index(self, patterns: np.ndarray, background: StaticBackground | None = None) -> IndexResult:
        """(B, H, W) raw patterns -> results; NaN/inf or blank patterns come back not indexed.

        ``background``: the scan's static background (one per scan, kept by the caller)."""
        flat, valid = self.preprocess(patterns, background)
        result = IndexResult.empty(len(flat))
        todo = np.flatnonzero(valid)
        if self.network is not None and len(todo):
            if self._pages_without_network:
                self._pages_without_network -= 1
            else:
                todo = self._network_first(flat, todo, result)
        if self.indexers and len(todo):
            self._match(flat, todo, result)
        if self.refiners:
            self._rescue_from_the_page(flat, valid, result)
            self._polish(patterns, background, valid, result)
            self._judge(flat, valid, result)
        unsure = result.confidence < self.min_confidence
        result.phase_id[~valid | unsure] = -1
        result.confidence[~valid] = 0.0
        result.method[~valid] = METHOD_CODE["none"]
        return result

    def _polish(self, patterns: np.ndarray, background: StaticBackground | None, valid: np.ndarray,
                result: IndexResult) -> None:
        """Every answer's last refinement steps on the frames at their own resolution (up to
        MAX_FINE_SIDE): the working size finds the orientation, the band edges the 2x2 bin
        blurs pin it (hcp Ti, 60x60 at moderate noise: median 0.32 -> 0.20 deg). The score stays
        the working size's NCC, on which the confidence is calibrated."""
        if self.fine_preprocess is None:
            return
        rows = np.flatnonzero(valid & (result.phase_id >= 0))
        if not len(rows):
            return
        fine, _ = self.fine_preprocess(patterns[rows], background)
        for p, refiner in enumerate(self.refiners):
            mine = result.phase_id[rows] == p
            if mine.any():
                result.quaternion[rows[mine]] = refiner.polish(fine[mine], result.quaternion[rows[mine]])

    def _judge(self, flat: np.ndarray, valid: np.ndarray, result: IndexResult) -> None:
        """Each answer's confidence from its refined NCC and the share of its pattern's
        structure it explains (models/ebsd/confidence.py): one render per point."""
        for p, refiner in enumerate(self.refiners):
            rows = np.flatnonzero(valid & (result.phase_id == p))
            if len(rows):
                explained = explained_share(self.preprocess, flat[rows], refiner.render(result.quaternion[rows]),
                                            result.score[rows], self._white_share)
                result.confidence[rows] = confidence(result.score[rows], explained, result.reliability[rows])
                if self._noise_scores is not None and len(self._noise_scores):
                    result.confidence[rows] *= above_noise(result.score[rows], self._noise_scores)
                if self._unsure_symmetry[p]:
                    result.confidence[rows] = np.minimum(result.confidence[rows], UNSURE_SYMMETRY_CONFIDENCE)
        # A flag for sure answers only: where the fit itself is doubtful, a second solution that
        # scores as well is noise, and the low confidence already says so.
        result.pseudo_symmetry[result.confidence < 0.5] = 0

    def _network_first(self, flat: np.ndarray, todo: np.ndarray, result: IndexResult) -> np.ndarray:
        """The network answers what it can of ``todo``; returns the rows left to matching.

        Patterns the network cannot read (hard noise, a phase it mistakes) cost its inference
        and a wasted refinement each, so in the hybrid it first answers a probe of
        NETWORK_PROBE patterns; where it answers less than NETWORK_MIN_SHARE of the probe (or
        of the page), the page's rest and the next PAGES_WITHOUT_NETWORK pages go straight
        to matching."""
        if self.mode != "hybrid":
            return self._network_answers(flat, todo, result)
        probe, rest = todo[:NETWORK_PROBE], todo[NETWORK_PROBE:]
        left = self._network_answers(flat, probe, result)
        if len(left) > (1 - NETWORK_MIN_SHARE) * len(probe):
            self._pages_without_network = PAGES_WITHOUT_NETWORK
            return np.concatenate([left, rest])
        left_of_rest = self._network_answers(flat, rest, result) if len(rest) else rest
        if len(left_of_rest) > (1 - NETWORK_MIN_SHARE) * len(rest):
            self._pages_without_network = PAGES_WITHOUT_NETWORK
        return np.concatenate([left, left_of_rest])

    def _network_answers(self, flat: np.ndarray, rows: np.ndarray, result: IndexResult) -> np.ndarray:
        """Answer ``rows`` with the network (refined where refinement is on); returns the rows it
        leaves to template matching: none in network mode, else the unsure ones."""
        phase, q, phase_conf, orient_conf = self.network.predict(flat[rows], allowed=self._allowed)
        phase = self._scan_phase[phase]
        if self.mode == "hybrid":
            sure = (phase_conf >= PHASE_GATE) & (orient_conf >= ORIENTATION_GATE)
            rows, phase, q, phase_conf, orient_conf, left = (
                rows[sure], phase[sure], q[sure], phase_conf[sure], orient_conf[sure], rows[~sure])
        else:
            left = rows[:0]
        result.phase_id[rows] = phase
        result.quaternion[rows] = q
        if not self.refiners:
            result.confidence[rows] = phase_conf * orient_conf
            result.score[rows] = orient_conf
            result.method[rows] = METHOD_CODE["nn"]
            return left
        for p in range(len(self.phases)):
            mine = phase == p
            if mine.any():
                result.quaternion[rows[mine]], result.score[rows[mine]] = self.refiners[p].refine(flat[rows[mine]], q[mine])
        result.method[rows] = METHOD_CODE["nn+refined"]
        if self.mode == "hybrid":  # a start that refined to a poor fit: match it from scratch
            left = np.concatenate([left, rows[result.score[rows] < CONFIDENCE_THRESHOLD]])
        return left

    def _match(self, flat: np.ndarray, rows: np.ndarray, result: IndexResult) -> None:
        """Template matching of ``rows`` over every phase, refined (with rescue) where refinement is on.

        With refinement on the CPU, a first pass matches on the dictionary's principal
        components (dictionary._write_coarse_matcher: a fifth of the work); only the rows it
        leaves doubtful (refined NCC below CONFIDENCE_THRESHOLD) are matched against every
        pixel, and the better refined fit of the two is kept."""
        coarse = bool(self.refiners) and all(m.coarse_session is not None for m in self.indexers)
        if self._pages_without_coarse:  # recent pages were mostly doubtful: the first pass only cost
            self._pages_without_coarse -= 1
            coarse = False
        self._match_pass(flat, rows, result, coarse=coarse)
        if not coarse:
            return
        doubtful = rows[result.score[rows] < CONFIDENCE_THRESHOLD]
        if len(doubtful) > COARSE_MAX_DOUBTFUL * len(rows):
            self._pages_without_coarse = PAGES_WITHOUT_COARSE
        if len(doubtful):
            full = IndexResult.empty(len(flat))
            self._match_pass(flat, doubtful, full, coarse=False)
            better = doubtful[full.score[doubtful] > result.score[doubtful]]
            for name in ("phase_id", "quaternion", "score", "confidence", "method", "pseudo_symmetry", "reliability"):
                getattr(result, name)[better] = getattr(full, name)[better]

    def _match_pass(self, flat: np.ndarray, rows: np.ndarray, result: IndexResult, *, coarse: bool) -> None:
        part = flat[rows]
        scores, indices = zip(*(self._ranked(matcher, part, coarse) for matcher in self.indexers))
        best_scores = np.stack([s[:, 0] for s in scores])  # (phases, B)
        phase = np.argmax(best_scores, axis=0)
        top_score = best_scores[phase, np.arange(len(rows))]
        result.phase_id[rows] = phase
        for p, matcher in enumerate(self.indexers):
            mine = phase == p
            result.quaternion[rows[mine]] = matcher.dictionary.rotations[indices[p][mine, 0]]
        if not self.refiners:
            result.confidence[rows] = np.clip(top_score, 0.0, 1.0)
            result.score[rows] = top_score
            result.method[rows] = METHOD_CODE["tm"]
            return
        for p in range(len(self.phases)):
            mine = np.flatnonzero(phase == p)
            if len(mine):
                self._refine(p, part[mine], indices[p][mine], result, rows[mine])
                self._compare_solutions(p, scores[p][mine], indices[p][mine], result, rows[mine])
                self._refine_contested(p, part[mine], scores[p][mine], indices[p][mine], result, rows[mine])
        if len(self.phases) > 1:
            self._refine_runner_up(part, rows, best_scores, indices, result)
        result.method[rows] = METHOD_CODE["tm+refined"]

    def _compare_solutions(self, p: int, scores: np.ndarray, candidates: np.ndarray, result: IndexResult,
                           rows: np.ndarray) -> None:
        """The answer against the best distinct solution, from the matcher's top templates:
        ``reliability`` = best template near the refined answer / best template more than
        DISTINCT_DEG from it (about 1 where nothing stands out: a phase that is not the
        pattern's; 1.6-3 for right answers at moderate noise, real patterns included), and
        the pseudo-symmetry flag where the distinct one scores within PSEUDO_SYMMETRY_MARGIN
        (a fraction) of the near one. Matched rows only: the network gives no second solution."""
        near = self._near(p, result.quaternion[rows], self.indexers[p].dictionary.rotations[candidates])  # (D, K)
        best_near = np.where(near, scores, -np.inf).max(axis=1)
        best_distinct = np.where(near, -np.inf, scores).max(axis=1)
        flag = np.isfinite(best_near) & (best_distinct >= best_near * (1 - PSEUDO_SYMMETRY_MARGIN))
        result.pseudo_symmetry[rows] = flag.astype(np.uint8)
        known = np.isfinite(best_near) & np.isfinite(best_distinct) & (best_distinct > 0)
        result.reliability[rows] = np.where(known, best_near / np.where(known, best_distinct, 1.0), 0.0)

    def _refine_contested(self, p: int, flat: np.ndarray, scores: np.ndarray, candidates: np.ndarray,
                          result: IndexResult, rows: np.ndarray) -> None:
        """Where the best distinct template scored close to the answer's (reliability below
        CONTESTED_RELIABILITY) and the answer looks sure, that distinct solution is refined too
        and the better refined fit kept. A pseudo-symmetric variant (ZrO2: a turn of 180 degrees
        about a near two-fold of its cell) can outscore the truth's template and refine to a fit
        that passes as sure, while the truth, refined, fits far better (0.53 against 0.42)."""
        contested = np.flatnonzero((result.reliability[rows] > 0) & (result.reliability[rows] < CONTESTED_RELIABILITY)
                                   & (result.score[rows] >= CONFIDENCE_THRESHOLD))
        if not len(contested):
            return
        rotations = self.indexers[p].dictionary.rotations
        near = self._near(p, result.quaternion[rows[contested]], rotations[candidates[contested]])  # (C, K)
        ranked = np.where(near, -np.inf, scores[contested])
        other = ranked.argmax(axis=1)
        found = np.isfinite(ranked[np.arange(len(contested)), other])
        contested, other = contested[found], other[found]
        if not len(contested):
            return
        q, ncc = self.refiners[p].refine(flat[contested], rotations[candidates[contested, other]])
        kept, kept_q = result.score[rows[contested]].copy(), result.quaternion[rows[contested]].copy()
        better = ncc > kept
        target = rows[contested[better]]
        result.quaternion[target] = q[better]
        result.score[target] = ncc[better]
        if better.any():  # the reliability and the flag are the new answer's
            chosen = contested[better]
            self._compare_solutions(p, scores[chosen], candidates[chosen], result, rows[chosen])
        # Two distinct solutions that refine to fits within PSEUDO_SYMMETRY_MARGIN of each other:
        # the pattern cannot tell them apart, whatever their templates scored. Flagged, and the
        # reliability (which the confidence reads) is the refined fits' ratio.
        best, second = np.maximum(ncc, kept), np.minimum(ncc, kept)
        apart = ~self._near(p, kept_q, q[:, None, :])[:, 0]
        tied = apart & (second > 0) & (second >= best * (1 - PSEUDO_SYMMETRY_MARGIN))
        target = rows[contested[tied]]
        result.pseudo_symmetry[target] = 1
        result.reliability[target] = np.minimum(result.reliability[target], best[tied] / second[tied])

    def _near(self, p: int, answers: np.ndarray, others: np.ndarray) -> np.ndarray:
        """(D, 4) answers and (D, K, 4) orientations of phase p -> (D, K): each within DISTINCT_DEG
        of its row's answer, with the phase's symmetry (float64: a near-identity pair's dot
        product sits close to 1)."""
        answers = np.asarray(answers, np.float64)[:, None, :]
        return self._close(answers, self._equivalents(p, np.asarray(others, np.float64)))[:, 0, :]

    @staticmethod
    def _ranked(matcher, part: np.ndarray, coarse: bool) -> tuple[np.ndarray, np.ndarray]:
        """The matcher's top templates with their scores on every pixel, best first: a coarse
        pass's approximate ranking is redone with the exact scores (a few dot products)."""
        scores, indices = matcher.match(part, coarse=coarse)
        if not coarse:
            return scores, indices
        exact = matcher.exact_scores(part, indices)
        order = np.argsort(-exact, axis=1, kind="stable")
        return np.take_along_axis(exact, order, axis=1), np.take_along_axis(indices, order, axis=1)

    def _refine_runner_up(self, part: np.ndarray, rows: np.ndarray, best_scores: np.ndarray, indices, result) -> None:
        """Where a second phase's best template scored within CONTENTION of the first's, refine
        it too and keep the better refined fit: the templates sit on a 3 deg grid, and a
        similar phase's template can outscore the right one's before refinement (fcc/bcc)."""
        order = np.argsort(-best_scores, axis=0)
        columns = np.arange(len(rows))
        runner = order[1]
        contested = np.flatnonzero(best_scores[runner, columns] >= best_scores[order[0], columns] - CONTENTION)
        for p in range(len(self.phases)):
            mine = contested[runner[contested] == p]
            if not len(mine):
                continue
            q, ncc = self.refiners[p].refine(part[mine], self.indexers[p].dictionary.rotations[indices[p][mine, 0]])
            better = ncc > result.score[rows[mine]]
            target = rows[mine[better]]
            result.phase_id[target] = p
            result.quaternion[target] = q[better]
            result.score[target] = ncc[better]

    def _refine(self, p: int, flat: np.ndarray, candidates: np.ndarray, result: IndexResult, rows: np.ndarray) -> None:
        refiner, rotations = self.refiners[p], self.indexers[p].dictionary.rotations
        q, ncc = refiner.refine(flat, rotations[candidates[:, 0]])
        doubtful = np.flatnonzero(ncc < CONFIDENCE_THRESHOLD)
        if len(doubtful):
            starts = self._distinct_starts(p, rotations[candidates[doubtful]])  # (D, R, 4)
            q_more, ncc_more = self._best_start(p, flat[doubtful], starts)
            better = ncc_more > ncc[doubtful]
            q[doubtful[better]] = q_more[better]
            ncc[doubtful[better]] = ncc_more[better]
        result.quaternion[rows] = q
        result.score[rows] = ncc

    def _rescue_from_the_page(self, flat: np.ndarray, valid: np.ndarray, result: IndexResult) -> None:
        """Points still doubtful are refined from the orientations the page's sure points found.

        A page is consecutive scan points, and grains span many points, so the orientation a
        noisy pattern's grain has is usually among them even where neither the network nor
        the dictionary's top matches got near it. The grains' patterns are rendered once and
        each doubtful point refines only from the grain whose pattern it matches best: the
        right grain's orientation is already within a degree, so its unrefined NCC stands
        out, and refining every grain's orientation at every doubtful point cost a third of
        the time at hard noise for no more points."""
        doubtful = np.flatnonzero(valid & (result.score < CONFIDENCE_THRESHOLD))
        if not len(doubtful):
            return
        for p in range(len(self.refiners)):
            sure = np.flatnonzero(valid & (result.phase_id == p) & (result.score >= CONFIDENCE_THRESHOLD))
            if not len(sure):
                continue
            grains = self._page_orientations(p, result.quaternion[sure])
            if not len(grains):
                continue
            fit = flat[doubtful] @ self.refiners[p].render(grains).T  # (D, grains): NCC before refinement
            q_more, ncc_more = self.refiners[p].refine(flat[doubtful], grains[fit.argmax(axis=1)])
            better = np.flatnonzero(ncc_more > result.score[doubtful])
            rows = doubtful[better]
            result.quaternion[rows] = q_more[better]
            result.score[rows] = ncc_more[better]
            result.phase_id[rows] = p

    def _best_start(self, p: int, flat: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(D, P) patterns, (D, R, 4) candidate starts each -> the best refined (D, 4) and its NCC (D,).

        Every start is refined in full: screening them with coarse steps first and refining
        only the best two was 1.2x faster at hard noise but lost 1.25% of points there."""
        d, r = starts.shape[:2]
        q, ncc = self.refiners[p].refine(np.repeat(flat, r, axis=0), np.ascontiguousarray(starts).reshape(-1, 4))
        best = ncc.reshape(d, r).argmax(axis=1)
        return q.reshape(d, r, 4)[np.arange(d), best], ncc.reshape(d, r)[np.arange(d), best]

    def _page_orientations(self, p: int, quaternions: np.ndarray) -> np.ndarray:
        """(C, 4) orientations -> up to PAGE_CANDIDATES distinct ones (more than DISTINCT_DEG apart),
        the most common first, each found at PAGE_MIN_POINTS points or more: a grain, not a lone
        point (on a scan of one orientation per point there is nothing to try, and no time is spent)."""
        q = quaternions.astype(np.float32)
        equivalents = self._equivalents(p, q)  # (S, C, 4)
        # How many of the page's orientations are within DISTINCT_DEG of each, a block of rows at a time.
        members = np.concatenate([self._close(q[i:i + 256], equivalents).sum(axis=1) for i in range(0, len(q), 256)])
        chosen: list[int] = []
        for i in np.argsort(-members, kind="stable"):
            if members[i] < PAGE_MIN_POINTS:
                break
            if not chosen or not self._close(q[i:i + 1], equivalents[:, chosen]).any():
                chosen.append(i)
                if len(chosen) == PAGE_CANDIDATES:
                    break
        return quaternions[chosen]

    def _equivalents(self, p: int, q: np.ndarray) -> np.ndarray:
        """(..., B, 4) orientations -> (..., S, B, 4): phase p's proper symmetry operators times
        each (orix's convention: the equivalents of q are s * q), in q's dtype."""
        return quaternion_multiply(self._symmetry[p][:, None, :].astype(q.dtype), q[..., None, :, :])

    @staticmethod
    def _close(a: np.ndarray, equivalents: np.ndarray) -> np.ndarray:
        """(..., A, 4) orientations and the (..., S, B, 4) symmetry equivalents of B others ->
        (..., A, B): within DISTINCT_DEG. max over s of |<a, b·s>| is the cosine of half the
        disorientation; one matrix product for all pairs, and the max over s across rows (10x
        faster than along a short last axis)."""
        s, b = equivalents.shape[-3:-1]
        dots = a @ np.swapaxes(equivalents.reshape(*equivalents.shape[:-3], s * b, 4), -1, -2)
        np.abs(dots, out=dots)
        return dots.reshape(*dots.shape[:-1], s, b).max(axis=-2) > np.cos(np.radians(DISTINCT_DEG) / 2)

    def _distinct_starts(self, p: int, candidates: np.ndarray) -> np.ndarray:
        """(D, K, 4) ranked templates -> (D, R, 4): the next best templates that are more than
        DISTINCT_DEG from the first and from each other (a repeat of the last where too few)."""
        candidates64 = candidates.astype(np.float64)
        close = self._close(candidates64, self._equivalents(p, candidates64))  # (D, K, K)
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

"""Global projection-centre search: ``liveindex calibrate FILE`` and ``liveindex index --refine-pc``.

A PC given up to 0.05 off in each coordinate (a typed-in value, another session's PC, a
file's) is too far for a local fit: at 0.05 off the dictionary's best templates are wrong
for about half of the patterns (they are matched at the wrong PC), and a PC 0.05 away from
where an orientation was refined asks that orientation to move about 6 deg, beyond what a
few Gauss-Newton steps follow. So the search:

1. averages each pattern with the ones most like it (``average_similar``, NLPAR without a
   scan shape) and takes ``PATTERNS`` sharp ones of several looks (``choose_patterns``:
   pattern quality does not depend on the PC);
2. grid: at each PC of a 3x3x3 grid spanning the start ± the range, indexes those patterns
   from scratch at that PC: templates over orientation space (``TEMPLATE_RESOLUTION``)
   rendered there by the refinement graph (0.65 s for 3557 Ni templates at 30x30), the best
   ``CANDIDATES`` of each pattern refined; the PC's score is the mean best refined NCC. This
   is the field's "match against templates at a few PCs"; PyEBSDIndex's particle swarm does
   the same with Hough indexing as the score, kikuchipy refines PC and orientation together
   per pattern from a start that must already be close. Half the working size was tried to
   render 4x fewer pixels: right on simulated scans, but on kikuchipy's real Ni patterns every
   PC scored about 0.25 there (0.45 at the working size at the true PC) and the search went
   astray; a second grid of half the step found nothing the polish did not;
3. polish: Nelder-Mead over the PC on the mean refined NCC, each pattern's orientation
   carried from the best grid PC to the candidate by the rotation that best maps the
   detector's directions at one onto the other (``carry``: a PC shift in the detector plane
   is nearly a rotation of the whole pattern), then refined. Measured on a simulated scan
   0.05 off in each coordinate: at the true PC its patterns, refined three steps from their
   orientations at the start PC, score 0.39 carried, 0.09 not;
4. check: the patterns are indexed from scratch again at the polished PC; where that finds
   better orientations (a pattern the grid had in a wrong basin), polish once more.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import time
from dataclasses import dataclass, replace

import numpy as np

from liveindex.models.crystal import quaternion_multiply
from liveindex.models.errors import InputError

from .geometry import DetectorGeometry, validate_pc

log = logging.getLogger(__name__)

SEARCH_RANGE = 0.05  # each PC coordinate is searched within the start ± this
PATTERNS = 48  # the sharpest patterns the PC is fitted on
MIN_PATTERNS = 5
TEMPLATE_RESOLUTION = 6.0  # degrees: 3557 templates for m-3m
CANDIDATES = 4  # templates refined per pattern and grid PC
GRID_STEPS = 3  # Gauss-Newton steps per candidate template on the grid
POLISH_STEPS = 3  # ... per pattern and Nelder-Mead candidate (working size)
SIMPLEX_STEP = 0.01
PC_TOLERANCE = 2e-4
MAX_EVALUATIONS = 200
BETTER = 0.01  # a fresh index that beats the carried orientation by this replaces it
RENDER_CHUNK = 1024
AVERAGED = 8  # patterns averaged into each (average_similar)
ALIKE = 0.3  # averaged patterns of one grain correlate above this (0.27-0.77), of others below (0.04-0.23)
PER_GRAIN = 8


@dataclass
class PCSearchResult:
    geometry: DetectorGeometry  # with the fitted PC
    start: DetectorGeometry
    points: int
    ncc_before: float  # mean refined NCC of the patterns at the start PC
    ncc_after: float  # ... at the fitted PC
    evaluations: int  # PCs scored (grid and polish)
    seconds: float
    search_range: float

    @property
    def shift(self) -> np.ndarray:
        return np.asarray(self.geometry.pc) - np.asarray(self.start.pc)

    @property
    def at_edge(self) -> bool:
        """The fitted PC lies beyond the searched range, in the margin the polish may use (a PC
        exactly the range off is found inside it): the true one may lie further still."""
        return bool(np.abs(self.shift).max() >= self.search_range + SIMPLEX_STEP / 2)

    def describe(self) -> str:
        before = ", ".join(f"{v:.4f}" for v in self.start.pc)
        after = ", ".join(f"{v:.4f}" for v in self.geometry.pc)
        return (f"projection centre found on {self.points} patterns in {self.seconds:.1f} s: ({before}) -> ({after}) "
                f"(Bruker), mean NCC {self.ncc_before:.3f} -> {self.ncc_after:.3f}, {self.evaluations} PCs scored")

    def report(self) -> dict:
        """What the search found, for OUT.json."""
        return {"pc": [round(v, 5) for v in self.geometry.pc], "given_pc": [round(v, 5) for v in self.start.pc],
                "convention": "bruker", "points": self.points, "mean_ncc_before": round(self.ncc_before, 5),
                "mean_ncc_after": round(self.ncc_after, 5), "evaluations": self.evaluations,
                "seconds": round(self.seconds, 2), "search_range": self.search_range}


def pattern_quality(flat: np.ndarray, working_shape) -> np.ndarray:
    """(N, P) preprocessed (zero-mean, unit-norm) patterns -> (N,) the share of their energy
    left after a Gaussian blur of one working pixel: near 1 for broad Kikuchi bands, low for
    shot noise. It does not depend on the PC, so it can choose patterns before the PC is known."""
    from scipy.ndimage import gaussian_filter

    images = flat.reshape(len(flat), *working_shape)
    return (gaussian_filter(images, (0, 1.0, 1.0), truncate=2.0) ** 2).sum(axis=(1, 2))


def average_similar(flat: np.ndarray, valid: np.ndarray, k: int = AVERAGED) -> np.ndarray:
    """Each pattern averaged with the ``k`` - 1 patterns most like it (NCC) among ``flat``, then
    normalised again: non-local averaging as in NLPAR, without a spatial window, so it needs no
    scan shape. Points of one grain repeat one pattern under different noise, so averaging k of
    them cuts the noise about sqrt(k)-fold; measured on hard-noise simulated scans 0.05 off, the
    fitted PC's largest error went from 0.005-0.014 to 0.001-0.003."""
    if k <= 1 or len(flat) < 2:
        return flat
    k = min(k, len(flat))
    similarity = flat @ flat.T
    similarity[:, ~valid] = -np.inf
    nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
    out = flat[nearest].mean(axis=1)
    out -= out.mean(axis=1, keepdims=True)
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    out[~valid] = 0.0
    return out.astype(np.float32)


def choose_patterns(flat: np.ndarray, valid: np.ndarray, working_shape, n: int = PATTERNS) -> np.ndarray:
    """Rows of ``n`` sharp valid patterns, sharpest first, at most ``PER_GRAIN`` of any one look
    (NCC above ``ALIKE`` with that many chosen) while others are left: patterns of different
    orientations pin the PC down where one grain's repeat the same information."""
    quality = np.where(valid, pattern_quality(flat, working_shape), -np.inf)
    order = [int(i) for i in np.argsort(-quality, kind="stable") if valid[i]]
    chosen: list[int] = []
    for i in order:
        if len(chosen) == n:
            break
        if not chosen or (flat[chosen] @ flat[i] > ALIKE).sum() < PER_GRAIN:
            chosen.append(i)
    rest = [i for i in order if i not in set(chosen)]
    return np.array(chosen + rest[:n - len(chosen)], dtype=np.int64)


def carry(quaternions: np.ndarray, directions_from: np.ndarray, directions_to: np.ndarray) -> np.ndarray:
    """Orientations refined with one set of detector directions -> starts for another (another
    PC): R(q') = R(q)·C, with C the rotation that best takes the new directions onto the old
    (least squares over the pixels), so each pixel keeps looking at about the same crystal
    direction."""
    from scipy.spatial.transform import Rotation

    c, _ = Rotation.align_vectors(np.asarray(directions_from, np.float64), np.asarray(directions_to, np.float64))
    x, y, z, w = c.as_quat()
    return quaternion_multiply(np.asarray(quaternions, np.float64), np.array([w, x, y, z])).astype(np.float32)


class _Patterns:
    """The chosen patterns with the refinement graphs of every phase, the PC's directions an input."""

    def __init__(self, phases, geometry: DetectorGeometry, shape, sigma: float, mask, patterns: np.ndarray, providers):
        import onnxruntime as ort

        from liveindex.models.onnx_runtime import session_options

        from .dictionary import sample_rotations
        from .refinement import build_graph

        self.patterns = patterns
        self.working = geometry.with_shape(tuple(shape))
        self.refiners, self.renderers = [], []
        for phase in phases:
            graph = build_graph(phase, geometry, tuple(shape), sigma, mask, directions_input=True)
            self.refiners.append(ort.InferenceSession(graph.SerializeToString(), session_options(1), providers=providers))
            render = build_graph(phase, geometry, tuple(shape), sigma, mask, directions_input=True,
                                 render_only=True).SerializeToString()
            self.renderers.append(ort.InferenceSession(render, session_options(1), providers=providers))
        self.rotations = [sample_rotations(phase, TEMPLATE_RESOLUTION) for phase in phases]

    def directions(self, pc) -> np.ndarray:
        from .refinement import direction_cosines

        return direction_cosines(replace(self.working, pc=tuple(float(v) for v in pc)))

    def index(self, pc) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Index the patterns from scratch at ``pc``: (N,) phase, (N, 4) refined orientation, (N,) NCC."""
        from .refiner import gauss_newton

        d = self.directions(pc)
        n = len(self.patterns)
        best_phase, best_q = np.zeros(n, np.int16), np.zeros((n, 4), np.float32)
        best_ncc = np.full(n, -np.inf, np.float32)
        for p, (refiner, renderer, rotations) in enumerate(zip(self.refiners, self.renderers, self.rotations)):
            templates = np.concatenate([renderer.run(["rendered"], {"quats": rotations[i:i + RENDER_CHUNK],
                                                                    "directions": d})[0]
                                        for i in range(0, len(rotations), RENDER_CHUNK)])
            k = min(CANDIDATES, len(rotations))
            top = np.argpartition(-(self.patterns @ templates.T), k - 1, axis=1)[:, :k]
            q, ncc = gauss_newton(refiner, np.repeat(self.patterns, k, axis=0), rotations[top.reshape(-1)], GRID_STEPS,
                                  {"directions": d})
            pick = ncc.reshape(n, k).argmax(axis=1)
            q, ncc = q.reshape(n, k, 4)[np.arange(n), pick], ncc.reshape(n, k)[np.arange(n), pick]
            better = ncc > best_ncc
            best_phase[better], best_q[better], best_ncc[better] = p, q[better], ncc[better]
        return best_phase, best_q, best_ncc

    def refine(self, pc, phase: np.ndarray, quaternions: np.ndarray, directions: np.ndarray | None = None,
               steps: int = POLISH_STEPS) -> tuple[np.ndarray, np.ndarray]:
        """Refine each pattern's orientation (of its phase) at ``pc``: (N, 4), (N,) NCC."""
        from .refiner import gauss_newton

        d = (self.directions(pc) if directions is None else directions).astype(np.float32)
        q, ncc = np.empty((len(phase), 4), np.float32), np.empty(len(phase), np.float32)
        for p, refiner in enumerate(self.refiners):
            rows = np.flatnonzero(phase == p)
            if len(rows):
                q[rows], ncc[rows] = gauss_newton(refiner, self.patterns[rows], quaternions[rows], steps,
                                                  {"directions": d})
        return q, ncc


def _grid(centre: np.ndarray, step: float) -> list[np.ndarray]:
    """``centre`` first, then the other PCs of centre + step·{-1, 0, 1}³ that are PCs at all."""
    offsets = [o for o in itertools.product((-1, 0, 1), repeat=3) if any(o)]
    return [centre] + [pc for pc in (centre + step * np.array(o) for o in offsets) if _is_pc(pc)]


def _is_pc(pc) -> bool:
    try:
        validate_pc(tuple(float(v) for v in pc))
    except ValueError:
        return False
    return True


def search_pc(flat: np.ndarray, geometry: DetectorGeometry, phases, *, working_shape, sigma: float,
              mask: np.ndarray | None = None, search_range: float = SEARCH_RANGE, threads: int = 0,
              providers=None) -> PCSearchResult:
    """The PC that best explains ``flat`` ((N, P) preprocessed patterns at ``working_shape``,
    chosen by ``choose_patterns``) within ``geometry.pc`` ± ``search_range`` in each
    coordinate; ``phases``: the phase keys the patterns may be of. ``threads`` grid PCs are
    indexed at once (0: one per core), each on one-thread ONNX sessions."""
    import os

    from scipy.optimize import minimize

    from liveindex.models.onnx_runtime import blas_threads

    if len(flat) < MIN_PATTERNS:
        raise InputError(f"the projection-centre search needs at least {MIN_PATTERNS} readable patterns; "
                         f"this scan has {len(flat)}")
    if not 0.0 < search_range <= 0.2:
        raise InputError(f"search range {search_range} must be in (0, 0.2] (a fraction of the detector width)")
    t0 = time.perf_counter()
    patterns = _Patterns(phases, geometry, working_shape, sigma, mask, flat, providers or ["CPUExecutionProvider"])
    start = np.asarray(geometry.pc, np.float64)
    nodes = _grid(start, search_range)
    with blas_threads(1), concurrent.futures.ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
        found = list(pool.map(patterns.index, nodes))
    best = max(range(len(nodes)), key=lambda i: float(found[i][2].mean()))
    _, ncc_before = patterns.refine(start, *found[0][:2])
    evaluations = [len(nodes)]

    def polish(centre: np.ndarray, phase: np.ndarray, q: np.ndarray):
        """Nelder-Mead from ``centre``, orientations carried from there; -> (pc, q, ncc)."""
        q, _ = patterns.refine(centre, phase, q)
        d_centre = patterns.directions(centre)

        def at(pc):
            d = patterns.directions(pc)
            return patterns.refine(pc, phase, carry(q, d_centre, d), d)

        def mean_ncc(pc) -> float:
            evaluations[0] += 1
            # The polish may step a simplex step beyond the grid, no further.
            if not _is_pc(pc) or np.abs(pc - start).max() > search_range + SIMPLEX_STEP:
                return -1.0
            return float(at(pc)[1].mean())

        simplex = np.vstack([centre] + [centre + SIMPLEX_STEP * np.eye(3)[i] for i in range(3)])
        result = minimize(lambda pc: -mean_ncc(pc), centre, method="Nelder-Mead",
                          options={"initial_simplex": simplex, "xatol": PC_TOLERANCE, "fatol": 1e-7,
                                   "maxfev": MAX_EVALUATIONS})
        return (result.x, *at(result.x))

    with blas_threads(1):
        pc, q, ncc = polish(nodes[best], *found[best][:2])
        phase = found[best][0]
        # Check: index from scratch at the polished PC; orientations the grid had wrong are found now.
        fresh_phase, fresh_q, _ = patterns.index(pc)
        fresh_q, fresh_ncc = patterns.refine(pc, fresh_phase, fresh_q)
        better = fresh_ncc > ncc + BETTER
        if better.any():
            log.debug("PC search: %d of %d patterns found better orientations at the polished PC; polishing again",
                      int(better.sum()), len(flat))
            phase = np.where(better, fresh_phase, phase)
            pc, q, ncc = polish(pc, phase, np.where(better[:, None], fresh_q, q))
    if ncc.mean() <= ncc_before.mean():  # nothing explains the patterns better than the start
        pc, ncc = start, ncc_before
    fitted = replace(geometry, pc=tuple(float(v) for v in pc))
    return PCSearchResult(fitted, geometry, len(flat), float(ncc_before.mean()), float(ncc.mean()), evaluations[0],
                          time.perf_counter() - t0, search_range)

"""Projection-centre refinement for one scan: fit the PC on a subset of sure points, then
index every point with it (`liveindex index --refine-pc`).

A PC off by 0.01 of the detector width moves a pattern as a rotation of about a degree
would, and the refinement then settles at orientations and NCCs that are both a little
wrong. Here the PC is the one that maximises the mean NCC of the subset's patterns, each
orientation re-refined at every candidate PC (two Gauss-Newton steps from where it was).
One Gauss-Newton graph with the detector directions as an input serves every candidate;
Nelder-Mead over the three PC values (about 60 evaluations of 0.1 s on 300 points).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np

from liveindex.models.errors import InputError

from .geometry import DetectorGeometry, validate_pc
from .refiner import gauss_newton

log = logging.getLogger(__name__)

SUBSET = 300  # sure points the PC is fitted on
STEPS_PER_CANDIDATE = 3
SIMPLEX_STEP = 0.01  # initial Nelder-Mead step, fraction of the detector
PC_TOLERANCE = 2e-4
MAX_EVALUATIONS = 120
MAX_SHIFT = 0.05  # a fitted PC further than this from the given one is not trusted


@dataclass
class PCFit:
    geometry: DetectorGeometry
    points: int
    ncc_before: float
    ncc_after: float
    evaluations: int

    def describe(self, given: DetectorGeometry) -> str:
        before = ", ".join(f"{v:.4f}" for v in given.pc)
        after = ", ".join(f"{v:.4f}" for v in self.geometry.pc)
        return (f"projection centre refined on {self.points} points: ({before}) -> ({after}) (Bruker), "
                f"mean NCC {self.ncc_before:.4f} -> {self.ncc_after:.4f} in {self.evaluations} evaluations")


def fit_pc(phase: str, geometry: DetectorGeometry, patterns: np.ndarray, quaternions: np.ndarray,
           working_shape, sigma: float, mask: np.ndarray | None = None, *, providers=None) -> PCFit:
    """The PC that maximises the mean refined NCC of ``patterns`` ((N, P) preprocessed, of one
    phase) starting from ``quaternions`` (N, 4), refined at ``geometry``'s PC."""
    import onnxruntime as ort
    from scipy.optimize import minimize

    from liveindex.models.ebsd.refinement import build_graph, direction_cosines
    from liveindex.models.onnx_runtime import session_options

    if len(patterns) < 10:
        raise InputError(f"projection-centre refinement needs at least 10 sure points; this scan has {len(patterns)}")
    graph = build_graph(phase, geometry, tuple(working_shape), sigma, mask, directions_input=True)
    session = ort.InferenceSession(graph.SerializeToString(), session_options(0),
                                   providers=providers or ["CPUExecutionProvider"])
    working = geometry.with_shape(working_shape)
    evaluations = []

    def mean_ncc(pc) -> float:
        try:
            validate_pc(pc)
        except ValueError:
            return 0.0
        directions = direction_cosines(replace(working, pc=tuple(pc)))
        _, ncc = gauss_newton(session, patterns, quaternions, STEPS_PER_CANDIDATE, {"directions": directions})
        evaluations.append(float(ncc.mean()))
        return evaluations[-1]

    start = np.asarray(geometry.pc, float)
    before = mean_ncc(start)
    simplex = np.vstack([start] + [start + SIMPLEX_STEP * np.eye(3)[i] for i in range(3)])
    best = minimize(lambda pc: -mean_ncc(pc), start, method="Nelder-Mead",
                    options={"initial_simplex": simplex, "xatol": PC_TOLERANCE, "fatol": 1e-7,
                             "maxfev": MAX_EVALUATIONS})
    pc = best.x if -best.fun > before else start
    if np.abs(pc - start).max() > MAX_SHIFT:
        raise InputError(f"the projection centre fitted on this scan, ({', '.join(f'{v:.3f}' for v in pc)}), is more "
                         f"than {MAX_SHIFT} from the given ({', '.join(f'{v:.3f}' for v in start)}); check the PC "
                         "convention (--pc-convention) and values, or index without --refine-pc")
    return PCFit(replace(geometry, pc=tuple(float(v) for v in pc)), len(patterns), before, float(max(-best.fun, before)),
                 len(evaluations))


def fit_scan_pc(indexer, frames: np.ndarray) -> PCFit:
    """Fit the PC on the sure points among ``frames`` (a scan's first points), of their most
    common phase, and make ``indexer`` (a ScanIndexer) refine at it."""
    from .indexer import CONFIDENCE_THRESHOLD

    if not indexer.refiners:
        raise InputError("--refine-pc fits the projection centre with refinement; drop --no-refine")
    background = indexer.new_background()
    first = indexer.index(frames, background)
    flat, _ = indexer.preprocess(frames, background)
    indexed = first.phase_id[first.phase_id >= 0]
    phase = int(np.bincount(indexed).argmax()) if len(indexed) else 0
    sure = np.flatnonzero((first.phase_id == phase) & (first.score >= CONFIDENCE_THRESHOLD))[:SUBSET]
    fit = fit_pc(indexer.phases[phase], indexer.geometry, flat[sure], first.quaternion[sure],
                 indexer.preprocess.working_shape, indexer.preprocess.sigma, indexer.preprocess.mask)
    indexer.refine_at(fit.geometry)
    return fit

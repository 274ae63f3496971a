"""The spot modality's per-scan indexer: centre -> polar template matching (ONNX) -> refinement
-> the 180-degree check, reliability and confidence.

- Beam centre: the setup's, else found in each frame (the direct beam's intensity-weighted
  centroid around the brightest pixel).
- Matching (matcher.py, ONNX Runtime): every phase's templates x in-plane angles, top ``TOP_K``.
- Refinement (refine.py): the best ``CANDIDATES`` candidates of each pattern are refined; the
  best refined one is the answer.
- The 180-degree ambiguity: kinematical spot patterns are centrosymmetric, so the answer
  turned 180 degrees about the beam fits (nearly) as well. Where that turn is no symmetry of
  the phase, the turned answer is refined and scored too; ``ambiguous`` is 1 where it scores
  within ``AMBIGUITY_MARGIN`` of the answer (the two cannot be told apart from the pattern).
- Reliability (as ASTAR's): 1 - Q2/Q1, Q1 the answer's score and Q2 the best of the other
  refined candidates that are another phase or another orientation (more than
  ``DISTINCT_DEG`` from the answer and from its 180-degree mate).
- Confidence: a logistic function of reliability and score (confidence.py).
"""

from __future__ import annotations

import hashlib
import logging
import time

import numpy as np

from liveindex.models.crystal import disorientation_degrees, proper_operators, quaternion_multiply

from .confidence import confidence
from .diffraction import matrices_to_quaternions, rotation_matrices, wavelength
from .matcher import GRAPH_VERSION, PolarMatcher, build_graph
from .refine import SpotRefiner
from .results import METHOD_CODES
from .templates import PolarGrid, build_library, cache_dir, in_plane, library_key

log = logging.getLogger(__name__)

CANDIDATES = 2  # refined per pattern: 4 gave the same accuracy (300 moderate patterns), 1.25x slower
AMBIGUITY_MARGIN = 0.02  # relative score: the 180-degree mate within 2% of the answer
DISTINCT_DEG = 5.0
# Below: no crystal pattern (amorphous, vacuum): not indexed. Measured on 16x16 simulated scans:
# amorphous points score at most 0.004, 0.058, 0.063 (clean, moderate, hard noise), the crystal
# points' 1st percentile 0.197, 0.138, 0.079.
MIN_SCORE = 0.07
CENTER_WINDOW = 4
TURN_180 = np.array([0.0, 0.0, 0.0, 1.0])  # 180 degrees about the beam (lab z), right-multiplied


def find_centers(frames: np.ndarray) -> np.ndarray:
    """(B, H, W) frames -> (B, 2) direct-beam centres (x, y): the intensity-weighted centroid,
    above the window's minimum, of a (2w+1)^2 window around each frame's brightest pixel."""
    b, h, w = frames.shape
    flat = frames.reshape(b, -1)
    peak = flat.argmax(1)
    py, px = np.divmod(peak, w)
    off = np.arange(-CENTER_WINDOW, CENTER_WINDOW + 1)
    ys = np.clip(py[:, None, None] + off[None, :, None], 0, h - 1)
    xs = np.clip(px[:, None, None] + off[None, None, :], 0, w - 1)
    win = frames[np.arange(b)[:, None, None], ys, xs].astype(np.float64)
    win -= win.min(axis=(1, 2), keepdims=True)
    total = np.maximum(win.sum(axis=(1, 2)), 1e-12)
    cx = (win * xs).sum(axis=(1, 2)) / total
    cy = (win * ys).sum(axis=(1, 2)) / total
    return np.stack([cx, cy], 1)


class SpotIndexer:
    """One setup's and phase list's libraries, matcher graph and refiners; ``index`` a page."""

    def __init__(self, setup: dict, phases, pattern_shape, *, resolution: float = 2.0, refine: bool = True,
                 min_confidence: float = 0.0, providers: str = "auto", threads: int = 0):
        start = time.perf_counter()
        self.setup, self.phases = dict(setup), list(phases)
        self.pattern_shape = tuple(int(n) for n in pattern_shape)
        self.refine_answers, self.min_confidence = refine, min_confidence
        self.grid = PolarGrid.for_shape(self.pattern_shape)
        libraries = [build_library(p, self.setup, self.pattern_shape, self.grid, resolution) for p in self.phases]
        self.template_q = np.concatenate([lib.quaternions for lib in libraries])
        self.template_phase = np.concatenate([np.full(lib.size, i, np.int16) for i, lib in enumerate(libraries)])
        keys = [library_key(p, self.setup, self.pattern_shape, self.grid, resolution) for p in self.phases]
        key = "|".join(keys) + str(self.setup["ellipticity"]) + GRAPH_VERSION  # the graph's code too (matcher.py)
        digest = hashlib.sha256(key.encode()).hexdigest()[:20]
        path = cache_dir() / f"matcher-{digest}.onnx"
        if not path.is_file():
            build_graph(path, np.concatenate([lib.real for lib in libraries]),
                        np.concatenate([lib.imag for lib in libraries]), self.grid, self.pattern_shape,
                        self.setup["ellipticity"])
        self.matcher = PolarMatcher(path, self.pattern_shape, self.grid, self.setup["ellipticity"],
                                    providers=providers, threads=threads)
        lam = wavelength(self.setup["kv"])
        self.refiners = [SpotRefiner(p, self.setup, self.grid, lam) for p in self.phases]
        self.model_name = (f"spots polar matching ({len(self.template_q)} templates at {resolution:g} deg, "
                           f"{self.matcher.provider})" + (" + refinement" if refine else ""))
        log.info("spot indexer ready in %.1f s: %s", time.perf_counter() - start, self.model_name)

    def index(self, frames: np.ndarray) -> dict[str, np.ndarray]:
        frames = np.asarray(frames)
        b = len(frames)
        data = frames.astype(np.float32)
        given = self.setup.get("center")
        centers = np.tile(np.float64(given), (b, 1)) if given is not None else find_centers(data)
        scores, templates, angles, polar = self.matcher.match(data, centers)
        c = min(CANDIDATES, scores.shape[1]) if self.refine_answers else 1
        cand_q = in_plane(self.template_q[templates[:, :c]].reshape(-1, 4), angles[:, :c].reshape(-1))
        cand_p = self.template_phase[templates[:, :c]].reshape(-1)
        rows = np.repeat(np.arange(b), c)
        if self.refine_answers:
            cand_q, cand_s = self._refine(cand_q, cand_p, polar, rows)
        else:
            cand_s = scores[:, :c].reshape(-1).astype(np.float64)
        cand_q, cand_s = cand_q.reshape(b, c, 4), cand_s.reshape(b, c)
        cand_p = cand_p.reshape(b, c)
        pick = cand_s.argmax(1)
        q = cand_q[np.arange(b), pick]
        phase = cand_p[np.arange(b), pick].astype(np.int16)
        q1 = cand_s[np.arange(b), pick]
        ambiguous = np.zeros(b, np.uint8)
        mate_q = quaternion_multiply(q, TURN_180)
        if self.refine_answers:
            mate_q, mate_s = self._refine(mate_q, phase, polar, np.arange(b))
            swap = mate_s > q1  # the turned answer fits better: take it
            q = np.where(swap[:, None], mate_q, q)
            mate_q = np.where(swap[:, None], cand_q[np.arange(b), pick], mate_q)
            mate_s, q1 = np.minimum(mate_s, q1), np.maximum(mate_s, q1)
            distinct = self._apart(q, mate_q, phase) > DISTINCT_DEG
            ambiguous = (distinct & (mate_s >= q1 * (1 - AMBIGUITY_MARGIN))).astype(np.uint8)
        q2 = np.zeros(b)
        for j in range(c):
            other = (cand_p[:, j] != phase) | ((self._apart(cand_q[:, j], q, phase) > DISTINCT_DEG)
                                               & (self._apart(cand_q[:, j], mate_q, phase) > DISTINCT_DEG))
            q2 = np.where(other, np.maximum(q2, cand_s[:, j]), q2)
        refined_reliability = np.clip(1.0 - q2 / np.maximum(q1, 1e-12), 0.0, 1.0)
        reliability = self._match_reliability(scores, templates)
        explained = self._explained(q, phase, polar)
        conf = confidence(reliability, refined_reliability, q1, explained)
        indexed = (q1 >= MIN_SCORE) & (conf >= self.min_confidence)
        method = np.where(indexed, METHOD_CODES["refined" if self.refine_answers else "template"],
                          METHOD_CODES["none"]).astype(np.uint8)
        q = q * np.where(q[:, :1] < 0, -1.0, 1.0)
        return {
            "phase_id": np.where(indexed, phase, -1).astype(np.int16),
            "quaternion": np.where(indexed[:, None], q, (1.0, 0.0, 0.0, 0.0)).astype(np.float32),
            "confidence": np.where(indexed, conf, 0.0).astype(np.float32),
            "method": method,
            "reliability": np.where(indexed, reliability, 0.0).astype(np.float32),
            "ambiguous": np.where(indexed, ambiguous, 0).astype(np.uint8),
            "score": q1.astype(np.float32),
            "explained": explained.astype(np.float32),
            "fit": np.where(indexed, 1.0 - q1, np.nan).astype(np.float32),
            "iq": spot_quality(polar),
            "vbf": virtual_bright_field(data, centers),
            "center": centers.astype(np.float32),
        }

    def _match_reliability(self, scores: np.ndarray, templates: np.ndarray) -> np.ndarray:
        """ASTAR's reliability on the matching scores: 1 - S2/S1, S1 the best template's score and
        S2 the best of the top-K templates that are another phase or another beam direction
        (more than DISTINCT_DEG away: neighbours on the grid are the same solution)."""
        b, k = templates.shape
        q = self.template_q[templates.reshape(-1)].reshape(b, k, 4)
        phase = self.template_phase[templates]
        v = _beam_directions(q)  # (b, k, 3)
        cos = np.cos(np.deg2rad(DISTINCT_DEG))
        same = np.zeros((b, k), bool)
        for p, record in enumerate(self.phases):
            ops = rotation_matrices(proper_operators(record.space_group))  # (S, 3, 3)
            orbit = np.einsum("sij,bj->bsi", ops, v[:, 0])  # (b, S, 3) the best's equivalent directions
            near = np.abs(np.einsum("bsi,bki->bks", orbit, v)).max(2) >= cos  # +-v: the same pattern
            same |= (phase == p) & (phase[:, :1] == p) & near
        s2 = np.where(same, -np.inf, scores).max(1)
        s2 = np.where(np.isfinite(s2), s2, 0.0)
        return np.clip(1.0 - s2 / np.maximum(scores[:, 0], 1e-12), 0.0, 1.0)

    def _explained(self, q: np.ndarray, phase: np.ndarray, polar: np.ndarray) -> np.ndarray:
        out = np.zeros(len(q))
        matrices = rotation_matrices(q)
        for p, refiner in enumerate(self.refiners):
            mine = np.flatnonzero(phase == p)
            if len(mine):
                out[mine] = refiner.explained(matrices[mine], polar, mine)
        return out

    def _refine(self, q: np.ndarray, phase: np.ndarray, polar: np.ndarray, rows: np.ndarray):
        matrices = rotation_matrices(q)
        out, score = matrices.copy(), np.zeros(len(q))
        for p, refiner in enumerate(self.refiners):
            mine = phase == p
            if mine.any():
                out[mine], score[mine] = refiner.refine(matrices[mine], polar, rows[mine])
        return matrices_to_quaternions(out), score

    def _apart(self, a: np.ndarray, b: np.ndarray, phase: np.ndarray) -> np.ndarray:
        """Disorientation in degrees of a and b, each pair with its phase's symmetry."""
        out = np.zeros(len(a))
        for p, record in enumerate(self.phases):
            mine = phase == p
            if mine.any():
                out[mine] = disorientation_degrees(a[mine], b[mine], proper_operators(record.space_group))
        return out


def _beam_directions(q: np.ndarray) -> np.ndarray:
    """(..., 4) orientations -> (..., 3) crystal directions along the beam (R @ e_z)."""
    w, x, y, z = np.moveaxis(q, -1, 0)
    return np.stack([2 * (x * z + w * y), 2 * (y * z - w * x), 1 - 2 * (x * x + y * y)], -1)


def spot_quality(polar: np.ndarray) -> np.ndarray:
    """(B, R, A) polar images (unit norm, background removed) -> (B,) sharpness: the fraction of
    the image's energy in its brightest 1% of samples (spots: high; noise and rings: low)."""
    flat = polar.reshape(len(polar), -1)
    top = max(1, flat.shape[1] // 100)
    part = np.partition(flat**2, flat.shape[1] - top, axis=1)[:, -top:]
    return part.sum(1).astype(np.float32)


def virtual_bright_field(frames: np.ndarray, centers: np.ndarray, radius: float = 4.0) -> np.ndarray:
    """(B,) summed counts within ``radius`` pixels of the beam centre: the virtual bright-field image.
    Read on a (2k+1)^2 window around each centre rather than a disc mask over the whole frame:
    0.24 -> 0.007 ms a pattern (256 moderate patterns, load 4-5), the same sums (also at the edges)."""
    b, h, w = frames.shape
    k = int(np.ceil(radius + 0.5))
    off = np.arange(-k, k + 1)
    xs = np.rint(centers[:, 0]).astype(np.int64)[:, None, None] + off[None, None, :]  # (B, 1, 2k+1)
    ys = np.rint(centers[:, 1]).astype(np.int64)[:, None, None] + off[None, :, None]  # (B, 2k+1, 1)
    disc = ((xs - centers[:, 0, None, None]) ** 2 + (ys - centers[:, 1, None, None]) ** 2) <= radius**2
    disc &= (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
    win = frames[np.arange(b)[:, None, None], np.clip(ys, 0, h - 1), np.clip(xs, 0, w - 1)]
    return (win * disc).sum(axis=(1, 2)).astype(np.float32)

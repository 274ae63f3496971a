"""The spot modality's per-scan indexer: centre -> polar template matching (ONNX) -> refinement
-> the 180-degree check, reliability and confidence.

- Beam centre: the setup's, else found in each frame (the direct beam's intensity-weighted
  centroid around the brightest pixel).
- Matching (matcher.py, ONNX Runtime): every phase's templates x in-plane angles, top ``TOP_K``.
- Refinement (refine.py) on the polar image blurred by ``SPOT_BLUR_PX`` (blur_polar), the answer's
  score on the unblurred one: the best ``CANDIDATES`` candidates of each pattern and each one turned
  180 degrees about the beam are refined at the coarse steps (``COARSE_STEPS``), the best
  ``REFINED`` of those at the fine steps; the best refined one is the answer. The turned starts
  matter: the matcher's even harmonics cannot tell a template from its turned twin, and from
  the wrong twin the refinement climbs to a nearby optimum (about the same spots, the tilt a few
  degrees off) instead of the truth.
- The zone axis' turn: the answer turned 180 degrees about the low-index zone axis nearest its
  beam (a zone layer's pattern is its own 180-degree twin, Friedel's law) is refined at
  ``ZONE_STEPS``; the better of the two is the answer.
- The 180-degree ambiguity: kinematical spot patterns are centrosymmetric, so the answer
  turned 180 degrees about the beam fits (nearly) as well. Where that turn is no symmetry of
  the phase, the turned answer is refined and scored too; ``ambiguous`` is 1 where it scores
  within ``AMBIGUITY_MARGIN`` of the answer (the two cannot be told apart from the pattern).
- Reliability (as ASTAR's): 1 - Q2/Q1, Q1 the answer's score and Q2 the best of the other
  refined candidates (and the zone-turned answer) that are another phase or another orientation (more than
  ``DISTINCT_DEG`` from the answer and from its 180-degree mate).
- Confidence: a logistic function of reliability and score (confidence.py).
"""

from __future__ import annotations

import hashlib
import logging
import time

import numpy as np

from liveindex.models.crystal import disorientation_degrees, proper_operators, quaternion_multiply

from .confidence import confidence, listed
from .diffraction import matrices_to_quaternions, rotation_matrices, wavelength
from .matcher import GRAPH_VERSION, PolarMatcher, build_graph
from .refine import STEPS_DEG, SpotRefiner
from .results import METHOD_CODES
from .templates import PolarGrid, build_library, cache_dir, in_plane, library_key

log = logging.getLogger(__name__)

# Matched candidates refined per pattern, each also turned 180 degrees about the beam. 2 (4 starts)
# against the single-start refinement of 2: within 3 deg mod 180 85.2 -> 88.0%, 87.8 -> 89.5%,
# 85.5 -> 90.5% (400 moderate patterns, seeds 7, 11, 8), hard seed 7 86.2 -> 90.0%; 4 starts
# without the turned ones lost 1.8-2.4 points. With the zone turn (below), on those four sets:
# 2 candidates 90.1% on average, 3 91.0%, 4 91.7%, 6 92.5% (right phase 98.5-98.8% on the
# moderate sets against 98.0-98.5%), 8 92.6%; 6 cost 1.2x the CPU time after the matcher of 4.
# With the blurred image (SPOT_BLUR_PX), 6 -> 8: 93.9 -> 94.4% on the four sets but 93.75 -> 93.9% on
# 1200 moderate patterns of seed 7, at 1.15x the CPU after the matcher: not taken.
CANDIDATES = 6
COARSE_STEPS = (2.0, 1.0)  # degrees: the first on every start, the rest on those within COARSE_KEEP
# After the first coarse step, a start below this share of its pattern's best start seldom wins:
# 1200 moderate patterns, seeds 7 and 11, 0.9 kept about 62% of the starts for the 1-degree step,
# with the same figures (93.75% / 95.17% within 3 deg mod 180); 0.95 (about 43%) 93.83% / 95.0%.
COARSE_KEEP = 0.9
FINE_STEPS = (0.5, 0.25, 0.125)  # degrees: the best REFINED starts of each pattern
REFINED = 2
# The answer turned about its zone axis, refined from 1 degree: with 2 candidates 89.5 -> 90.1% within
# 3 deg mod 180 on the four sets above; 3 zone axes (index <= 3) 90.4% at 1.5x the refinement.
ZONE_STEPS = (1.0, 0.5, 0.25, 0.125)
# Detector pixels: the refinement reads its image blurred by this Gaussian (blur_polar). 400-pattern
# sets (moderate seeds 7, 11, 8, hard seed 7), within 3 deg mod 180 on average: 92.75% unblurred,
# 93.8% at 0.7, 93.9% at 1.0, 93.8% at 1.5 (6 candidates); median error 0.38 -> 0.34 deg (hard 0.61 -> 0.42).
SPOT_BLUR_PX = 1.0
AMBIGUITY_MARGIN = 0.02  # relative score: the 180-degree mate within 2% of the answer
DISTINCT_DEG = 5.0
# Below: no crystal pattern (amorphous, vacuum): not indexed. Measured on 16x16 simulated scans:
# amorphous points score at most 0.004, 0.058, 0.063 (clean, moderate, hard noise), the crystal
# points' 1st percentile 0.197, 0.138, 0.079.
MIN_SCORE = 0.07
CENTER_WINDOW = 4
PHASE_TRUST = 0.9  # the classifier's phase probability above which it restricts the candidates
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
                 min_confidence: float = 0.0, providers: str = "auto", threads: int = 0, bundle=None):
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
        self.network = network_first_pass(bundle, self.setup, self.phases, self.pattern_shape, resolution, libraries,
                                          providers=providers, threads=threads)
        if self.network is not None:
            self.model_name = f"spots networks ({self.network.networks.bundle.folder.name} bundle) + " + self.model_name
        log.info("spot indexer ready in %.1f s: %s", time.perf_counter() - start, self.model_name)

    def index(self, frames: np.ndarray, *, with_features: bool = False) -> dict[str, np.ndarray]:
        """A page of frames -> the result fields; ``with_features`` adds the confidence's inputs that
        are no field (``refined_reliability``), for benchmarks/calibrate_spots_confidence.py."""
        frames = np.asarray(frames)
        b = len(frames)
        data = frames.astype(np.float32)
        given = self.setup.get("center")
        centers = np.tile(np.float64(given), (b, 1)) if given is not None else find_centers(data)
        scores, templates, angles, polar = self.matcher.match(data, centers)
        if self.network is not None:
            scores, templates, angles = merge_network_candidates(self.network, scores, templates, angles, polar)
        c = min(CANDIDATES, scores.shape[1]) if self.refine_answers else 1
        cand_q = in_plane(self.template_q[templates[:, :c]].reshape(-1, 4), angles[:, :c].reshape(-1))
        cand_p = self.template_phase[templates[:, :c]].reshape(-1)
        if self.refine_answers:
            blurred = blur_polar(polar, SPOT_BLUR_PX, self.grid.r_min)
            cand_q, cand_p, cand_s = self._refine_candidates(cand_q.reshape(b, c, 4), cand_p.reshape(b, c), blurred)
            c = cand_p.shape[1]
        else:
            cand_s = scores[:, :c].reshape(-1).astype(np.float64)
        cand_q, cand_s = cand_q.reshape(b, c, 4), cand_s.reshape(b, c)
        cand_p = cand_p.reshape(b, c)
        pick = cand_s.argmax(1)
        q = cand_q[np.arange(b), pick]
        phase = cand_p[np.arange(b), pick].astype(np.int16)
        q1 = cand_s[np.arange(b), pick]
        ambiguous = np.zeros(b, np.uint8)
        alternatives = [(cand_p[:, j], cand_q[:, j], cand_s[:, j]) for j in range(c)]
        if self.refine_answers:
            # Near a zone axis the pattern is mostly that zone's layer, which looks the same after
            # a 180-degree turn about the axis (Friedel's law): the answer so turned (about 2x its
            # tilt from the axis away) is refined too, the better of the two kept, the other one
            # the second solution of the refined reliability, which tells the confidence.
            zone_q, zone_s = self._refine(self._zone_turns(q, phase), phase, blurred, np.arange(b), ZONE_STEPS)
            better = zone_s > q1
            q, zone_q = np.where(better[:, None], zone_q, q), np.where(better[:, None], q, zone_q)
            q1, zone_s = np.maximum(zone_s, q1), np.minimum(zone_s, q1)
            alternatives.append((phase, zone_q, zone_s))
        mate_q = quaternion_multiply(q, TURN_180)
        if self.refine_answers:
            answer_q = q
            mate_q, mate_s = self._refine(mate_q, phase, blurred, np.arange(b))
            swap = mate_s > q1  # the turned answer fits better: take it
            q = np.where(swap[:, None], mate_q, q)
            mate_q = np.where(swap[:, None], answer_q, mate_q)
            mate_s, q1 = np.minimum(mate_s, q1), np.maximum(mate_s, q1)
            distinct = self._apart(q, mate_q, phase) > DISTINCT_DEG
            ambiguous = (distinct & (mate_s >= q1 * (1 - AMBIGUITY_MARGIN))).astype(np.uint8)
        q2 = np.zeros(b)
        for other_p, other_q, other_s in alternatives:
            other = (other_p != phase) | ((self._apart(other_q, q, phase) > DISTINCT_DEG)
                                          & (self._apart(other_q, mate_q, phase) > DISTINCT_DEG))
            q2 = np.where(other, np.maximum(q2, other_s), q2)
        refined_reliability = np.clip(1.0 - q2 / np.maximum(q1, 1e-12), 0.0, 1.0)
        reliability = self._match_reliability(scores, templates)
        explained = self._explained(q, phase, polar)
        # The answer's score on the unblurred image: the field, MIN_SCORE's and the confidence's scale
        # (measured before the refinement read a blurred image; blurring lowers every score).
        score = self._score(q, phase, polar, np.arange(b)) if self.refine_answers else q1
        conf = confidence(reliability, refined_reliability, score, explained)
        indexed = (score >= MIN_SCORE) & (conf >= self.min_confidence)
        method = np.where(indexed, METHOD_CODES["refined" if self.refine_answers else "template"],
                          METHOD_CODES["none"]).astype(np.uint8)
        q = q * np.where(q[:, :1] < 0, -1.0, 1.0)
        extra = {"refined_reliability": refined_reliability.astype(np.float32)} if with_features else {}
        return extra | {
            "phase_id": np.where(indexed, phase, -1).astype(np.int16),
            "quaternion": np.where(indexed[:, None], q, (1.0, 0.0, 0.0, 0.0)).astype(np.float32),
            "confidence": np.where(indexed, conf, 0.0).astype(np.float32),
            "method": method,
            "reliability": np.where(indexed, reliability, 0.0).astype(np.float32),
            "ambiguous": np.where(indexed, ambiguous, 0).astype(np.uint8),
            "score": score.astype(np.float32),
            "explained": explained.astype(np.float32),
            "listed": listed(reliability, refined_reliability, score, explained),
            "fit": np.where(indexed, 1.0 - score, np.nan).astype(np.float32),
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

    def _zone_turns(self, q: np.ndarray, phase: np.ndarray) -> np.ndarray:
        """(B, 4) answers -> (B, 4) each turned 180 degrees about the low-index zone axis nearest
        its beam direction."""
        out = np.array(q, np.float64)
        for p, refiner in enumerate(self.refiners):
            mine = np.flatnonzero(phase == p)
            if not len(mine):
                continue
            axes = refiner.zone_axes  # (Z, 3) unit, crystal frame
            m = rotation_matrices(q[mine])
            beam = m[:, :, 2]  # R @ e_z: the beam in the crystal frame
            u = axes[np.abs(beam @ axes.T).argmax(1)]  # (n, 3)
            lab_u = np.einsum("nij,ni->nj", m, u)  # R.T u
            turn = 2 * lab_u[:, :, None] * lab_u[:, None, :] - np.eye(3)  # 180 degrees about lab_u
            out[mine] = matrices_to_quaternions(m @ turn)
        return out

    def _refine_candidates(self, q: np.ndarray, phase: np.ndarray, polar: np.ndarray):
        """(B, c, 4) matched candidates and their (B, c) phases -> the best ``REFINED`` of them and
        their 180-degree turns after the coarse steps, refined at the fine steps: (B*k, 4)
        orientations, (B, k) phases, (B*k,) scores."""
        b, c = phase.shape
        starts_q = np.concatenate([q, quaternion_multiply(q.reshape(-1, 4), TURN_180).reshape(b, c, 4)], 1)
        starts_p = np.concatenate([phase, phase], 1)
        rows = np.repeat(np.arange(b), 2 * c)
        coarse_q, coarse_s = self._refine(starts_q.reshape(-1, 4), starts_p.reshape(-1), polar, rows, COARSE_STEPS[:1],
                                          coarse=True)
        # The next coarse step only for the starts that came within COARSE_KEEP of their pattern's best
        best_of_pattern = coarse_s.reshape(b, 2 * c).max(1)
        near = np.flatnonzero(coarse_s >= COARSE_KEEP * best_of_pattern[rows])
        if len(COARSE_STEPS) > 1 and len(near):
            coarse_q[near], coarse_s[near] = self._refine(coarse_q[near], starts_p.reshape(-1)[near], polar, rows[near],
                                                          COARSE_STEPS[1:], coarse=True)
        k = min(REFINED, 2 * c)
        best = np.argsort(-coarse_s.reshape(b, 2 * c), axis=1, kind="stable")[:, :k]
        kept_q = np.take_along_axis(coarse_q.reshape(b, 2 * c, 4), best[..., None], 1).reshape(-1, 4)
        kept_p = np.take_along_axis(starts_p, best, 1)
        fine_q, fine_s = self._refine(kept_q, kept_p.reshape(-1), polar, np.repeat(np.arange(b), k), FINE_STEPS)
        return fine_q, kept_p, fine_s

    def _score(self, q: np.ndarray, phase: np.ndarray, polar: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """(n, 4) orientations and phases -> (n,) refinement scores on ``polar``, without moving them."""
        matrices = rotation_matrices(q)
        score = np.zeros(len(q))
        for p, refiner in enumerate(self.refiners):
            mine = phase == p
            if mine.any():
                g, f2 = refiner._subset(matrices[mine])
                score[mine] = refiner.score(matrices[mine], g, f2, polar, rows[mine])
        return score

    def _refine(self, q: np.ndarray, phase: np.ndarray, polar: np.ndarray, rows: np.ndarray, steps=STEPS_DEG,
                coarse: bool = False):
        matrices = rotation_matrices(q)
        out, score = matrices.copy(), np.zeros(len(q))
        for p, refiner in enumerate(self.refiners):
            mine = phase == p
            if mine.any():
                out[mine], score[mine] = refiner.refine(matrices[mine], polar, rows[mine], steps, coarse)
        return matrices_to_quaternions(out), score

    def _apart(self, a: np.ndarray, b: np.ndarray, phase: np.ndarray) -> np.ndarray:
        """Disorientation in degrees of a and b, each pair with its phase's symmetry."""
        out = np.zeros(len(a))
        for p, record in enumerate(self.phases):
            mine = phase == p
            if mine.any():
                out[mine] = disorientation_degrees(a[mine], b[mine], proper_operators(record.space_group))
        return out


# -- the network first pass (network.py): kept apart from the matching and refinement above --------

def network_first_pass(bundle, setup: dict, phases, pattern_shape, resolution: float, libraries, *,
                       providers: str = "auto", threads: int = 0):
    """The bundle's networks where the bundle covers the scan (its setup and every phase of the
    scan), else None: template matching alone, and the log says why. ``bundle``: None (no
    network), "default" (the shipped one) or a bundle folder."""
    if bundle is None:
        return None
    from .network import Bundle, NetworkFirstPass, SpotNetworks

    loaded = Bundle.load(None if bundle == "default" else bundle)
    mapping, why = loaded.covers(setup, phases, pattern_shape, resolution)
    if why:
        log.info("spot network bundle %s does not cover this scan (%s): template matching alone", loaded.folder, why)
        return None
    left_out = [r.name for r, m in zip(phases, mapping) if m is None]
    if left_out:  # its classifier would put those phases' patterns in one of its own
        log.info("spot network bundle %s does not know %s: template matching alone", loaded.folder, ", ".join(left_out))
        return None
    offsets = np.cumsum([0] + [lib.size for lib in libraries])[:-1]
    first_pass = NetworkFirstPass(SpotNetworks(loaded, providers=providers, threads=threads), mapping, offsets,
                                  np.concatenate([lib.real for lib in libraries]),
                                  np.concatenate([lib.imag for lib in libraries]))
    first_pass.template_phase = np.concatenate([np.full(lib.size, i, np.int16) for i, lib in enumerate(libraries)])
    return first_pass


def merge_network_candidates(network, scores: np.ndarray, templates: np.ndarray, angles: np.ndarray,
                             polar: np.ndarray):
    """The classifier restricts the candidates: where it gives a phase at least ``PHASE_TRUST``,
    the matcher's candidates of that phase move to the front (in their order),
    and where fewer than ``CANDIDATES`` of them are among its top K the orientation network's
    best templates of that phase fill in. Elsewhere the matcher's candidates stand (the fallback)."""
    scan_probs, features = network.phase_probabilities(polar)
    b, k = templates.shape
    chosen = scan_probs.argmax(1)
    trusted = scan_probs.max(1) >= PHASE_TRUST
    mine = network.template_phase[templates] == chosen[:, None]
    order = np.argsort(~mine, axis=1, kind="stable")  # the chosen phase's first, each group in the matcher's order
    rows = np.arange(b)[:, None]
    scores_r, templates_r, angles_r = scores[rows, order], templates[rows, order], angles[rows, order]
    short = np.flatnonzero(trusted & (mine.sum(1) < CANDIDATES))
    if len(short):  # the orientation network's templates after the matcher's few of the phase
        net_templates, net_angles, net_scores = network.candidates(polar[short], features[short], chosen[short])
        for i, row in enumerate(short):
            have = int(mine[row].sum())
            fill = [j for j in range(net_templates.shape[1]) if net_templates[i, j] not in templates_r[row, :have]]
            take = fill[:CANDIDATES - have]
            at = slice(have, have + len(take))
            templates_r[row, at], angles_r[row, at], scores_r[row, at] = (net_templates[i, take], net_angles[i, take],
                                                                         net_scores[i, take])
    keep = trusted[:, None]
    return (np.where(keep, scores_r, scores), np.where(keep, templates_r, templates), np.where(keep, angles_r, angles))


def blur_polar(polar: np.ndarray, sigma_px: float, r_min: float) -> np.ndarray:
    """(B, R, A) polar images (one radial bin a pixel, radii from ``r_min``) -> the same blurred
    by a round Gaussian of ``sigma_px`` detector pixels: radially over sigma_px bins, along the
    angle over sigma_px / r radians at radius r (a product in the angular Fourier domain). The
    refinement reads the image at the predicted spot centres: blurred, a read sums the spot's
    counts around its centre (a matched filter) instead of one noisy sample."""
    from scipy import fft
    from scipy.ndimage import gaussian_filter1d

    # float32 and scipy's FFT: 2x less CPU than numpy's float64 (about 17 ms a page of 64, 0.3 ms a pattern)
    out = gaussian_filter1d(np.asarray(polar, np.float32), sigma_px, axis=1, mode="nearest")
    n_a = polar.shape[2]
    radii = r_min + np.arange(polar.shape[1])
    sigma_bins = sigma_px / radii * n_a / (2 * np.pi)
    freq = 2 * np.pi * np.fft.rfftfreq(n_a)  # radians a bin
    transfer = np.exp(-0.5 * (freq[None, :] * sigma_bins[:, None]) ** 2).astype(np.float32)
    return fft.irfft(fft.rfft(out, axis=2) * transfer[None], n=n_a, axis=2).astype(polar.dtype)


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

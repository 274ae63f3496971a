"""Orientation refinement: a few Gauss-Newton steps on the NCC against rendered patterns.

The ONNX graphs (models/refinement.py) render each candidate orientation's pattern from the
master pattern for the scan's geometry and return the NCC with its Gauss-Newton system;
this module solves the 3x3 systems and steps. Measured in docs/research/refine-spike:
Gauss-Newton reaches the accuracy of a 14-step local search about 5x faster.

One coarse step (patterns binned 2x2) and two at the working size are enough at every noise
level thanks to two details: each step is divided by the
current NCC (at low NCC, JᵀJ overestimates the NCC's curvature by 1/NCC, so raw steps are
that much too short), and steps are capped at ``MAX_STEP_DEG`` so a bad start cannot fly off.
"""

from __future__ import annotations

import logging

import numpy as np

from liveindex.models.crystal import quaternion_multiply

from .geometry import DetectorGeometry

log = logging.getLogger(__name__)

# One step at half the working size (a quarter of the pixels, a quarter of the cost), then
# two at the working size: measured against three at the working size on the side-by-side
# sets, the same accuracy (moderate median 0.180 against 0.185 deg, hard 97.25% both) at
# 1.1-1.2x the speed; one coarse and one fine step lost hard-noise points (93%).
COARSE_ITERATIONS = 1
ITERATIONS = 2
MAX_STEP_DEG = 2.0
# Then FINE_ITERATIONS steps at the frames' own resolution (models/ebsd/fine_refinement.py),
# each at most FINE_MAX_STEP_DEG: they polish an answer found at the working size, and a
# point whose answer is wrong must not be carried far by them.
FINE_ITERATIONS = 1
FINE_MAX_STEP_DEG = 1.0
# Rows per graph run: the graph's intermediates for 64 patterns stay in the core's cache, and
# its elementwise ops run 2-3x faster there than streaming 256 rows through memory
# (one evaluation: 47 against 69 us a row).
BATCH = 64
DAMPING = 1e-3  # Levenberg-Marquardt term, relative to the trace of JᵀJ


def rotation_vector_quaternions(theta: np.ndarray) -> np.ndarray:
    """(..., 3) rotation vectors in radians -> (..., 4) unit quaternions."""
    angle = np.linalg.norm(theta, axis=-1, keepdims=True)
    scale = np.where(angle > 1e-12, np.sin(angle / 2) / np.maximum(angle, 1e-12), 0.5)
    return np.concatenate([np.cos(angle / 2), theta * scale], -1)


class Refiner:
    """Refines orientations of one phase for one scan geometry, at the working pattern size."""

    def __init__(self, phase: str, geometry: DetectorGeometry, working_shape, sigma: float, *,
                 providers: list[str], threads: int = 0, iterations: int = ITERATIONS, mask=None,
                 fine_shape=None, fine_mask=None):
        from .compiled_refinement import CompiledSystem

        self.iterations = iterations
        self.phase = phase
        self.working_shape = tuple(working_shape)
        h, w = self.working_shape
        # The coarse level bins the working patterns 2x2; with a signal mask, or an odd or
        # small working size, refinement stays at the working size only.
        coarse = mask is None and h % 2 == 0 and w % 2 == 0 and min(h, w) >= 16
        # On the CPU the compiled system (models/ebsd/compiled_refinement.py: the graph's numbers,
        # 2.3x faster a 30x30 step, 2.5x a render); elsewhere the ONNX graphs. Renders (every
        # answer's confidence, the page rescue's screening) need no derivatives: on the graph
        # path, a graph without them (ONNX Runtime runs every node, whatever is asked for).
        if list(providers) == ["CPUExecutionProvider"]:
            self.gn_session = CompiledSystem(phase, geometry, self.working_shape, sigma, mask)
            self.coarse_session = CompiledSystem(phase, geometry, (h // 2, w // 2), sigma / 2) if coarse else None
            self.render_session = None
        else:
            import onnxruntime as ort

            from liveindex.models.ebsd.refinement import build_graph
            from liveindex.models.onnx_runtime import session_options

            def session(shape, sigma, mask, **kind):
                graph = build_graph(phase, geometry, shape, sigma, mask, **kind)
                return ort.InferenceSession(graph.SerializeToString(), session_options(threads), providers=providers)

            self.gn_session = session(self.working_shape, sigma, mask)
            self.coarse_session = session((h // 2, w // 2), sigma / 2, None) if coarse else None
            self.render_session = session(self.working_shape, sigma, mask, render_only=True)
        # The last steps at the frames' own resolution, where that is finer than the working size
        # (compiled: 8x faster than the graph there; see models/ebsd/compiled_refinement.py).
        self.fine = None
        if fine_shape is not None and tuple(fine_shape) != self.working_shape:
            self.fine = CompiledSystem(phase, geometry, tuple(fine_shape), fine_shape[1] / 8, fine_mask,
                                       high_pass=False)

    def warm_up(self) -> None:
        """Run a full batch through every graph so the first page does not pay for allocation."""
        rng = np.random.default_rng(0)
        q = rng.normal(size=(BATCH, 4)).astype(np.float32)
        self.render(q / np.linalg.norm(q, axis=1, keepdims=True))
        self.refine(rng.normal(size=(BATCH, int(np.prod(self.working_shape)))).astype(np.float32),
                    q / np.linalg.norm(q, axis=1, keepdims=True))
        if self.fine is not None:  # compiles, or loads from numba's cache, the fine system
            self.polish(rng.normal(size=(2, int(np.prod(self.fine.shape)))).astype(np.float32),
                        q[:2] / np.linalg.norm(q[:2], axis=1, keepdims=True))

    def coarse(self, patterns: np.ndarray) -> np.ndarray:
        """(B, P) working patterns -> (B, P/4): binned 2x2, zero-mean, unit-norm (binning and the
        background blur nearly commute, so the coarse graph high-passes at half the sigma)."""
        h, w = self.working_shape
        binned = patterns.reshape(len(patterns), h // 2, 2, w // 2, 2).mean(axis=(2, 4)).reshape(len(patterns), -1)
        binned -= binned.mean(axis=1, keepdims=True)
        binned /= np.maximum(np.linalg.norm(binned, axis=1, keepdims=True), 1e-12)
        return binned.astype(np.float32)

    def render(self, quaternions: np.ndarray) -> np.ndarray:
        """(K, 4) orientations -> (K, P) their patterns at the working size, preprocessed as live
        frames are (zero mean, unit norm): a dot product with a frame is their NCC."""
        if self.render_session is None:
            return self.gn_session.render(quaternions)
        # In BATCH rows, as the refinement runs: a graph's intermediates then stay in the cache.
        rendered = [self.render_session.run(["rendered"], {"quats": np.asarray(quaternions[i:i + BATCH], np.float32)})[0]
                    for i in range(0, len(quaternions), BATCH)]
        return np.concatenate(rendered) if rendered else np.zeros((0, int(np.prod(self.working_shape))), np.float32)

    def refine(self, patterns: np.ndarray, quaternions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, P) preprocessed patterns, (B, 4) starting orientations -> refined (B, 4) float32
        and their NCC (B,).

        The NCC is the one the last Gauss-Newton evaluation measured, before its step: that
        step moves about 0.02 deg (steps shrink about 4x per iteration) and the NCC by about
        1e-4, against a confidence width of 0.015, so scoring the final orientation again (a
        quarter of the cost of refining) would change nothing."""
        q = np.empty((len(patterns), 4), np.float32)
        ncc = np.empty(len(patterns), np.float32)
        for first in range(0, len(patterns), BATCH):
            rows = slice(first, first + BATCH)
            start = quaternions[rows]
            if self.coarse_session is not None:
                start, _ = gauss_newton(self.coarse_session, self.coarse(patterns[rows]), start, COARSE_ITERATIONS)
            q[rows], ncc[rows] = gauss_newton(self.gn_session, patterns[rows], start, self.iterations)
        return q, ncc

    def polish(self, fine_patterns: np.ndarray, quaternions: np.ndarray) -> np.ndarray:
        """(B, P_fine) frames preprocessed at the fine size, (B, 4) refined orientations -> the
        orientations after FINE_ITERATIONS steps at that size (as given where there is none)."""
        if self.fine is None or not len(quaternions):
            return np.asarray(quaternions, np.float32)
        q, _ = gauss_newton(self.fine, fine_patterns, quaternions, FINE_ITERATIONS, max_step_deg=FINE_MAX_STEP_DEG)
        return q


SYSTEM = ["ncc", "jtj", "jtr"]  # the Gauss-Newton graph's outputs a step needs


def gauss_newton(session, patterns: np.ndarray, quaternions: np.ndarray, iterations: int,
                 feeds: dict | None = None, *, max_step_deg: float = MAX_STEP_DEG) -> tuple[np.ndarray, np.ndarray]:
    """``iterations`` damped Gauss-Newton steps with a graph of models/refinement.py or a
    fine_refinement.FineSystem (``feeds``: its other inputs, such as the detector directions);
    returns (B, 4) float32 orientations and the NCC of the last evaluation (B,)."""
    q = np.asarray(quaternions, np.float64)
    limit = np.radians(max_step_deg)
    for _ in range(iterations):
        ncc, jtj, jtr = session.run(SYSTEM, {"quats": q.astype(np.float32), "patterns": patterns, **(feeds or {})})
        a = jtj.astype(np.float64)
        a += DAMPING * np.trace(a, axis1=1, axis2=2)[:, None, None] * np.eye(3) + 1e-12 * np.eye(3)
        step = -np.linalg.solve(a, jtr.astype(np.float64)[..., None])[..., 0]
        step /= np.clip(ncc.astype(np.float64), 0.05, 1.0)[:, None]
        size = np.linalg.norm(step, axis=1, keepdims=True)
        step *= np.minimum(1.0, limit / np.maximum(size, 1e-15))
        q = quaternion_multiply(rotation_vector_quaternions(step), q)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q.astype(np.float32), ncc.astype(np.float32)

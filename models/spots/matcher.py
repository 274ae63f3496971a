"""Polar template matching of spot patterns: a compiled polar transform, a numpy step and an ONNX graph.

frames (B, H, W) and beam centres (B, 2) ->
  bilinear samples on the polar grid (R radii x 360 angles, ellipticity in the grid) -> gamma
  0.5 (polar_transform, compiled: the values of the ONNX front_graph's GridSample, bit for bit) ->
  each radius' median over the angle (numpy partition) ->
  minus the median (the amorphous rings, the diffuse
  background), ReLU -> unit norm: the polar image (also an output, for refinement) ->
  angular DFT (MatMul with cos/sin of the harmonics 2k, k = 1..K) ->
  for every template at once: two MatMuls batched over the K
  harmonics ((K, B, 2Rb) x (K, 2Rb, N): the real and imaginary parts of sum_r T conj(P), on
  radii summed in pairs) -> the shortlist: the ``SHORTLIST`` templates of most correlation
  energy (sum over the harmonics of Re^2 + Im^2, the mean square over the in-plane angle) ->
  for those only, one MatMul back to M in-plane angles over 180 degrees -> best angle per
  template, TopK templates.

The cost is 4 K Rb N + 2 K S M multiply-adds a pattern (S = SHORTLIST; 2 K N M without it), all
in MatMuls (no Python loop over templates or angles). The shortlist of 384 of 3444 templates
gave the same answers, per pattern, as every template (1200 moderate patterns, seeds 7 and 11:
phase, quaternion, reliability and confidence identical; on seed 7 128 moved 10
reliabilities, 64 13 answers) and the matcher 1.15-1.2x the patterns/s (benchmarks/spots_side_by_side.py
--matcher-only --against REV). Tried and dropped: int8 dynamic quantization of the MatMuls
(onnxruntime.quantization, 1.3x less CPU but 5% of the best templates changed), the energy as a
MatMul with ones and the shortlist as a Gather on the flat product (slower), the steps after the
cross MatMul in numpy (1.25x slower), the polar transform as a numpy bilinear gather (no faster
than GridSample). Measured with ONNX Runtime's profiler (64 patterns, 3444 templates):
MatMul 28%, the median's TopK 18%, GridSample 17% at first; later (ORT 1.31, 2 threads) the
median's TopK 30%, GridSample 27%, the grid's Add 20%, Pow 7%, so the Add and the median left
the graph and Pow became Sqrt: the matcher 8.5 s -> 5.5 s on 1200 moderate patterns (load 5),
the same answers on seeds 7 and 11 (quaternions within 1.2e-7). Templates of every phase sit
side by side in one graph, so the scores of the phases are compared on one scale.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numba
import numpy as np

from liveindex.models.errors import LiveIndexError
from liveindex.models.onnx_runtime import choose_providers, session_options

from .templates import PolarGrid

log = logging.getLogger(__name__)

OPSET = 18
TOP_K = 32  # the best for refinement, the rest for the reliability's second-best solution
IN_PLANE_STEPS = 60  # in-plane angles over 180 degrees (3 degrees; refinement goes finer)
SHORTLIST = 384  # templates per pattern scored over the in-plane angles (of 3444 for three phases)
# In the cache key of the graph (indexer.py): a graph built by other code is not loaded.
GRAPH_VERSION = f"v4 shortlist {SHORTLIST}"


def polar_offsets(grid: PolarGrid, ellipticity=(1.0, 0.0)) -> np.ndarray:
    """(R, A, 2) pixel offsets (x, y) of the polar samples from the beam centre, stretched by
    the projector's elliptical distortion (ratio along the angle given)."""
    theta = np.deg2rad(np.arange(grid.angles) * 360.0 / grid.angles)
    r = grid.radii
    x = r[:, None] * np.cos(theta)[None, :]
    y = r[:, None] * np.sin(theta)[None, :]
    ratio, angle = ellipticity
    if ratio != 1.0:
        c, s = np.cos(np.deg2rad(angle)), np.sin(np.deg2rad(angle))
        along = x * c + y * s
        x, y = x + (ratio - 1.0) * along * c, y + (ratio - 1.0) * along * s
    return np.stack([x, y], -1)


def build_graph(path: Path, real: np.ndarray, imag: np.ndarray, grid: PolarGrid, pattern_shape, ellipticity,
                top_k: int = TOP_K, steps: int = IN_PLANE_STEPS, shortlist: int = SHORTLIST) -> None:
    """Write the matcher graph for (N, R, K) unit-norm templates to ``path``: ``shortlist``
    templates per pattern (the most correlation energy) are scored over the in-plane angles."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n, rb, k = real.shape  # rb: radial bins of RADIAL_BIN radii each
    r = len(grid.radii)
    a = grid.angles
    theta = np.deg2rad(np.arange(a) * 360.0 / a)
    harm = 2 * np.arange(1, k + 1)
    dft = np.concatenate([np.cos(np.outer(theta, harm)), -np.sin(np.outer(theta, harm))], 1).astype(np.float32)
    tr, ti = real.transpose(2, 1, 0), imag.transpose(2, 1, 0)  # (K, Rb, N)
    weights_re = np.concatenate([tr, ti], 1).astype(np.float32)  # (K, 2Rb, N): Re sum_r T conj(P)
    weights_im = np.concatenate([ti, -tr], 1).astype(np.float32)  # Im
    alpha = np.arange(steps) * np.pi / steps
    inverse = np.concatenate([2 * np.cos(np.outer(harm, alpha)), -2 * np.sin(np.outer(harm, alpha))], 0)
    inits = [numpy_helper.from_array(v, name) for name, v in [
        ("dft", dft), ("weights", np.concatenate([weights_re, weights_im], 0)),  # (2K, 2Rb, N)
        ("inverse", np.ascontiguousarray(inverse.T, np.float32)),
        ("eps", np.array(1e-6, np.float32)),
        ("shape_bin", np.array([0, rb, r // rb, a], np.int64)), ("shape_br2k", np.array([0, 0, 2, k], np.int64)),
        ("shape_kb2r", np.array([0, 0, -1], np.int64)), ("shape_2k_bn", np.array([2 * k, -1], np.int64)),
        ("axis_0", np.array([0], np.int64)), ("k", np.array([min(top_k, n, shortlist)], np.int64)),
        ("axis_a", np.array([2], np.int64)), ("axes_ra", np.array([1, 2], np.int64)),
    ]]
    short = min(shortlist, n)
    inits.append(numpy_helper.from_array(np.array([short], np.int64), "shortlist"))
    inits.append(numpy_helper.from_array(np.array([steps, -1, short], np.int64), "shape_mbs"))
    nodes = [
        # polar_g (the polar transform after gamma, front_graph) and each radius' background
        # ring_mean (its median over the angle, PolarMatcher.match) come in as inputs.
        # No noise threshold above the background: cutting at 1 or 2 standard deviations of
        # the radius lost 3-7% of the points within 3 deg (400 moderate patterns).
        helper.make_node("Sub", ["polar_g", "ring_mean"], ["polar_c"]),
        helper.make_node("Relu", ["polar_c"], ["polar_s"]),
        helper.make_node("ReduceSumSquare", ["polar_s", "axes_ra"], ["ss"], keepdims=1),
        helper.make_node("Sqrt", ["ss"], ["norm0"]),
        helper.make_node("Add", ["norm0", "eps"], ["norm"]),
        helper.make_node("Div", ["polar_s", "norm"], ["polar"]),
        helper.make_node("Reshape", ["polar", "shape_bin"], ["polar_pairs"]),  # (B, Rb, bin, A)
        helper.make_node("ReduceSum", ["polar_pairs", "axis_a"], ["polar_binned"], keepdims=0),  # (B, Rb, A)
        helper.make_node("MatMul", ["polar_binned", "dft"], ["spec"]),  # (B, Rb, 2K)
        helper.make_node("Reshape", ["spec", "shape_br2k"], ["spec4"]),  # (B, R, 2, K)
        helper.make_node("Transpose", ["spec4"], ["spec_k"], perm=[3, 0, 2, 1]),  # (K, B, 2, R)
        helper.make_node("Reshape", ["spec_k", "shape_kb2r"], ["spec_kb"]),  # (K, B, 2R)
        # Real and imaginary parts as one MatMul batched over 2K (the spectrum twice, the real
        # and imaginary weights stacked): the inverse MatMul then takes (2K, B, N) as it is. A
        # transpose of a (K, B, 2N) product to (B, N, 2K) took 31% of the graph's time; two
        # MatMuls and a Concat of their (K, B, N) products, the Concat 12%.
        helper.make_node("Concat", ["spec_kb", "spec_kb"], ["spec_2kb"], axis=0),  # (2K, B, 2R)
        helper.make_node("MatMul", ["spec_2kb", "weights"], ["cross"]),  # (2K, B, N)
        # The shortlist: a template's correlation energy over the in-plane angle (Parseval: the
        # sum over the harmonics of Re^2 + Im^2, one fused reduction) ranks it; only the best
        # ``short`` go on to the angles. The back-transform wrote and the ReduceMax read
        # M x B x N floats (53 MB a page of 64), the graph's largest memory traffic. (The sum as a
        # MatMul with ones after a Mul, and a Gather on the flat (2K, B*N) product instead of
        # GatherElements, were slower.)
        helper.make_node("ReduceSumSquare", ["cross", "axis_0"], ["energy"], keepdims=0),  # (B, N)
        helper.make_node("TopK", ["energy", "shortlist"], ["energy_top", "short"], axis=1),  # (B, S)
        helper.make_node("Unsqueeze", ["short", "axis_0"], ["short_1bs"]),
        helper.make_node("Shape", ["cross"], ["shape_2k_now"], start=0, end=1),
        helper.make_node("Shape", ["short"], ["shape_bs_now"]),
        helper.make_node("Concat", ["shape_2k_now", "shape_bs_now"], ["shape_2kbs"], axis=0),
        helper.make_node("Expand", ["short_1bs", "shape_2kbs"], ["short_2kbs"]),
        helper.make_node("GatherElements", ["cross", "short_2kbs"], ["cross_short"], axis=2),  # (2K, B, S)
        helper.make_node("Reshape", ["cross_short", "shape_2k_bn"], ["cross_flat"]),  # (2K, B*S)
        helper.make_node("MatMul", ["inverse", "cross_flat"], ["by_angle_flat"]),  # (M, B*S)
        helper.make_node("Reshape", ["by_angle_flat", "shape_mbs"], ["by_angle"]),  # (M, B, S)
        helper.make_node("ReduceMax", ["by_angle", "axis_0"], ["best"], keepdims=0),  # (B, S)
        helper.make_node("TopK", ["best", "k"], ["scores", "picked"], axis=1),  # (B, k) places in the shortlist
        helper.make_node("GatherElements", ["short", "picked"], ["templates"], axis=1),  # (B, k)
        # The best angle of the top k templates only (an ArgMax over every template took 8%).
        helper.make_node("Unsqueeze", ["picked", "axis_0"], ["picked_1bk"]),
        helper.make_node("Shape", ["by_angle"], ["shape_m_now"], start=0, end=1),
        helper.make_node("Shape", ["picked"], ["shape_bk_now"]),
        helper.make_node("Concat", ["shape_m_now", "shape_bk_now"], ["shape_mbk"], axis=0),
        helper.make_node("Expand", ["picked_1bk", "shape_mbk"], ["picked_mbk"]),
        helper.make_node("GatherElements", ["by_angle", "picked_mbk"], ["top_by_angle"], axis=2),  # (M, B, k)
        helper.make_node("ArgMax", ["top_by_angle"], ["angles"], axis=0, keepdims=0),  # (B, k)
    ]
    graph = helper.make_graph(
        nodes, "spot_polar_matcher",
        [helper.make_tensor_value_info("polar_g", TensorProto.FLOAT, ["B", r, a]),
         helper.make_tensor_value_info("ring_mean", TensorProto.FLOAT, ["B", r, 1])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["B", "K"]),
         helper.make_tensor_value_info("templates", TensorProto.INT64, ["B", "K"]),
         helper.make_tensor_value_info("angles", TensorProto.INT64, ["B", "K"]),
         helper.make_tensor_value_info("polar", TensorProto.FLOAT, ["B", r, a])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = min(model.ir_version, 9)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    onnx.save_model(model, str(tmp), save_as_external_data=False)
    tmp.replace(path)


def front_graph(pattern_shape, grid: PolarGrid) -> bytes:
    """The polar transform: frames (B, H, W) and sampling grids (B, R, A, 2, normalised) ->
    GridSample (bilinear) -> ReLU -> gamma 0.5 (Sqrt: the same values as Pow 0.5, 7% of the
    graph's time less)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    h, w = pattern_shape
    r, a = len(grid.radii), grid.angles
    inits = [numpy_helper.from_array(np.array([0, 1, h, w], np.int64), "shape_b1hw"),
             numpy_helper.from_array(np.array([0, r, a], np.int64), "shape_bra")]
    nodes = [
        helper.make_node("Reshape", ["frames", "shape_b1hw"], ["img"]),
        helper.make_node("GridSample", ["img", "grid"], ["polar4"], mode="bilinear", align_corners=1,
                         padding_mode="zeros"),
        helper.make_node("Reshape", ["polar4", "shape_bra"], ["polar_raw"]),
        helper.make_node("Relu", ["polar_raw"], ["polar_pos"]),
        helper.make_node("Sqrt", ["polar_pos"], ["polar_g"]),
    ]
    graph = helper.make_graph(
        nodes, "spot_polar_transform",
        [helper.make_tensor_value_info("frames", TensorProto.FLOAT, ["B", h, w]),
         helper.make_tensor_value_info("grid", TensorProto.FLOAT, ["B", r, a, 2])],
        [helper.make_tensor_value_info("polar_g", TensorProto.FLOAT, ["B", r, a])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = min(model.ir_version, 9)
    onnx.checker.check_model(model)
    return model.SerializeToString()


@numba.njit(cache=True, nogil=True)
def polar_transform(frames, centers_norm, offsets, out):
    """``front_graph`` compiled, bit for bit (its float32 sums in ONNX Runtime's order: the grid's
    offset plus the centre, GsDenormalize with align_corners, the bilinear weights and zero
    padding of its GridSample), then ReLU and the square root: (B, H, W) float32 frames, (B, 2)
    normalised centres and (R*A, 2) normalised offsets -> (B, R, A) into ``out``. 2.5x faster
    than the graph on one thread, no (B, R, A, 2) grid in memory, and it releases the GIL."""
    b, h, w = frames.shape
    n_a = out.shape[2]
    one, two, zero = np.float32(1.0), np.float32(2.0), np.float32(0.0)
    w_span, h_span = np.float32(w - 1), np.float32(h - 1)
    for i in range(b):
        image = frames[i]
        cx, cy = centers_norm[i, 0], centers_norm[i, 1]
        for r in range(out.shape[1]):
            for a in range(n_a):
                x = (offsets[r * n_a + a, 0] + cx + one) / two * w_span
                y = (offsets[r * n_a + a, 1] + cy + one) / two * h_span
                x1, y1 = int(np.floor(x)), int(np.floor(y))
                x2, y2 = x1 + 1, y1 + 1
                in_x1, in_x2 = 0 <= x1 < w, 0 <= x2 < w
                in_y1, in_y2 = 0 <= y1 < h, 0 <= y2 < h
                p11 = image[y1, x1] if in_x1 and in_y1 else zero
                p12 = image[y1, x2] if in_x2 and in_y1 else zero
                p21 = image[y2, x1] if in_x1 and in_y2 else zero
                p22 = image[y2, x2] if in_x2 and in_y2 else zero
                dx2, dx1 = np.float32(x2) - x, x - np.float32(x1)
                dy2, dy1 = np.float32(y2) - y, y - np.float32(y1)
                value = dy2 * (dx2 * p11 + dx1 * p12) + dy1 * (dx2 * p21 + dx1 * p22)
                out[i, r, a] = np.sqrt(max(value, zero))


class PolarMatcher:
    """An ONNX Runtime session of the matcher graph; ``match`` runs a page in runs of ``rows``."""

    def __init__(self, path: Path, pattern_shape, grid: PolarGrid, ellipticity=(1.0, 0.0), *,
                 steps: int = IN_PLANE_STEPS, providers: str = "auto", threads: int = 0, rows: int = 64):
        import onnxruntime as ort

        chosen = choose_providers(providers)
        self.session = ort.InferenceSession(str(path), session_options(threads), providers=chosen)
        self.provider = self.session.get_providers()[0]
        self.pattern_shape = tuple(pattern_shape)
        self.steps = steps
        self.rows = rows
        h, w = self.pattern_shape
        self._scale = np.array([2.0 / (w - 1), 2.0 / (h - 1)], np.float32)
        scale = np.array([2.0 / (w - 1), 2.0 / (h - 1)])
        self._offsets = (polar_offsets(grid, ellipticity) * scale).astype(np.float32).reshape(-1, 2)  # (R*A, 2)
        self._polar_shape = (len(grid.radii), grid.angles)

    def _run(self, frames: np.ndarray, centers_norm: np.ndarray):
        # The polar transform compiled (polar_transform), not front_graph's GridSample: the same
        # values, 2.5x faster. (Before, the grid's Add left the graph for numpy: 20% of its time.)
        polar_g = np.empty((len(frames), *self._polar_shape), np.float32)
        polar_transform(frames, centers_norm, self._offsets, polar_g)
        # Each radius' background is its median over the angle (the least of the top half, the
        # (A/2)-th value in ascending order): a mean took the spots of a busy ring (zone axes)
        # into the background and cut the weaker ones to 0, which biased the refined tilt by
        # 3-6 deg. numpy's partition instead of the graph's TopK (30% of its time): the same
        # values, about 8x faster.
        half = polar_g.shape[2] // 2
        ring = np.partition(polar_g, half, axis=2)[:, :, half:half + 1]
        return self.session.run(None, {"polar_g": polar_g, "ring_mean": np.ascontiguousarray(ring)})

    def match(self, frames: np.ndarray, centers: np.ndarray):
        """(B, H, W) frames, (B, 2) beam centres (x, y, pixels) -> top scores (B, k), template
        indices (B, k), in-plane angles in radians (B, k), polar images (B, R, A)."""
        frames = np.ascontiguousarray(frames, np.float32)
        centers_norm = (np.asarray(centers, np.float32) * self._scale - 1.0).astype(np.float32)
        parts = [self._run(frames[i:i + self.rows], centers_norm[i:i + self.rows])
                 for i in range(0, len(frames), self.rows)]
        scores, templates, angles, polar = (np.concatenate(p) for p in zip(*parts))
        if len(scores) != len(frames):
            raise LiveIndexError(f"matcher returned {len(scores)} rows for a batch of {len(frames)}")
        return scores, templates, angles.astype(np.float64) * np.pi / self.steps, polar

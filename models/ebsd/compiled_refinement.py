"""The refinement's render and Gauss-Newton system compiled for the CPU (numba).

The same system as the ONNX graph of models/refinement.py: render each orientation from the
master pattern, preprocess the render as the live frames are (minus its Gaussian blur, zero
mean, unit norm; with a signal mask, the normalised convolution), and return its NCC with the
frame, JᵀJ and Jᵀr in the rotation vector. tests/models/ebsd/test_compiled_refinement.py holds
the two to float32 precision. Each pixel is rotated, projected, sampled and differentiated in
registers, in loops LLVM vectorises, where the graph's ~60 elementwise nodes each stream
(B, 4, P) arrays through memory. Where it runs (models/ebsd/refiner.py, on the CPU):
- every Gauss-Newton step: the coarse one (15x15), the working size's (30x30: 49 against 114 us
  a row) and the last at the frames' own resolution (up to ``MAX_FINE_SIDE``, below);
- the renders at the working size (confidence, page rescue): 29 against 74 us a 30x30 row.
Other execution providers (a GPU) keep the ONNX graphs.

The fine steps. Matching and the first steps at the working size (30x30 for 60x60 frames) find
the orientation; its last tenths of a degree are in the band edges, which the 2x2 bin average
blurs. On hcp Ti patterns (60x60, moderate noise) the answer refined at 30x30 is 0.32 deg off at
the median, 0.20 deg after one step on the 60x60 frames. There the render is only made
zero-mean, not high-passed (``high_pass=False``): its smooth part barely changes over the
tenths of a degree these steps move, and dropping it gave the same answers as the full graph at
60x60 (Ti, 400 moderate patterns: median 0.197 against 0.196 deg after one step, 0.177 against
0.172 after two) at 0.05 ms a pattern against the graph's 0.41.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from .geometry import DetectorGeometry

# Frames up to this side are refined at their own size, larger ones binned to it; with the
# 30x30 working size, 60x60 frames get their last steps on every pixel.
MAX_FINE_SIDE = 64

_LAMBERT_C = 2 * math.sqrt(2) / math.pi
_QUARTER = math.pi / 4


def _atan_coefficients() -> tuple[float, ...]:
    """An odd polynomial of degree 15 for atan on [0, 1] (least squares on Chebyshev nodes,
    largest error 4e-8): unlike libm's atan it vectorises."""
    t = np.cos(np.linspace(0, np.pi, 2000)) * 0.5 + 0.5
    powers = np.arange(1, 16, 2)
    return tuple(float(c) for c in np.linalg.lstsq(t[:, None] ** powers[None], np.arctan(t), rcond=None)[0])


_A1, _A3, _A5, _A7, _A9, _A11, _A13, _A15 = _atan_coefficients()


@numba.njit(cache=True, nogil=True, fastmath=True)
def _render_with_derivatives(q, dx, dy, dz, cells, n, x, y, z, px, py, value, d1, d2, d3):
    """One orientation ``q`` (4,) -> ``value`` (P,), the master's bilinear interpolant at each
    detector direction rotated into the crystal and projected onto the square Lambert plane
    (as the ONNX graph, models/refinement.py), and ``d1, d2, d3``: its derivatives along the
    three infinitesimal rotations (e_k x w). The other arrays are scratch of P float32."""
    a, b, c, d = q[0], q[1], q[2], q[3]
    r00, r11, r22 = a * a + b * b - c * c - d * d, a * a + c * c - b * b - d * d, a * a + d * d - b * b - c * c
    r01, r10, r02 = 2 * (b * c - a * d), 2 * (b * c + a * d), 2 * (a * c + b * d)
    r20, r12, r21 = 2 * (b * d - a * c), 2 * (c * d - a * b), 2 * (c * d + a * b)
    f32 = np.float32
    half, top, lambert, quarter = f32((n - 1) / 2.0), f32(n - 1.0), f32(_LAMBERT_C), f32(_QUARTER)
    one, two, tiny = f32(1.0), f32(2.0), f32(1e-12)
    for p in range(dx.shape[0]):  # rotate and project
        xx = f32(r00 * dx[p] + r01 * dy[p] + r02 * dz[p])
        yy = f32(r10 * dx[p] + r11 * dy[p] + r12 * dz[p])
        zz = f32(r20 * dx[p] + r21 * dy[p] + r22 * dz[p])
        x[p] = xx
        y[p] = yy
        z[p] = zz
        ax, ay = abs(xx), abs(yy)
        scale = math.sqrt(max(two - two * abs(zz), tiny)) * lambert
        t = min(ax, ay) / max(max(ax, ay), f32(1e-30))
        t2 = t * t
        angle = t * (f32(_A1) + t2 * (f32(_A3) + t2 * (f32(_A5) + t2 * (f32(_A7) + t2 * (
            f32(_A9) + t2 * (f32(_A11) + t2 * (f32(_A13) + t2 * f32(_A15))))))))
        steep = ax < ay
        gx = math.copysign(scale * (angle if steep else quarter), xx)
        gy = math.copysign(scale * (quarter if steep else angle), yy)
        px[p] = min(max((gx + one) * half, f32(0.0)), top)
        py[p] = min(max((gy + one) * half, f32(0.0)), top)
    last = n - 2
    for p in range(dx.shape[0]):  # sample the master's bilinear cells
        column, row = min(int(px[p]), last), min(int(py[p]), last)
        fx, fy = px[p] - column, py[p] - row
        i = row * n + column
        c_plus_d_fx = cells[i, 2] + cells[i, 3] * fx
        value[p] = cells[i, 0] + cells[i, 1] * fx + fy * c_plus_d_fx
        d1[p] = (cells[i, 1] + cells[i, 3] * fy) * half  # d value / d gx
        d2[p] = c_plus_d_fx * half  # d value / d gy
    for p in range(dx.shape[0]):  # chain with the Lambert map along the rotations
        xx, yy, zz = x[p], y[p], z[p]
        ax, ay = abs(xx), abs(yy)
        s2 = max(two - two * abs(zz), tiny)
        k = math.sqrt(s2) * lambert / max(xx * xx + yy * yy, tiny)
        d_x, d_y = d1[p], d2[p]
        gx, gy = px[p] / half - one, py[p] / half - one
        steep = ax < ay
        gxw = k * (d_x * ay if steep else -d_y * yy * math.copysign(one, xx))
        gyw = k * (-d_x * xx * math.copysign(one, yy) if steep else d_y * ax)
        gzw = -math.copysign(one, zz) * (d_x * gx + d_y * gy) / s2
        d1[p] = yy * gzw - zz * gyw
        d2[p] = zz * gxw - xx * gzw
        d3[p] = xx * gyw - yy * gxw


@numba.njit(cache=True, nogil=True, fastmath=True)
def _preprocess(stack, rows, columns_t, h, w, mask, weight, count, high_pass, spread):
    """In place, each row of ``stack`` (K, h*w) as the Preprocessor treats frames. ``high_pass``:
    minus its blur (preprocess.blur_matrix: ``rows`` (h, h), ``columns_t`` the (w, w) one
    transposed; with a mask, masked pixels only, the blur divided by the mask's own, outside 0),
    then zero mean over the mask's ``count`` pixels; without ``high_pass`` only the zero mean.
    The K images are blurred in two matrix products (BLAS): 18 us for four 30x30 images, against
    54 us for loops over each. ``spread``: (h, K*w) scratch."""
    k, size = stack.shape
    if high_pass:
        for c in range(k):
            for p in range(size):
                stack[c, p] *= mask[p]
        along_rows = np.dot(stack.reshape(k * h, w), columns_t)  # (K*h, w)
        for c in range(k):
            for i in range(h):
                for j in range(w):
                    spread[i, c * w + j] = along_rows[c * h + i, j]
        blurred = np.dot(rows, spread)  # (h, K*w)
        for c in range(k):
            for i in range(h):
                for j in range(w):
                    p = i * w + j
                    stack[c, p] = (stack[c, p] - blurred[i, c * w + j] / weight[p]) * mask[p]
    for c in range(k):
        total = np.float32(0.0)
        for p in range(size):
            total += stack[c, p]
        mean = total / count
        for p in range(size):
            stack[c, p] = (stack[c, p] - mean) * mask[p]


@numba.njit(cache=True, nogil=True, fastmath=True)
def _system(quats, patterns, dx, dy, dz, cells, n, rows, columns_t, h, w, mask, weight, count, high_pass,
            ncc, jtj, jtr):
    """Per row b: the NCC of the preprocessed render of ``quats[b]`` with ``patterns[b]``
    (preprocessed, unit norm), and the Gauss-Newton system of the residual (normalised render −
    pattern) in the rotation vector: JᵀJ (3, 3) and Jᵀr (3,), as models/refinement.py's graph."""
    size = dx.shape[0]
    # Separate arrays, not rows of one: LLVM then vectorises the render's loops (3.5x faster).
    x, y, z, px, py = (np.empty(size, np.float32), np.empty(size, np.float32), np.empty(size, np.float32),
                       np.empty(size, np.float32), np.empty(size, np.float32))
    value, d1, d2, d3 = (np.empty(size, np.float32), np.empty(size, np.float32), np.empty(size, np.float32),
                         np.empty(size, np.float32))
    stack, spread = np.empty((4, size), np.float32), np.empty((h, 4 * w), np.float32)
    for b in range(quats.shape[0]):
        _render_with_derivatives(quats[b], dx, dy, dz, cells, n, x, y, z, px, py, value, d1, d2, d3)
        stack[0], stack[1], stack[2], stack[3] = value, d1, d2, d3
        _preprocess(stack, rows, columns_t, h, w, mask, weight, count, high_pass, spread)
        value[:], d1[:], d2[:], d3[:] = stack[0], stack[1], stack[2], stack[3]
        e = patterns[b]
        energy = overlap = np.float32(0.0)
        for p in range(size):
            energy += value[p] * value[p]
            overlap += value[p] * e[p]
        norm = max(math.sqrt(energy), np.float32(1e-12))
        inverse = np.float32(1.0) / norm
        ncc[b] = overlap * inverse
        n0 = n1 = n2 = np.float32(0.0)  # n · du_k
        for p in range(size):
            normalised = value[p] * inverse
            n0 += d1[p] * normalised
            n1 += d2[p] * normalised
            n2 += d3[p] * normalised
        # J_k = (du_k − (n·du_k) n) / |u|; Jᵀr with the residual r = n − e
        j00 = j01 = j02 = j11 = j12 = j22 = r0 = r1 = r2 = np.float32(0.0)
        for p in range(size):
            normalised = value[p] * inverse
            a0 = (d1[p] - n0 * normalised) * inverse
            a1 = (d2[p] - n1 * normalised) * inverse
            a2 = (d3[p] - n2 * normalised) * inverse
            residual = normalised - e[p]
            j00 += a0 * a0
            j01 += a0 * a1
            j02 += a0 * a2
            j11 += a1 * a1
            j12 += a1 * a2
            j22 += a2 * a2
            r0 += a0 * residual
            r1 += a1 * residual
            r2 += a2 * residual
        jtr[b, 0], jtr[b, 1], jtr[b, 2] = r0, r1, r2
        jtj[b, 0, 0], jtj[b, 1, 1], jtj[b, 2, 2] = j00, j11, j22
        jtj[b, 0, 1] = jtj[b, 1, 0] = j01
        jtj[b, 0, 2] = jtj[b, 2, 0] = j02
        jtj[b, 1, 2] = jtj[b, 2, 1] = j12


@numba.njit(cache=True, nogil=True, fastmath=True)
def _render(quats, dx, dy, dz, cells, n, rows, columns_t, h, w, mask, weight, count, high_pass, out):
    """(B, 4) orientations -> ``out`` (B, P): their renders preprocessed, unit norm."""
    size = dx.shape[0]
    x, y, z, px, py = (np.empty(size, np.float32), np.empty(size, np.float32), np.empty(size, np.float32),
                       np.empty(size, np.float32), np.empty(size, np.float32))
    value, d1, d2, d3 = (np.empty(size, np.float32), np.empty(size, np.float32), np.empty(size, np.float32),
                         np.empty(size, np.float32))
    stack, spread = np.empty((1, size), np.float32), np.empty((h, w), np.float32)
    for b in range(quats.shape[0]):
        _render_with_derivatives(quats[b], dx, dy, dz, cells, n, x, y, z, px, py, value, d1, d2, d3)
        stack[0] = value
        _preprocess(stack, rows, columns_t, h, w, mask, weight, count, high_pass, spread)
        energy = np.float32(0.0)
        for p in range(size):
            energy += stack[0, p] * stack[0, p]
        inverse = np.float32(1.0) / max(math.sqrt(energy), np.float32(1e-12))
        for p in range(size):
            out[b, p] = stack[0, p] * inverse


class CompiledSystem:
    """One phase's refinement system at one size, on the CPU: ``run`` answers as the ONNX
    refinement sessions do (models/ebsd/refiner.py's ``gauss_newton`` steps with either),
    ``render`` as the render-only graph. ``high_pass=False`` (the fine level): the render is
    only made zero-mean, see the module's note."""

    def __init__(self, phase: str, geometry: DetectorGeometry, shape: tuple[int, int], sigma: float,
                 mask: np.ndarray | None = None, *, high_pass: bool = True):
        from .preprocess import blur_matrix
        from .refinement import _bilinear_cells, render_inputs

        directions, master = render_inputs(phase, geometry, tuple(shape))
        h, w = self.shape = tuple(int(v) for v in shape)
        self.dx, self.dy, self.dz = (np.ascontiguousarray(directions[:, i], np.float32) for i in range(3))
        self.cells = _bilinear_cells(master)
        self.n = int(master.shape[0])
        self.rows, self.columns_t = blur_matrix(h, sigma), np.ascontiguousarray(blur_matrix(w, sigma).T)
        m = np.ones((h, w), np.float32) if mask is None else np.asarray(mask, np.float32).reshape(h, w)
        self.mask = np.ascontiguousarray(m.reshape(-1))
        # With a mask the blur is divided by the mask's own (the Preprocessor's normalised convolution).
        self.weight = (np.ones(h * w, np.float32) if mask is None else
                       np.maximum(self.rows @ m @ self.columns_t, 1e-3).astype(np.float32).reshape(-1))
        self.count = np.float32(m.sum())
        self.high_pass = bool(high_pass)

    def _arguments(self) -> tuple:
        h, w = self.shape
        return (self.dx, self.dy, self.dz, self.cells, self.n, self.rows, self.columns_t, h, w, self.mask,
                self.weight, self.count, self.high_pass)

    def run(self, outputs, feeds: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``feeds``: "quats" (B, 4), "patterns" (B, P) preprocessed frames at this size ->
        (ncc (B,), jtj (B, 3, 3), jtr (B, 3)), float32, whatever ``outputs`` names."""
        quats = np.ascontiguousarray(feeds["quats"], np.float64)
        patterns = np.ascontiguousarray(feeds["patterns"], np.float32)
        b = len(quats)
        ncc, jtj, jtr = np.empty(b, np.float32), np.empty((b, 3, 3), np.float32), np.empty((b, 3), np.float32)
        _system(quats, patterns, *self._arguments(), ncc, jtj, jtr)
        return ncc, jtj, jtr

    def render(self, quaternions: np.ndarray) -> np.ndarray:
        """(B, 4) -> (B, P): their renders preprocessed as frames are, unit norm; a dot product
        with a preprocessed frame is their NCC."""
        out = np.empty((len(quaternions), len(self.dx)), np.float32)
        _render(np.ascontiguousarray(quaternions, np.float64), *self._arguments(), out)
        return out

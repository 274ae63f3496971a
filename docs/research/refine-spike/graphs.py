"""ONNX graphs for refinement (opset 17): render -> preprocess -> NCC, and a Gauss-Newton step.

score graph:  quats (B, K, 4), exp (B, P) -> scores (B, K)
gn graph:     quats (B, 4),   exp (B, P) -> ncc (B,), jtj (B, 3, 3), jtr (B, 3)
   (residual = n(L r(theta)) - e, theta = left rotation vector in the sample frame:
    q_new = exp(theta) * q; analytic Jacobian = master-pattern gradient images sampled by the same
    GridSample, times the Lambert Jacobian (finite difference of the elementwise Lambert map).)
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from common import C_ATAN, filter_matrix

OPSET = 17


class G:
    def __init__(self):
        self.nodes, self.inits, self.n = [], [], itertools.count()

    def c(self, arr, dtype=np.float32):
        name = f"c{next(self.n)}"
        self.inits.append(numpy_helper.from_array(np.asarray(arr, dtype=dtype), name))
        return name

    def op(self, op, *inputs, n_out=1, **attrs):
        outs = [f"t{next(self.n)}" for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, **attrs))
        return outs[0] if n_out == 1 else outs

    # shorthands
    def add(self, a, b): return self.op("Add", a, b)
    def sub(self, a, b): return self.op("Sub", a, b)
    def mul(self, a, b): return self.op("Mul", a, b)
    def div(self, a, b): return self.op("Div", a, b)
    def reshape(self, a, shape): return self.op("Reshape", a, self.c(shape, np.int64))

    def model(self, inputs, outputs):
        graph = helper.make_graph(self.nodes, "refine", inputs, outputs, self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=9)
        onnx.checker.check_model(m)
        return m


def _rotmat_t(g, q):
    """q (N, 4) -> R^T (N, 3, 3) so that w = dc (P,3) @ R^T gives (N, P, 3)."""
    a, b, c, d = g.op("Split", q, g.c([1, 1, 1, 1], np.int64), axis=1, n_out=4)  # (N,1) each
    m = g.mul
    aa, bb, cc, dd = m(a, a), m(b, b), m(c, c), m(d, d)
    two = g.c(2.0)
    ab, ac, ad, bc, bd, cd = (m(two, m(x, y)) for x, y in ((a, b), (a, c), (a, d), (b, c), (b, d), (c, d)))
    r00 = g.sub(g.add(aa, bb), g.add(cc, dd))
    r11 = g.sub(g.add(aa, cc), g.add(bb, dd))
    r22 = g.sub(g.add(aa, dd), g.add(bb, cc))
    r01, r10 = g.sub(bc, ad), g.add(bc, ad)
    r02, r20 = g.add(ac, bd), g.sub(bd, ac)
    r12, r21 = g.sub(cd, ab), g.add(cd, ab)
    # R^T[i, j] = R[j, i]; row-major concat of R^T entries
    rt = g.op("Concat", r00, r10, r20, r01, r11, r21, r02, r12, r22, axis=1)
    return g.reshape(rt, [-1, 3, 3])


def _lambert(g, x, y, z):
    """Elementwise: (x, y, z) -> (gx, gy) normalised square-Lambert coords."""
    ax, ay, az = g.op("Abs", x), g.op("Abs", y), g.op("Abs", z)
    s = g.op("Sqrt", g.op("Relu", g.op("Sub", g.c(2.0), g.add(az, az))))
    tiny, one = g.c(1e-30), g.c(1.0)
    rx = g.op("Clip", g.div(ax, g.op("Clip", ay, tiny)), None, one) if False else g.op("Clip", g.div(ax, g.op("Clip", ay, tiny)), "", one)
    ry = g.op("Clip", g.div(ay, g.op("Clip", ax, tiny)), "", one)
    sc = g.mul(s, g.c(C_ATAN))
    gx = g.mul(g.mul(g.op("Sign", x), sc), g.op("Atan", rx))
    gy = g.mul(g.mul(g.op("Sign", y), sc), g.op("Atan", ry))
    return gx, gy


def _preprocess(g, r, side, sigma):
    """r (..., side, side) -> zero-mean (I - G) r, flattened to (..., P)."""
    gm = filter_matrix(side, sigma)
    blur = g.op("MatMul", g.c(gm), g.op("MatMul", r, g.c(gm.T)))
    u = g.sub(r, blur)
    u = g.reshape(u, [0, side * side]) if False else u
    return u


def build_score(dc, master, side, sigma, path):
    g = G()
    P = side * side
    q = "quats"
    qf = g.reshape(q, [-1, 4])
    w = g.op("MatMul", g.c(dc.astype(np.float32)), _rotmat_t(g, qf))  # (N, P, 3)
    x, y, z = g.op("Split", w, g.c([1, 1, 1], np.int64), axis=2, n_out=3)  # (N, P, 1)
    gx, gy = _lambert(g, x, y, z)
    grid = g.reshape(g.op("Concat", gx, gy, axis=2), [1, -1, P, 2])  # (1, N, P, 2)
    mp = g.c(master[None, None].astype(np.float32))
    r = g.op("GridSample", mp, grid, mode="bilinear", padding_mode="border", align_corners=1)  # (1,1,N,P)
    r = g.reshape(r, [-1, side, side])
    u = g.reshape(_preprocess(g, r, side, sigma), [-1, P])
    u = g.sub(u, g.op("ReduceMean", u, axes=[1], keepdims=1))
    nrm = g.op("Sqrt", g.op("ReduceSumSquare", u, axes=[1], keepdims=1))
    n = g.div(u, g.op("Max", nrm, g.c(1e-12)))
    # (B, K, P) @ (B, P, 1)
    shp = g.op("Shape", q)
    bk = g.op("Slice", shp, g.c([0], np.int64), g.c([2], np.int64))
    n3 = g.op("Reshape", n, g.op("Concat", bk, g.c([P], np.int64), axis=0))
    e3 = g.op("Unsqueeze", "exp", g.c([2], np.int64))
    s = g.op("MatMul", n3, e3)
    g.nodes.append(helper.make_node("Squeeze", [s, g.c([2], np.int64)], ["scores"]))
    m = g.model([helper.make_tensor_value_info("quats", TensorProto.FLOAT, ["B", "K", 4]),
                 helper.make_tensor_value_info("exp", TensorProto.FLOAT, ["B", P])],
                [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["B", "K"])])
    onnx.save(m, path)
    return path


def master_with_gradients(master):
    n = master.shape[0]
    d_row, d_col = np.gradient(master.astype(np.float64))
    k = (n - 1) / 2  # d/d(normalised g) = k * d/d(pixel)
    return np.stack([master, d_col * k, d_row * k]).astype(np.float32)  # (3, n, n)


def build_gn(dc, master, side, sigma, path, eps=1e-4):
    g = G()
    P = side * side
    w = g.op("MatMul", g.c(dc.astype(np.float32)), _rotmat_t(g, "quats"))  # (B, P, 3)
    x, y, z = g.op("Split", w, g.c([1, 1, 1], np.int64), axis=2, n_out=3)
    gx, gy = _lambert(g, x, y, z)
    # finite-difference Lambert Jacobian along the three infinitesimal rotations e_k x w
    e = g.c(eps)
    zero = None
    tangents = [(None, g.op("Neg", z), y), (z, None, g.op("Neg", x)), (g.op("Neg", y), x, None)]
    dgx, dgy = [], []
    for t in tangents:
        xs = [v if dv is None else g.add(v, g.mul(e, dv)) for v, dv in zip((x, y, z), t)]
        hx, hy = _lambert(g, *xs)
        dgx.append(g.div(g.sub(hx, gx), e))
        dgy.append(g.div(g.sub(hy, gy), e))
    grid = g.reshape(g.op("Concat", gx, gy, axis=2), [1, -1, P, 2])
    mp = g.c(master_with_gradients(master)[None])
    s = g.op("GridSample", mp, grid, mode="bilinear", padding_mode="border", align_corners=1)  # (1,3,B,P)
    s = g.reshape(s, [3, -1, P])
    r, mx, my = g.op("Split", s, g.c([1, 1, 1], np.int64), axis=0, n_out=3)  # (1, B, P)
    mx, my = g.reshape(mx, [-1, P, 1]), g.reshape(my, [-1, P, 1])
    D = [g.add(g.mul(mx, a), g.mul(my, b)) for a, b in zip(dgx, dgy)]  # (B, P, 1) each
    D = g.op("Transpose", g.op("Concat", *D, axis=2), perm=[0, 2, 1])  # (B, 3, P)
    allc = g.op("Concat", g.reshape(r, [-1, 1, P]), D, axis=1)  # (B, 4, P)
    allc = g.reshape(allc, [-1, 4, side, side])
    U = g.reshape(_preprocess(g, allc, side, sigma), [-1, 4, P])
    U = g.sub(U, g.op("ReduceMean", U, axes=[2], keepdims=1))
    u, dU = g.op("Split", U, g.c([1, 3], np.int64), axis=1, n_out=2)  # (B,1,P), (B,3,P)
    nrm = g.op("Max", g.op("Sqrt", g.op("ReduceSumSquare", u, axes=[2], keepdims=1)), g.c(1e-12))
    n = g.div(u, nrm)
    ex = g.op("Unsqueeze", "exp", g.c([1], np.int64))  # (B,1,P)
    ncc = g.op("ReduceSum", g.mul(n, ex), g.c([1, 2], np.int64), keepdims=0)
    g.nodes.append(helper.make_node("Identity", [ncc], ["ncc"]))
    ndu = g.op("ReduceSum", g.mul(dU, n), g.c([2], np.int64), keepdims=1)  # (B,3,1)
    J = g.div(g.sub(dU, g.mul(ndu, n)), nrm)  # (B,3,P)
    res = g.sub(n, ex)  # (B,1,P)
    g.nodes.append(helper.make_node("MatMul", [J, g.op("Transpose", J, perm=[0, 2, 1])], ["jtj"]))
    g.nodes.append(helper.make_node("ReduceSum", [g.mul(J, res), g.c([2], np.int64)], ["jtr"], keepdims=0))
    m = g.model([helper.make_tensor_value_info("quats", TensorProto.FLOAT, ["B", 4]),
                 helper.make_tensor_value_info("exp", TensorProto.FLOAT, ["B", P])],
                [helper.make_tensor_value_info("ncc", TensorProto.FLOAT, ["B"]),
                 helper.make_tensor_value_info("jtj", TensorProto.FLOAT, ["B", 3, 3]),
                 helper.make_tensor_value_info("jtr", TensorProto.FLOAT, ["B", 3])])
    onnx.save(m, path)
    return path


def session(path, threads=2):
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    o.log_severity_level = 3
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


def pixel_velocity(geometry, eps=1e-5):
    """F (3, P, 2): d(col, row)/d theta_j of each pixel's direction rotated about sample axis e_j."""
    from common import direction_cosines
    det = geometry.kikuchipy_detector()
    om = (~det.sample_to_detector).to_matrix().squeeze()  # detector -> sample
    b = det.gnomonic_bounds.squeeze().astype(np.float64)
    nr, nc = det.nrows, det.ncols
    xs, ys = (b[1] - b[0]) / nc, (b[3] - b[2]) / nr

    def pix(v):
        vd = v @ om  # sample -> detector (row vectors: v_d = om^T v)
        xg, yg = vd[:, 0] / vd[:, 2], vd[:, 1] / vd[:, 2]
        return np.stack([(xg - b[0]) / xs - 0.5, (b[3] - yg) / ys - 0.5], 1)

    dc = direction_cosines(geometry)
    p0 = pix(dc)
    rows, cols = np.divmod(np.arange(nr * nc), nc)
    assert np.abs(p0 - np.stack([cols, rows], 1)).max() < 1e-6, np.abs(p0 - np.stack([cols, rows], 1)).max()
    F = []
    for j in range(3):
        t = np.cross(np.eye(3)[j], dc)
        F.append((pix(dc + eps * t) - pix(dc - eps * t)) / (2 * eps))
    return np.stack(F).astype(np.float32)


def diff_matrix(n):
    D = np.zeros((n, n), np.float32)
    for i in range(n):
        lo, hi = max(i - 1, 0), min(i + 1, n - 1)
        D[i, hi] += 1 / (hi - lo)
        D[i, lo] -= 1 / (hi - lo)
    return D


def build_gn_img(geometry, dc, master, side, sigma, path):
    """GN with the Jacobian from the rendered pattern's detector-space gradient.
    Update is RIGHT-multiplied: q_new = q * exp(theta)."""
    g = G()
    P = side * side
    w = g.op("MatMul", g.c(dc.astype(np.float32)), _rotmat_t(g, "quats"))  # (B, P, 3)
    x, y, z = g.op("Split", w, g.c([1, 1, 1], np.int64), axis=2, n_out=3)
    gx, gy = _lambert(g, x, y, z)
    grid = g.reshape(g.op("Concat", gx, gy, axis=2), [1, -1, P, 2])
    r = g.op("GridSample", g.c(master[None, None].astype(np.float32)), grid, mode="bilinear",
             padding_mode="border", align_corners=1)
    r = g.reshape(r, [-1, side, side])
    D = diff_matrix(side)
    gcol = g.reshape(g.op("MatMul", r, g.c(D.T)), [-1, 1, P])
    grow = g.reshape(g.op("MatMul", g.c(D), r), [-1, 1, P])
    F = pixel_velocity(geometry)  # (3, P, 2)
    dr = g.add(g.mul(gcol, g.c(F[None, :, :, 0])), g.mul(grow, g.c(F[None, :, :, 1])))  # (B, 3, P)
    allc = g.reshape(g.op("Concat", g.reshape(r, [-1, 1, P]), dr, axis=1), [-1, 4, side, side])
    U = g.reshape(_preprocess(g, allc, side, sigma), [-1, 4, P])
    U = g.sub(U, g.op("ReduceMean", U, axes=[2], keepdims=1))
    u, dU = g.op("Split", U, g.c([1, 3], np.int64), axis=1, n_out=2)
    nrm = g.op("Clip", g.op("Sqrt", g.op("ReduceSumSquare", u, axes=[2], keepdims=1)), g.c(1e-12), "")
    n = g.div(u, nrm)
    ex = g.op("Unsqueeze", "exp", g.c([1], np.int64))
    ncc = g.op("ReduceSum", g.mul(n, ex), g.c([1, 2], np.int64), keepdims=0)
    g.nodes.append(helper.make_node("Identity", [ncc], ["ncc"]))
    ndu = g.op("ReduceSum", g.mul(dU, n), g.c([2], np.int64), keepdims=1)
    J = g.div(g.sub(dU, g.mul(ndu, n)), nrm)
    res = g.sub(n, ex)
    g.nodes.append(helper.make_node("MatMul", [J, g.op("Transpose", J, perm=[0, 2, 1])], ["jtj"]))
    g.nodes.append(helper.make_node("ReduceSum", [g.mul(J, res), g.c([2], np.int64)], ["jtr"], keepdims=0))
    m = g.model([helper.make_tensor_value_info("quats", TensorProto.FLOAT, ["B", 4]),
                 helper.make_tensor_value_info("exp", TensorProto.FLOAT, ["B", P])],
                [helper.make_tensor_value_info("ncc", TensorProto.FLOAT, ["B"]),
                 helper.make_tensor_value_info("jtj", TensorProto.FLOAT, ["B", 3, 3]),
                 helper.make_tensor_value_info("jtr", TensorProto.FLOAT, ["B", 3])])
    onnx.save(m, path)
    return path

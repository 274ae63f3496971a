"""Shared pieces of the refinement spike: geometry, numpy renderer, preprocessing operator.

Conventions (verified against kikuchipy.EBSDMasterPattern.get_patterns in verify_render.py):
  * detector direction cosines: kikuchipy _get_direction_cosines_from_detector(detector) -> (P, 3)
    unit vectors in the sample frame, row-major over the detector (row 0 = top).
  * crystal direction of pixel p for orientation q (orix/kikuchipy quaternion a,b,c,d):
    w = R(q) v  (active rotation, kikuchipy._utils.numba.rotate_vector).
  * square Lambert (EMsoft/kikuchipy): s = sqrt(2(1-|z|)); hemisphere chosen by sign(z) but
    Ni master is loaded upper only -> lower == upper, so simply use |z|.
    normalised coords in [-1, 1] (branch free form):
        gx = sign(x) * s * (2*sqrt2/pi) * atan(min(|x|/|y|, 1))     -> master COLUMN
        gy = sign(y) * s * (2*sqrt2/pi) * atan(min(|y|/|x|, 1))     -> master ROW
    pixel = (g + 1) * (n - 1) / 2, bilinear  == ONNX GridSample(bilinear, align_corners=1).
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter1d

from liveindex.models.ebsd.master_patterns import master_pattern, disorientation_degrees
from liveindex.models.ebsd.geometry import DetectorGeometry
from liveindex.models.ebsd.preprocess import Preprocessor

C_ATAN = 2 * np.sqrt(2) / np.pi


def master_array(phase="ni", energy=20.0):
    mp = master_pattern(phase)
    up, lo = mp._get_master_pattern_arrays_from_energy(energy)
    assert up is lo or np.array_equal(up, lo)
    return np.ascontiguousarray(up, dtype=np.float32)


def direction_cosines(geometry: DetectorGeometry) -> np.ndarray:
    from kikuchipy.signals.util._master_pattern import _get_direction_cosines_from_detector

    return _get_direction_cosines_from_detector(geometry.kikuchipy_detector()).astype(np.float64)


def quat_to_matrix(q):
    q = np.asarray(q, dtype=np.float64)
    a, b, c, d = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    R = np.empty(q.shape[:-1] + (3, 3))
    R[..., 0, 0] = a * a + b * b - c * c - d * d
    R[..., 0, 1] = 2 * (b * c - a * d)
    R[..., 0, 2] = 2 * (a * c + b * d)
    R[..., 1, 0] = 2 * (a * d + b * c)
    R[..., 1, 1] = a * a - b * b + c * c - d * d
    R[..., 1, 2] = 2 * (c * d - a * b)
    R[..., 2, 0] = 2 * (b * d - a * c)
    R[..., 2, 1] = 2 * (a * b + c * d)
    R[..., 2, 2] = a * a - b * b - c * c + d * d
    return R


def quat_mul(p, q):
    a1, b1, c1, d1 = np.moveaxis(np.asarray(p, np.float64), -1, 0)
    a2, b2, c2, d2 = np.moveaxis(np.asarray(q, np.float64), -1, 0)
    return np.stack([a1 * a2 - b1 * b2 - c1 * c2 - d1 * d2,
                     a1 * b2 + b1 * a2 + c1 * d2 - d1 * c2,
                     a1 * c2 - b1 * d2 + c1 * a2 + d1 * b2,
                     a1 * d2 + b1 * c2 - c1 * b2 + d1 * a2], -1)


def axis_angle_quat(theta):
    """theta (..., 3) rotation vectors (rad) -> quaternions."""
    theta = np.asarray(theta, np.float64)
    ang = np.linalg.norm(theta, axis=-1, keepdims=True)
    half = ang / 2
    s = np.where(ang > 1e-15, np.sin(half) / np.maximum(ang, 1e-15), 0.5)
    return np.concatenate([np.cos(half), theta * s], -1)


def lambert_norm(w):
    """(..., 3) unit vectors -> (..., 2) normalised (gx=col, gy=row) in [-1, 1]."""
    x, y, z = w[..., 0], w[..., 1], w[..., 2]
    s = np.sqrt(np.maximum(2 * (1 - np.abs(z)), 0))
    ax, ay = np.abs(x), np.abs(y)
    gx = np.sign(x) * s * C_ATAN * np.arctan(np.minimum(ax / np.maximum(ay, 1e-30), 1.0))
    gy = np.sign(y) * s * C_ATAN * np.arctan(np.minimum(ay / np.maximum(ax, 1e-30), 1.0))
    return np.stack([gx, gy], -1)


def bilinear(mp, g):
    n = mp.shape[0]
    col = (g[..., 0] + 1) * (n - 1) / 2
    row = (g[..., 1] + 1) * (n - 1) / 2
    c0 = np.clip(np.floor(col).astype(int), 0, n - 1)
    r0 = np.clip(np.floor(row).astype(int), 0, n - 1)
    c1 = np.minimum(c0 + 1, n - 1)
    r1 = np.minimum(r0 + 1, n - 1)
    dc = col - c0
    dr = row - r0
    return (mp[r0, c0] * (1 - dr) * (1 - dc) + mp[r1, c0] * dr * (1 - dc)
            + mp[r0, c1] * (1 - dr) * dc + mp[r1, c1] * dr * dc)


def render_numpy(q, dc, mp):
    """(N, 4) quats -> (N, P) raw patterns."""
    R = quat_to_matrix(q)  # (N, 3, 3)
    w = np.einsum("nij,pj->npi", R, dc)
    return bilinear(mp, lambert_norm(w)).astype(np.float32)


def filter_matrix(n, sigma):
    """1D operator of scipy gaussian_filter(truncate=2, mode='reflect') as an (n, n) matrix."""
    return gaussian_filter1d(np.eye(n), sigma, axis=0, truncate=2.0).astype(np.float32)


def working_geometry(side):
    """Geometry at the working resolution (60 or 30) and its preprocessor."""
    prep = Preprocessor.for_shape((60, 60), max_side=64 if side == 60 else 32)
    assert prep.working_shape == (side, side), prep.working_shape
    return DetectorGeometry().with_shape((side, side)), prep


def make_scan(noise, n=20, seed=5, grain_size=1.0):
    from liveindex.models.ebsd.simulator import SimulatedScan

    return SimulatedScan((n, n), noise=noise, seed=seed, grain_size=grain_size)


def errors(q, truth):
    return np.asarray(disorientation_degrees(np.asarray(q, np.float32), truth))


def summarize(err):
    return dict(median=float(np.median(err)), p95=float(np.percentile(err, 95)), within3=float(np.mean(err < 3)))

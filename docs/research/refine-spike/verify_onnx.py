"""Step 1c: ONNX score graph == numpy renderer + liveindex Preprocessor; GN graph gradient == FD of score."""
import numpy as np, time
from common import *
from graphs import build_score, build_gn, session
from liveindex.models.ebsd.preprocess import Preprocessor
mp = master_array()
rng = np.random.default_rng(2)
B, K = 64, 5
q = rng.standard_normal((B, 4)); q /= np.linalg.norm(q, axis=1, keepdims=True)
for side in (60, 30):
    geo, _ = working_geometry(side); dc = direction_cosines(geo)
    prep = Preprocessor.for_shape((side, side))
    e, _ = prep(render_numpy(q, dc, mp).reshape(-1, side, side))
    cands = quat_mul(axis_angle_quat(rng.normal(0, np.radians(1.0), (B, K, 3))), q[:, None])
    cands[:, 0] = q
    sp = build_score(dc, mp, side, prep.sigma, f"/tmp/refine-spike/score{side}.onnx")
    s = session(sp).run(None, {"quats": cands.astype(np.float32), "exp": e})[0]
    ref = np.stack([(prep(render_numpy(cands[:, k], dc, mp).reshape(-1, side, side))[0] * e).sum(1) for k in range(K)], 1)
    print(f"{side}: score graph vs numpy max|diff| {np.abs(s - ref).max():.2e}; self-score min {s[:, 0].min():.6f}")
    gp = build_gn(dc, mp, side, prep.sigma, f"/tmp/refine-spike/gn{side}.onnx")
    # check gradient: d ncc/d theta = -J^T res  (since ncc = 1 - |res|^2/2 ; d/dth = -J^T res)
    q0 = cands[:, 1]
    ncc, jtj, jtr = session(gp).run(None, {"quats": q0.astype(np.float32), "exp": e})
    h = np.radians(0.02)
    fd = np.zeros((B, 3))
    ss = session(sp)
    for k in range(3):
        th = np.zeros((B, 3)); th[:, k] = h
        qp = quat_mul(axis_angle_quat(th), q0); qm = quat_mul(axis_angle_quat(-th), q0)
        sc = ss.run(None, {"quats": np.stack([qp, qm], 1).astype(np.float32), "exp": e})[0]
        fd[:, k] = (sc[:, 0] - sc[:, 1]) / (2 * h)
    rel = np.linalg.norm(-jtr - fd, axis=1) / np.linalg.norm(fd, axis=1)
    print(f"   GN graph: ncc vs score {np.abs(ncc - ss.run(None, {'quats': q0[:, None].astype(np.float32), 'exp': e})[0][:, 0]).max():.1e};"
          f" analytic grad vs FD rel err median {np.median(rel):.3f} p90 {np.percentile(rel, 90):.3f}")

# GN-img: Jacobian from detector-space image gradient, right-multiplied update
from graphs import build_gn_img
for side in (60, 30):
    geo, _ = working_geometry(side); dc = direction_cosines(geo)
    prep = Preprocessor.for_shape((side, side))
    e, _ = prep(render_numpy(q, dc, mp).reshape(-1, side, side))
    q0 = quat_mul(q, axis_angle_quat(rng.normal(0, np.radians(1.0), (B, 3))))
    gp = build_gn_img(geo, dc, mp, side, prep.sigma, f"/tmp/refine-spike/gnimg{side}.onnx")
    ncc, jtj, jtr = session(gp).run(None, {"quats": q0.astype(np.float32), "exp": e})
    ss = session(f"/tmp/refine-spike/score{side}.onnx")
    h = np.radians(0.02); fd = np.zeros((B, 3))
    for k in range(3):
        th = np.zeros((B, 3)); th[:, k] = h
        sc = ss.run(None, {"quats": np.stack([quat_mul(q0, axis_angle_quat(th)), quat_mul(q0, axis_angle_quat(-th))], 1).astype(np.float32), "exp": e})[0]
        fd[:, k] = (sc[:, 0] - sc[:, 1]) / (2 * h)
    rel = np.linalg.norm(-jtr - fd, axis=1) / np.linalg.norm(fd, axis=1)
    cos = (-jtr * fd).sum(1) / np.linalg.norm(jtr, axis=1) / np.linalg.norm(fd, axis=1)
    print(f"{side}: GN-img grad vs FD rel err median {np.median(rel):.3f} p90 {np.percentile(rel, 90):.3f}, cos median {np.median(cos):.3f} min {cos.min():.3f}")

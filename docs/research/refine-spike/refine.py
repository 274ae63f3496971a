"""Steps 2-5: template matching + refinement on simulated 20x20 scans (400 distinct grains), per noise level.

python refine.py --side 30 --res 3 --method gn --iters 3 [--topk 1] [--noise clean,moderate,hard]
Prints accuracy and patterns/s (ORT CPU, intra_op 2 threads, whole batch of 400), saves per-point
results to results/<tag>.npz for the confidence analysis.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from common import *
from graphs import build_gn, build_score, session

HERE = Path(__file__).parent
_sessions = {}


def sess(kind, side, master_blur=0.0):
    key = (kind, side, master_blur)
    if key not in _sessions:
        geo, prep = working_geometry(side)
        dc = direction_cosines(geo)
        mp = master_array()
        if master_blur:
            from scipy.ndimage import gaussian_filter
            mp = gaussian_filter(mp, master_blur, mode="nearest")
        path = HERE / f"{kind}{side}_b{master_blur:g}.onnx"
        (build_gn if kind == "gn" else build_score)(dc, mp, side, prep.sigma, str(path))
        _sessions[key] = session(path)
    return _sessions[key]


def matcher(res, side, k):
    d = HERE / f"dicts/r{res:g}_s{side}"
    if side == 60 and res == 3 and not d.exists():
        raise SystemExit("build dicts first")
    return session(d / f"matcher_top{k}.onnx"), np.load(d / "rotations.npy").astype(np.float64)


def gn_refine(s, q, e, iters, lam=1e-3, max_step_deg=2.0, ncc_scale=True):
    """Gauss-Newton on |n(L r(theta)) - e|^2 with the step divided by the current NCC: at low NCC the GN
    matrix J^T J overestimates the NCC curvature by 1/NCC (Hessian of NCC ~ -NCC * J^T J)."""
    q = q.copy()
    for _ in range(iters):
        ncc, jtj, jtr = s.run(None, {"quats": q.astype(np.float32), "exp": e})
        A = jtj.astype(np.float64)
        A = A + lam * np.trace(A, axis1=1, axis2=2)[:, None, None] * np.eye(3) + 1e-12 * np.eye(3)
        d = -np.linalg.solve(A, jtr.astype(np.float64)[..., None])[..., 0]
        if ncc_scale:
            d /= np.clip(ncc.astype(np.float64), 0.05, 1.0)[:, None]
        n = np.linalg.norm(d, axis=1, keepdims=True)
        lim = np.radians(max_step_deg)
        d = np.where(n > lim, d * lim / np.maximum(n, 1e-15), d)
        q = quat_mul(axis_angle_quat(d), q)
    return q


def ls_refine(s, q, e, iters, step0_deg=1.0):
    """6-neighbour pattern search: move to the best of +-step about x, y, z; halve step when none improves."""
    B = len(q)
    q = q.copy()
    cur = s.run(None, {"quats": q[:, None].astype(np.float32), "exp": e})[0][:, 0]
    step = np.full(B, np.radians(step0_deg))
    axes = np.concatenate([np.eye(3), -np.eye(3)])  # (6, 3)
    for _ in range(iters):
        th = axes[None] * step[:, None, None]
        cands = quat_mul(axis_angle_quat(th), q[:, None])
        sc = s.run(None, {"quats": cands.astype(np.float32), "exp": e})[0]
        j = sc.argmax(1)
        best = sc[np.arange(B), j]
        better = best > cur
        q = np.where(better[:, None], cands[np.arange(B), j], q)
        cur = np.where(better, best, cur)
        step = np.where(better, step, step / 2)
    return q


def run(noise, args):
    scan = make_scan(noise, n=args.scan, seed=args.seed)
    raw = scan.render(0, scan.size)
    _, prep = working_geometry(args.side)
    m, rot = matcher(args.res, args.side, 5)  # top-5 graph; top-k sliced below
    score_s = sess("score", args.side, args.blur)
    ref_s = sess("gn", args.side, args.blur) if args.method == "gn" else score_s
    times = []
    for rep in range(args.reps):
        t0 = time.perf_counter()
        e, valid = prep(raw)
        t1 = time.perf_counter()
        top_scores, top_idx = m.run(None, {"patterns": e})
        top_scores, top_idx = top_scores[:, :max(args.topk, 2)], top_idx[:, :max(args.topk, 2)]
        t2 = time.perf_counter()
        k = args.topk
        q0 = rot[top_idx[:, :k]].reshape(-1, 4)  # (B*k, 4)
        ek = np.repeat(e, k, axis=0)
        if args.method == "gn":
            q = gn_refine(ref_s, q0, ek, args.iters, lam=args.lam)
        elif args.method == "ls":
            q = ls_refine(ref_s, q0, ek, args.iters, args.step0)
        else:
            q = q0
        final = score_s.run(None, {"quats": q.reshape(len(e), k, 4).astype(np.float32), "exp": e})[0]  # (B, k)
        pick = final.argmax(1)
        qf = q.reshape(len(e), k, 4)[np.arange(len(e)), pick]
        t3 = time.perf_counter()
        times.append((t1 - t0, t2 - t1, t3 - t2))
    tp, tm, tr = np.min(np.array(times), axis=0)
    err = errors(qf, scan.truth)
    err_tm = errors(rot[top_idx[:, 0]], scan.truth)
    srt = np.sort(final, axis=1)
    out = dict(noise=noise, side=args.side, res=args.res, n_dict=len(rot), method=args.method, iters=args.iters,
               topk=args.topk, blur=args.blur, **{k: round(v, 3) for k, v in summarize(err).items()},
               tm_within3=round(float(np.mean(err_tm < 3)), 3), tm_median=round(float(np.median(err_tm)), 2),
               pps_prep=round(scan.size / tp), pps_tm=round(scan.size / tm), pps_refine=round(scan.size / tr),
               pps_total=round(scan.size / (tp + tm + tr)))
    print(json.dumps(out), flush=True)
    tag = f"{noise}_s{args.side}_r{args.res:g}_{args.method}{args.iters}_k{args.topk}_b{args.blur:g}"
    (HERE / "results").mkdir(exist_ok=True)
    np.savez(HERE / "results" / f"{tag}.npz", err=err, err_tm=err_tm, final=final, pick=pick,
             tm_scores=top_scores, refined_ncc=final[np.arange(len(e)), pick])
    with open(HERE / "results.jsonl", "a") as f:
        f.write(json.dumps(out) + "\n")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--side", type=int, default=60)
    p.add_argument("--res", type=float, default=3.0)
    p.add_argument("--method", default="gn", choices=["gn", "ls", "none"])
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--topk", type=int, default=1)
    p.add_argument("--lam", type=float, default=1e-3)
    p.add_argument("--step0", type=float, default=1.0)
    p.add_argument("--blur", type=float, default=0.0)
    p.add_argument("--noise", default="clean,moderate,hard")
    p.add_argument("--scan", type=int, default=20)
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--reps", type=int, default=2)
    a = p.parse_args()
    for noise in a.noise.split(","):
        run(noise, a)


if __name__ == "__main__":
    main()

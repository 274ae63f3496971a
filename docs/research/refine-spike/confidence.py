"""Step 5: how separable are right (<3 deg) and wrong points by refined NCC / margins. Uses results/*.npz."""
import sys, glob, numpy as np

def auc(pos, neg):
    if len(pos) == 0 or len(neg) == 0: return float("nan")
    allv = np.concatenate([pos, neg]); ranks = allv.argsort().argsort() + 1
    return (ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))

def report(name, feat, right):
    o = np.argsort(-feat); r = right[o]
    prec = np.cumsum(r) / np.arange(1, len(r) + 1)
    ok = np.where(prec >= 0.99)[0]
    n99 = ok.max() + 1 if len(ok) else 0
    thr = feat[o][n99 - 1] if n99 else np.inf
    print(f"  {name:22s} AUC {auc(feat[right], feat[~right]):.3f}; threshold {thr:.4f} keeps {n99/len(r):.1%} of points "
          f"({np.sum(r[:n99])}/{right.sum()} right) at >=99% right; wrong points above it: {np.sum(~r[:n99])}")

for pat in sys.argv[1:]:
    files = sorted(glob.glob(f"results/{pat}"))
    d = [np.load(f) for f in files]
    err = np.concatenate([x["err"] for x in d]); right = err < 3
    print(pat, "files", [f.split("/")[-1] for f in files], f"n={len(err)} wrong={np.sum(~right)}")
    ncc = np.concatenate([x["refined_ncc"] for x in d])
    tm = np.concatenate([x["tm_scores"] for x in d])
    report("refined NCC", ncc, right)
    report("TM top1 score", tm[:, 0], right)
    report("TM top1-top2 margin", tm[:, 0] - tm[:, 1], right)
    report("TM (top1-top2)/top1", (tm[:, 0] - tm[:, 1]) / tm[:, 0], right)
    fin = np.concatenate([x["final"] for x in d])
    if fin.shape[1] > 1:
        s = np.sort(fin, 1)
        report("refined best-2nd margin", s[:, -1] - s[:, -2], right)
    # refined NCC relative to the TM score distribution of the pattern (noise-normalised)
    report("refined NCC/TM mean top-k", ncc / np.maximum(tm.mean(1), 1e-6), right)

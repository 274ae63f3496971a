"""Per-op time of the refinement graphs (ORT profiler)."""
import sys, json, glob, os, numpy as np, onnxruntime as ort, collections
path = sys.argv[1]; B = int(sys.argv[2]); K = int(sys.argv[3]) if len(sys.argv) > 3 else 0
o = ort.SessionOptions(); o.intra_op_num_threads = 2; o.enable_profiling = True; o.log_severity_level = 3
s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
P = s.get_inputs()[1].shape[1]
rng = np.random.default_rng(0)
q = rng.standard_normal((B, K, 4) if K else (B, 4)).astype(np.float32); q /= np.linalg.norm(q, axis=-1, keepdims=True)
e = rng.standard_normal((B, P)).astype(np.float32)
for _ in range(3): s.run(None, {"quats": q, "exp": e})
f = s.end_profiling()
ev = json.load(open(f)); os.remove(f)
agg = collections.Counter()
for x in ev:
    if x.get("cat") == "Node" and x["name"].endswith("_kernel_time"):
        agg[x["args"]["op_name"]] += x["dur"]
tot = sum(agg.values())
for k, v in agg.most_common(12): print(f"{k:16s} {v/3/1000:8.1f} ms  {100*v/tot:5.1f}%")
print(f"total {tot/3/1000:.1f} ms per run of B={B} K={K}")

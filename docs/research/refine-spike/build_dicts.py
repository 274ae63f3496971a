"""Dictionaries for the spike: kikuchipy renders at 60x60, then the working Preprocessor (bins to 30 for side 30).
Writes dicts/r{res}_s{side}/ {rotations.npy, templates.bin, matcher_top{k}.onnx} using liveindex's graph writer."""
import sys, time, numpy as np
from pathlib import Path
from orix.quaternion import Rotation
from common import *
from liveindex.models.ebsd.dictionary import sample_rotations, _write_matcher_graph
kmp = master_pattern("ni"); det = DetectorGeometry().kikuchipy_detector()
for spec in sys.argv[1:]:
    res, side = spec.split(":"); res = float(res); side = int(side)
    out = Path(f"dicts/r{res:g}_s{side}"); out.mkdir(parents=True, exist_ok=True)
    if (out / "rotations.npy").exists(): continue
    t = time.perf_counter()
    rot = sample_rotations("ni", res)
    _, prep = working_geometry(side)
    T = np.empty((len(rot), side * side), np.float32)
    for s in range(0, len(rot), 2000):
        p = kmp.get_patterns(Rotation(rot[s:s+2000]), det, energy=20.0, compute=True, dtype_out=np.float32, show_progressbar=False)
        T[s:s+2000], _ = prep(np.asarray(p.data))
    np.ascontiguousarray(T.T).tofile(out / "templates.bin"); np.save(out / "rotations.npy", rot)
    for k in (1, 5):
        _write_matcher_graph(out / f"matcher_top{k}.onnx", n_pixels=side * side, n_templates=len(rot), top_k=k)
    print(spec, len(rot), f"{time.perf_counter()-t:.0f}s", flush=True)

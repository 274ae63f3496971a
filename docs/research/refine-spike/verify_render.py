"""Step 1a: numpy renderer vs kikuchipy get_patterns (raw and after preprocessing)."""
import numpy as np, time
from orix.quaternion import Rotation
from common import *
from liveindex.models.ebsd.preprocess import Preprocessor

mp = master_array()
print("master", mp.shape, mp.dtype, mp.min(), mp.max())
rng = np.random.default_rng(1)
q = rng.standard_normal((200, 4)); q /= np.linalg.norm(q, axis=1, keepdims=True)
kmp = master_pattern("ni")
for side in (60, 30):
    geo, prep = working_geometry(side)
    dc = direction_cosines(geo)
    ref = np.asarray(kmp.get_patterns(Rotation(q), geo.kikuchipy_detector(), energy=20.0, compute=True,
                                     dtype_out=np.float32, show_progressbar=False).data).reshape(len(q), -1)
    t = time.perf_counter(); mine = render_numpy(q, dc, mp); t = time.perf_counter() - t
    d = np.abs(mine - ref).max()
    p2 = Preprocessor.for_shape((side, side))
    a, _ = p2(ref.reshape(-1, side, side)); b, _ = p2(mine.reshape(-1, side, side))
    ncc = (a * b).sum(1)
    print(f"{side}x{side}: max|diff| raw {d:.2e} (range {ref.min():.2f}..{ref.max():.2f}), NCC after prep min {ncc.min():.7f}, numpy {len(q)/t:.0f}/s")
    # binned 60->30 real data vs direct 30x30 render
    if side == 30:
        geo60, prep60 = working_geometry(60)
        r60 = np.asarray(kmp.get_patterns(Rotation(q), geo60.kikuchipy_detector(), energy=20.0, compute=True,
                         dtype_out=np.float32, show_progressbar=False).data)
        a2, _ = prep(r60)  # prep(30) bins 60 -> 30 by 2x2 mean
        print(f"  NCC(binned 60->30 render, direct 30x30 render) median {np.median((a2*b).sum(1)):.4f} min {(a2*b).sum(1).min():.4f}")

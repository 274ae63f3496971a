"""Step 1b: 30x30 point-sampled render vs 60x60 render binned 2x2: fix aliasing by pre-blurring the master."""
import numpy as np
from scipy.ndimage import gaussian_filter
from common import *
from liveindex.models.ebsd.preprocess import Preprocessor
mp = master_array()
rng = np.random.default_rng(1)
q = rng.standard_normal((200, 4)); q /= np.linalg.norm(q, axis=1, keepdims=True)
g60, prep60to30 = working_geometry(30)
dc60 = direction_cosines(DetectorGeometry()); dc30 = direction_cosines(g60)
p30 = Preprocessor.for_shape((30, 30))
ref, _ = prep60to30(render_numpy(q, dc60, mp).reshape(-1, 60, 60))
for s in (0, 1, 1.5, 2, 2.5, 3, 4):
    m = gaussian_filter(mp, s, mode="nearest") if s else mp
    b, _ = p30(render_numpy(q, dc30, m).reshape(-1, 30, 30))
    ncc = (ref * b).sum(1)
    print(f"master blur sigma {s}: NCC median {np.median(ncc):.4f} min {ncc.min():.4f}")

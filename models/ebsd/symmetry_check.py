"""Does a phase's master pattern have the symmetry liveindex indexes it with?

The dictionary samples each phase's fundamental zone, and answers are scored and reduced with
its point group's rotations (orix's, acting as s * q). That is right only where the rendered
patterns of q and s * q are the same. It found that kikuchipy's kinematical master patterns
were stored transposed (models/ebsd/master_patterns.py _compute_kinematical): corundum rendered
symmetric about two-fold axes 30 deg from its a axes, and half of a scan was answered 60 deg
about c from the truth at confidence 1. Now cubic, hexagonal, trigonal and orthorhombic phases
agree (0.98-1.00; the rest is interpolation). A monoclinic cell with b unique did not (0.20):
orix's point group 2/m has its two-fold along c, whatever the cell's setting; CIFs in such
settings (and on rhombohedral axes) are now re-described in orix's (models/crystal.py
orix_setting) and agree. A phase that still does not (a record made by hand, a master-pattern
file in another setting) is indexed with its confidence held at 0.5 at most (never "sure"),
and the log says why.
"""

from __future__ import annotations

import numpy as np

from liveindex.models.crystal import quaternion_multiply

PROBES = 8  # random orientations rendered, and each turned by every symmetry rotation
AGREEMENT = 0.95  # median correlation below which a rotation is taken as no symmetry of the pattern


def symmetry_agreement(refiner, rotations: np.ndarray) -> float:
    """The lowest, over the point group's proper rotations (S, 4), of the median correlation
    between rendered patterns of q and s * q: about 1 where the pattern has the symmetry."""
    q = np.random.default_rng(0).standard_normal((PROBES, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    plain = refiner.render(q.astype(np.float32))
    worst = 1.0
    for s in rotations:
        turned = refiner.render(quaternion_multiply(np.asarray(s, np.float64)[None, :], q).astype(np.float32))
        worst = min(worst, float(np.median((plain * turned).sum(1))))
    return worst

"""How well one pattern tells an ordered crystal from its disordered parent (L1_2 Ni3Al, fcc Ni).

Both share one orientation; only weak superlattice bands differ. Per point, the evidence z of
models/ebsd/relatives.py (the answer's residual projected on the relative's superlattice bands,
in noise widths) for:

- like for like: kinematical Ni (fcc) and kinematical Ni3Al scans, each indexed with either
  phase (simulated at moderate and hard noise, 20x20 points, grain size 2);
- the real kikuchipy Ni scan indexed with Ni's dynamical master pattern (right answers).

Prints the quantiles of z, the separation delta (median of the wrong answers' z minus the right
answers', in units of the right answers' spread), the best precision a per-point threshold
reaches while keeping half the right answers, and how many points a cluster's mean pattern needs
for both errors to fall to 1% (delta * sqrt(k) >= 4.65, noise independent between points).

    .venv/bin/python benchmarks/ordering_separability.py
"""

from __future__ import annotations

import numpy as np

from liveindex.models.crystal import PhaseRecord
from liveindex.models.ebsd.indexer import ScanIndexer
from liveindex.models.ebsd.master_patterns import record_of, register
from liveindex.models.ebsd.refiner import Refiner
from liveindex.models.ebsd.relatives import full_cell, ordering_evidence, ordering_relatives
from liveindex.models.ebsd.simulator import SimulatedScan
from liveindex.models.onnx_runtime import choose_providers

BOTH_ERRORS_1_PERCENT = 2 * 2.326  # two one-sided 1% tails


def kinematical_nickel() -> str:
    """fcc Ni simulated kinematically, as Ni3Al is (the built-in Ni is dynamical)."""
    ni = record_of("ni")
    return register(PhaseRecord(name="ni kinematical", space_group=225, lattice=ni.lattice, atoms=tuple(full_cell(ni)),
                                source="benchmark:ni-kinematical"))


def evidence(indexer: ScanIndexer, listed: str, frames: np.ndarray) -> np.ndarray:
    """z per point of ``frames`` indexed with ``listed`` against its (one) ordering relative."""
    twin, relatives = ordering_relatives(record_of(listed))
    render = [Refiner(register(r), indexer.geometry, indexer.preprocess.working_shape, indexer.preprocess.sigma,
                      mask=indexer.preprocess.mask, providers=choose_providers("auto")) for r in (twin, relatives[0])]
    result = indexer.index(frames, indexer.new_background())
    flat, _ = indexer.preprocess(frames, indexer.new_background())
    q = result.quaternion
    return ordering_evidence(flat, indexer.refiners[0].render(q), result.score, render[0].render(q), render[1].render(q))


def summary(name: str, right: np.ndarray, wrong: np.ndarray) -> None:
    spread = (np.percentile(right, 84) - np.percentile(right, 16)) / 2
    delta = (np.median(wrong) - np.median(right)) / spread
    threshold = np.median(right)  # keeps half the right answers
    precision = (right < threshold).sum() / max((right < threshold).sum() + (wrong < threshold).sum(), 1)
    k = int(np.ceil((BOTH_ERRORS_1_PERCENT / delta) ** 2)) if delta > 0 else None
    print(f"  {name:44s} right z 5/50/95 {np.percentile(right, [5, 50, 95]).round(1)}  wrong z 5/50/95 "
          f"{np.percentile(wrong, [5, 50, 95]).round(1)}  delta {delta:4.1f}  precision at half recall "
          f"{precision:6.1%}  cluster size for 1%/1%: {k}")


def main() -> None:
    ni_kin = kinematical_nickel()
    for noise in ("moderate", "hard"):
        scans = {p: SimulatedScan((20, 20), noise=noise, phase=p, seed=2, grain_size=2) for p in (ni_kin, "ni3al")}
        print(f"{noise} noise (kinematical scans, z > 0: the relative explains more):")
        for listed, other in ((ni_kin, "ni3al"), ("ni3al", ni_kin)):
            indexer = ScanIndexer(scans[listed].geometry, [listed], progress=False, indexer="templates")
            right = evidence(indexer, listed, scans[listed].render(0, scans[listed].size))
            wrong = evidence(indexer, listed, scans[other].render(0, scans[other].size))
            summary(f"listed {record_of(listed).name}, scan of {record_of(other).name}", right, wrong)
    import kikuchipy as kp

    from liveindex.models.ebsd.files import python_source

    source, carried = python_source(kp.data.nickel_ebsd_small(), phases=["ni"])
    indexer = ScanIndexer(source.geometry, ["ni"], progress=False, indexer="templates",
                          static_background=carried["static_background"])
    z = evidence(indexer, "ni", source.read(0, source.size))
    print(f"real kikuchipy Ni scan indexed as Ni (dynamical), right answers: z 5/50/95 "
          f"{np.percentile(z, [5, 50, 95]).round(1)} (a right answer should read about 0)")


if __name__ == "__main__":
    main()

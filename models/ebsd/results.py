"""What EBSD indexing answers per point: the declared result fields and the methods.

The order of ``METHODS`` is the code on the wire and in the files' ``method`` property;
new ones go at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from liveindex.models.latent.basis import DEFAULT_DIMS
from liveindex.models.modality import Field, Method

METHODS = (
    Method("nn", (102, 194, 165), "network"),
    Method("tm", (252, 141, 98), "template matching"),
    Method("tm+refined", (141, 160, 203), "template matching, refined"),
    Method("none", (0, 0, 0), "not indexed"),
    Method("nn+refined", (231, 138, 195), "network, refined"),
)
METHOD_CODE = {m.label: code for code, m in enumerate(METHODS)}
FIELDS = (
    Field("phase_id", "int16", (), -1, "index into the scan's phases; -1 not indexed"),
    Field("quaternion", "float32", (4,), [1.0, 0.0, 0.0, 0.0], "crystal orientation (w, x, y, z), orix convention"),
    Field("confidence", "float32", (), 0.0, "calibrated: above 0.5 right (within 3 deg) at least 99% of the time"),
    Field("method", "uint8", (), METHOD_CODE["none"], "code of what answered (METHODS)"),
    Field("score", "float32", (), 0.0, "similarity of the answer: refined NCC, else the best match's NCC"),
    # Two more, for the vendor files (models/modality.py QUALITY_FIELD, FIT_FIELD): added by
    # EBSDPageIndexer.index from the raw frames and the score.
    Field("iq", "float32", (), 0.0, "image quality of the raw frame (Krieger Lassen, as kikuchipy's "
                                    "get_image_quality): the .ang IQ and .ctf band contrast"),
    Field("fit", "float32", (), 0.0, "1 - NCC of the answer (refined where it was refined), lower is "
                                              "better: the .ang fit and .ctf MAD columns; NaN where no NCC "
                                              "(network alone, not indexed)"),
    Field("pseudo_symmetry", "uint8", (), 0, "1 where the second-best distinct solution (more than 5 deg "
                                             "away) scored within 3% of the answer's: a pseudo-symmetric "
                                             "variant the pattern cannot tell apart; 0 otherwise or unchecked "
                                             "(the network's answers)"),
    Field("reliability", "float32", (), 0.0, "best template near the answer over the best template more "
                                                       "than 5 deg from it (ASTAR's reliability as a ratio): about 1 "
                                                       "where no orientation stands out; 0 where not matched (the network's)"),
    # The latent maps' input (models/latent, models/ebsd/latent.py): the frame in the scan's
    # basis, which the scan_start carries; NaN where there is none (--latent off). The fill of
    # a point not in yet is 0 (a NaN fill would make the field unequal to itself on the wire);
    # the sink clusters only the points that are in.
    Field("embedding", "float16", (DEFAULT_DIMS,), 0.0, "the frame in the scan's latent basis (PCA of 3x3 tile "
                                                        "means), the sink's cluster/boundary/novelty maps"),
)
# Methods whose score is an NCC of the pattern against the answer's simulated pattern (the
# network alone scores a probability instead).
NCC_METHODS = tuple(METHOD_CODE[label] for label in ("tm", "tm+refined", "nn+refined"))


@dataclass
class IndexResult:
    phase_id: np.ndarray  # (B,) int16, -1 = not indexed
    quaternion: np.ndarray  # (B, 4) float32
    confidence: np.ndarray  # (B,) float32 in [0, 1]
    method: np.ndarray  # (B,) uint8 codes of METHODS
    score: np.ndarray  # (B,) float32 raw similarity of the best match
    pseudo_symmetry: np.ndarray  # (B,) uint8: 1 where a distinct second solution scored as well (see FIELDS)
    reliability: np.ndarray  # (B,) float32: best near / best distinct template score; 0 where not matched

    @classmethod
    def empty(cls, n: int) -> "IndexResult":
        q = np.zeros((n, 4), np.float32)
        q[:, 0] = 1.0
        return cls(np.full(n, -1, np.int16), q, np.zeros(n, np.float32),
                   np.full(n, METHOD_CODE["none"], np.uint8), np.zeros(n, np.float32), np.zeros(n, np.uint8),
                   np.zeros(n, np.float32))


    def fields(self) -> dict[str, np.ndarray]:
        """The declared result fields of these points."""
        return {"phase_id": self.phase_id, "quaternion": self.quaternion, "confidence": self.confidence,
                "method": self.method, "score": self.score, "pseudo_symmetry": self.pseudo_symmetry,
                "reliability": self.reliability}

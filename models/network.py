"""The phase/orientation network at inference: a model bundle run by ONNX Runtime.

No torch here, nor anywhere this module imports (a test checks it): training and export
live in models/train.py and models/export.py.

A bundle is a folder with ``bundle.json``, ``network.onnx`` and ``embedding.npy``; the default
one ships in ``liveindex/models/bundles/default``. The graph's orientation code book (one code
per orientation cell and band geometry, models/codebook.py) is too large to ship; it is a
function of the bundle and the master patterns, built on first use (about 30 s, one core)
and cached, as template dictionaries are. The graph takes preprocessed patterns, exactly what
``stream.preprocess.Preprocessor`` gives a worker, (B, P) float32 rows, zero-mean and
unit-norm at the bundle's working shape, and returns, per pattern:

- ``phase_probabilities`` (B, n_phases), softmax;
- ``quaternion`` (B, 4), unit, w >= 0, orix convention (the convention kikuchipy simulates
  with: a pattern from ``EBSDMasterPattern.get_patterns(R, detector)`` is answered as R up
  to crystal symmetry; any of the 24 cubic equivalents may come back);
- ``orientation_confidence`` (B,), the network's estimate of P(error <= 3 deg), in [0, 1].
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path

import numpy as np

from liveindex.stream.errors import InputError, LiveIndexError
from liveindex.stream.geometry import DetectorGeometry

log = logging.getLogger(__name__)

BUNDLE_FORMAT = 1
NETWORK_FILE = "network.onnx"
EMBEDDING_FILE = "embedding.npy"


def default_bundle_path() -> Path:
    return Path(str(resources.files("liveindex.models") / "bundles" / "default"))


class NetworkModel:
    """Phase and orientation from one pattern, by a network in ONNX Runtime.

    Capabilities, as the other indexers declare them (stream/indexer.py):
    """

    method = "nn"
    needs_geometry = False  # trained over a geometry range; see covers()
    gives_phase = True
    batch_hint = 256

    def __init__(self, folder: Path, bundle: dict, session, provider: str):
        from .training_data import GeometryRange

        self._book = None  # the orientation code book: built or loaded on first use
        self._codes = {}  # code-book subsets by band geometries
        self.folder = folder
        self.bundle = bundle
        self.session = session
        self.provider = provider
        self.phases: list[str] = [p["name"] for p in bundle["phases"]]
        self.working_shape: tuple[int, int] = tuple(bundle["input"]["working_shape"])
        # The camera frame size the codes are made for (binned to working_shape as a worker does).
        self.frame_shape: tuple[int, int] = tuple(bundle["input"].get("trained_frame_shape", self.working_shape))
        self.n_pixels = int(self.working_shape[0] * self.working_shape[1])
        self.geometry_range = GeometryRange.from_json(bundle["geometry_range"])

    @classmethod
    def load(cls, path: str | Path | None = None, *, providers: str = "auto", threads: int = 1) -> "NetworkModel":
        """Load a bundle folder (None: the default bundle shipped in the package).

        ``threads`` is ONNX Runtime's intra-op thread count (0: all cores).
        """
        import onnxruntime as ort

        from liveindex.stream.indexer import choose_providers, session_options

        folder = Path(path) if path is not None else default_bundle_path()
        meta = folder / "bundle.json"
        if not meta.exists():
            raise InputError(f"{folder} is not a model bundle (no bundle.json); make one with `liveindex models export`")
        bundle = json.loads(meta.read_text())
        if bundle.get("format") != BUNDLE_FORMAT:
            raise InputError(f"model bundle {folder} has format {bundle.get('format')}; this liveindex reads {BUNDLE_FORMAT}")
        session = ort.InferenceSession(str(folder / bundle.get("network", NETWORK_FILE)), session_options(threads),
                                       providers=choose_providers(providers))
        provider = session.get_providers()[0]
        model = cls(folder, bundle, session, provider)
        log.info("network bundle %s (phases %s) on %s", folder, ",".join(model.phases), provider)
        return model

    def covers(self, geometry: DetectorGeometry) -> bool:
        """Whether the scan geometry lies inside the PC/tilt range the network was trained on
        (and its patterns preprocess to the network's working shape)."""
        return self.geometry_range.contains(geometry)

    def phase_indices(self, names) -> list[int]:
        names = [str(n).lower() for n in names]
        unknown = [n for n in names if n not in self.phases]
        if unknown:
            raise InputError(f"phase(s) {unknown} are not in the network bundle {self.folder} (it knows {self.phases})")
        return [self.phases.index(n) for n in names]

    def codebook(self) -> dict:
        """The orientation code book (models/codebook.py), from the cache or built now (~30 s, once)."""
        if self._book is None:
            from . import codebook

            embed = np.load(self.folder / self.bundle["orientation"]["embedding"])
            nominal = DetectorGeometry(pc=self.geometry_range.pc_centre, energy_kv=self.geometry_range.energy_kv,
                                       pattern_shape=self.frame_shape)
            book = codebook.load_or_build(self.folder, self.bundle["orientation"]["cell_resolution_deg"], nominal,
                                          lambda t: t @ embed)
            self._book = {k: np.ascontiguousarray(book[k]) for k in ("codes", "neighbours", "aligned")}
        return self._book

    def codebook_inputs(self, allowed=None) -> dict:
        """The graph's code-book inputs. With one ``allowed`` phase, only the band geometries that
        serve it (codebook.CODEBOOK_SERVES): a one-phase scan scores a third of the codes. Two or
        more phases need every geometry's best score, the phase evidence that tells them apart."""
        from .codebook import CODEBOOK_SERVES, CODEBOOK_SOURCES

        book = self.codebook()
        geometries = list(range(len(CODEBOOK_SOURCES)))
        if allowed is not None and len(set(allowed)) == 1:
            geometries = list(CODEBOOK_SERVES[self.phases[allowed[0]]])
        if len(geometries) < len(CODEBOOK_SOURCES):
            key = tuple(geometries)
            if key not in self._codes:  # a contiguous copy per choice, made once
                self._codes[key] = np.ascontiguousarray(book["codes"][geometries])
            codes = self._codes[key]
        else:
            codes = book["codes"]
        return {"codes": codes, "neighbours": book["neighbours"], "aligned": book["aligned"],
                "geometry_index": np.asarray(geometries, np.int64)}

    def warm_up(self) -> None:
        self.predict(np.zeros((2, self.n_pixels), np.float32))

    def predict(self, flat: np.ndarray, *, allowed=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(B, P) float32 preprocessed patterns -> (phase_index (B,) int64, quaternion (B, 4) float32,
        phase_confidence (B,) float32, orientation_confidence (B,) float32).

        ``phase_index`` indexes ``self.phases``. ``phase_confidence`` is the softmax
        probability of the chosen phase; ``orientation_confidence`` is the network's estimate
        of P(disorientation <= 3 deg). ``allowed`` (phase names or indices), when given,
        restricts the answer to those phases (a scan's expected phases); the probabilities
        are renormalised over them. An all-zero row (a pattern the preprocessor found
        invalid) gets both confidences 0.
        """
        flat = np.asarray(flat)
        if flat.ndim != 2 or flat.shape[1] != self.n_pixels:
            raise InputError(f"network input of shape {flat.shape} does not match (B, {self.n_pixels}) "
                             f"(working shape {self.working_shape})")
        if flat.dtype != np.float32:
            flat = flat.astype(np.float32)
        idx = None
        if allowed is not None:
            idx = [a if isinstance(a, (int, np.integer)) else self.phase_indices([a])[0] for a in allowed]
        probs, quat, oconf = self.session.run(None, {"patterns": np.ascontiguousarray(flat),
                                                     **self.codebook_inputs(idx)})
        if probs.shape[0] != flat.shape[0] or quat.shape != (flat.shape[0], 4):
            raise LiveIndexError(f"network returned {probs.shape[0]} rows for a batch of {flat.shape[0]}")
        if idx is not None:
            mask = np.zeros(probs.shape[1], bool)
            mask[idx] = True
            probs = np.where(mask, probs, 0.0)
            probs /= np.maximum(probs.sum(axis=1, keepdims=True), 1e-12)
        phase = probs.argmax(axis=1)
        pconf = probs[np.arange(len(phase)), phase].astype(np.float32)
        oconf = oconf.astype(np.float32).reshape(-1)
        empty = ~np.any(flat, axis=1)
        if empty.any():
            pconf[empty] = 0.0
            oconf[empty] = 0.0
        return phase.astype(np.int64), quat.astype(np.float32), pconf, oconf

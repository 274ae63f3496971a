"""The spot modality's networks at inference: ONNX Runtime only (torch trains them, train.py).

As Hadjadj et al.: a phase classifier network, then one orientation network per phase, with
polar template matching as the fallback on each branch. Both read the same input, the
matcher's polar image (matcher.py: gamma 0.5, each radius' median over the angle removed,
unit norm) reduced to its in-plane-rotation-invariant angular power spectrum:

- radii summed in pairs (the matcher's radial bins), then the magnitudes of the angular
  Fourier harmonics 0, 2, ..., 2 ``SPECTRUM_HARMONICS`` per bin (kinematical patterns are
  centrosymmetric: the odd harmonics are noise), square-rooted and scaled to unit norm.

A turn of the pattern about the beam shifts the polar image along the angle and changes only
the phases of those coefficients, so the networks need no in-plane rotation augmentation and
cannot answer the in-plane angle: the orientation network answers the beam direction, as one
class per template of the phase's library (templates.py's fundamental-sector grid), and the
in-plane angle comes from the correlation of that template with the pattern (the matcher's
own score, computed here for the chosen templates only). Mirror images have one spectrum, so
the network cannot tell a direction from its mirror either: the correlation does.

A bundle (``bundles/default/bundle.json``) records its phases (with their structure's hash),
the setup it was trained for (kV, calibration, precession, pattern shape, library
resolution) and its validation figures; ``Bundle.covers`` says whether it applies to a scan.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .templates import RADIAL_BIN, PolarGrid

log = logging.getLogger(__name__)

DEFAULT_BUNDLE = Path(__file__).resolve().parent / "bundles" / "default"
SPECTRUM_HARMONICS = 20  # harmonics 0, 2, ..., 40: the matcher's angular detail (templates.py, K = 20)
# The setup must match the bundle's to within these (relative) tolerances: the spots' radii
# scale with the calibration and the Ewald sphere's curvature with the kV.
CALIBRATION_TOLERANCE = 0.02
KV_TOLERANCE = 0.02
PRECESSION_TOLERANCE_DEG = 0.25
ANGLE_STEPS = 180  # in-plane angles over 180 degrees for the network's candidates (1 degree)


def phase_fingerprint(record) -> str:
    """A short hash of what a phase's spots depend on: space group, lattice, atoms."""
    content = json.dumps([record.space_group, [round(x, 5) for x in record.lattice],
                          [[a[0], *(round(float(x), 5) for x in a[1:])] for a in record.atoms]])
    return hashlib.sha256(content.encode()).hexdigest()[:16]


def spectrum_features(polar: np.ndarray) -> np.ndarray:
    """(B, R, A) polar images -> (B, R / RADIAL_BIN * (SPECTRUM_HARMONICS + 1)) float32 features."""
    b, r, a = polar.shape
    binned = polar.reshape(b, r // RADIAL_BIN, RADIAL_BIN, a).sum(2)
    spectrum = np.abs(np.fft.rfft(binned, axis=2)[:, :, 0:2 * SPECTRUM_HARMONICS + 1:2])
    features = np.sqrt(spectrum).reshape(b, -1)
    features /= np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    return features.astype(np.float32)


def feature_size(grid: PolarGrid) -> int:
    return len(grid.radii) // RADIAL_BIN * (SPECTRUM_HARMONICS + 1)


@dataclass
class Bundle:
    folder: Path
    meta: dict

    @classmethod
    def load(cls, folder=None) -> "Bundle":
        from liveindex.models.errors import InputError

        folder = Path(folder) if folder else DEFAULT_BUNDLE
        try:
            meta = json.loads((folder / "bundle.json").read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"--bundle {folder}: no readable bundle.json there ({exc})") from None
        if meta.get("modality") != "spots":
            raise InputError(f"--bundle {folder} is not a spot-pattern bundle (modality {meta.get('modality')!r}); "
                             "liveindex models train --modality spots makes one")
        return cls(folder, meta)

    @property
    def phase_names(self) -> list[str]:
        return [p["name"] for p in self.meta["phases"]]

    def covers(self, setup: dict, phases, pattern_shape, resolution: float) -> tuple[list[int | None], str]:
        """For each scan phase the bundle's phase index (None: not covered) and, where the bundle
        applies to none of them, why. Setup (kV, calibration, precession, shape, resolution)
        must match; a phase matches by its structure's fingerprint, not its name."""
        trained = self.meta["setup"]
        why = []
        if abs(setup["kv"] - trained["kv"]) > KV_TOLERANCE * trained["kv"]:
            why.append(f"{setup['kv']:g} kV, the bundle's {trained['kv']:g} kV")
        if abs(setup["calibration"] - trained["calibration"]) > CALIBRATION_TOLERANCE * trained["calibration"]:
            why.append(f"calibration {setup['calibration']:g}/A per pixel, the bundle's {trained['calibration']:g}")
        if abs(setup["precession"] - trained["precession"]) > PRECESSION_TOLERANCE_DEG:
            why.append(f"precession {setup['precession']:g} deg, the bundle's {trained['precession']:g}")
        if list(pattern_shape) != list(trained["pattern_shape"]):
            why.append(f"patterns {tuple(pattern_shape)}, the bundle's {tuple(trained['pattern_shape'])}")
        if abs(resolution - trained["resolution_deg"]) > 1e-9:
            why.append(f"template library at {resolution:g} deg, the bundle's at {trained['resolution_deg']:g}")
        if why:
            return [None] * len(phases), "; ".join(why)
        prints = {p["fingerprint"]: i for i, p in enumerate(self.meta["phases"])}
        mapping = [prints.get(phase_fingerprint(r)) for r in phases]
        if all(m is None for m in mapping):
            return mapping, f"no phase of the scan ({', '.join(r.name for r in phases)}) is one of the bundle's " \
                            f"({', '.join(self.phase_names)})"
        return mapping, ""


class SpotNetworks:
    """The bundle's ONNX graphs in ONNX Runtime: ``classifier.onnx`` (features -> phase
    probabilities) and ``orientation_<phase>.onnx`` (features -> probabilities over that phase's
    library templates)."""

    def __init__(self, bundle: Bundle, *, providers: str = "auto", threads: int = 0):
        import onnxruntime as ort

        from liveindex.models.onnx_runtime import choose_providers, session_options

        chosen = choose_providers(providers)
        self.bundle = bundle
        options = session_options(threads)
        self.classifier = ort.InferenceSession(str(bundle.folder / bundle.meta["classifier"]["file"]), options,
                                               providers=chosen)
        self.orientation = [ort.InferenceSession(str(bundle.folder / p["orientation_file"]), options, providers=chosen)
                            for p in bundle.meta["phases"]]

    def phase_probabilities(self, features: np.ndarray) -> np.ndarray:
        return self.classifier.run(None, {"features": features})[0]

    def direction_probabilities(self, phase: int, features: np.ndarray) -> np.ndarray:
        return self.orientation[phase].run(None, {"features": features})[0]


def best_in_plane(polar: np.ndarray, real: np.ndarray, imag: np.ndarray, steps: int = ANGLE_STEPS, *,
                  each: int = 1):
    """(B, R, A) polar images and (B * each, Rb, K) the templates each is to be turned onto
    (``each`` a pattern, in a row) -> the best in-plane angle (radians, over 180 degrees) and its
    score, on the matcher's scale (matcher.py: 2 Re sum_k sum_r T conj(P) exp(i 2k alpha)), (B * each,).
    A pattern's spectrum is taken once for its ``each`` templates (not of ``each`` copies of the
    image, which was 8% of the indexer's CPU), the DFT's tables once a process: the same values."""
    b, r, a = polar.shape
    k = real.shape[2]
    binned = polar.reshape(b, r // RADIAL_BIN, RADIAL_BIN, a).sum(2)
    forward, backward, alpha = _dft_tables(a, k, steps)
    spec = np.repeat(binned @ forward, each, axis=0)  # (B * each, Rb, K): P
    cross = (((real + 1j * imag)) * np.conj(spec)).sum(1)  # (B * each, K)
    by_angle = 2 * (cross @ backward).real  # (B * each, M)
    best = by_angle.argmax(1)
    return alpha[best], by_angle[np.arange(len(by_angle)), best]


@functools.lru_cache(maxsize=4)
def _dft_tables(angles: int, harmonics: int, steps: int):
    """``best_in_plane``'s (A, K) forward and (K, M) backward DFT matrices and (M,) in-plane angles."""
    theta = np.arange(angles) * (2 * np.pi / angles)
    harm = 2 * np.arange(1, harmonics + 1)
    alpha = np.arange(steps) * np.pi / steps
    tables = np.exp(-1j * np.outer(theta, harm)), np.exp(1j * np.outer(harm, alpha)), alpha
    for table in tables:
        table.flags.writeable = False  # shared by the pages' threads
    return tables


class NetworkFirstPass:
    """The network's answers as the indexer's candidates (indexer.py ``_network_first_pass``).

    For each pattern: the classifier's phase probabilities over the bundle's phases; the
    orientation network of the most probable phase gives its best library templates; each is
    turned in-plane by its correlation with the pattern. The bundle must know every phase of the
    scan (its classifier cannot say "none of mine"); a scan phase the bundle knows but the scan
    lacks is simply not offered."""

    def __init__(self, networks: SpotNetworks, mapping: list[int | None], offsets: np.ndarray,
                 real: np.ndarray, imag: np.ndarray, *, top: int = 2):
        self.networks = networks
        self.mapping = mapping  # scan phase -> bundle phase
        self.offsets = offsets  # first template of each scan phase in the indexer's library
        self.real, self.imag = real, imag  # (N, Rb, K) every scan phase's templates
        self.top = top

    def phase_probabilities(self, polar: np.ndarray):
        """(B, R, A) polar images -> (B, scan phases) the classifier's probabilities (of the bundle's
        phases, those of the scan) and the features, for ``candidates``."""
        features = spectrum_features(polar)
        probs = self.networks.phase_probabilities(features)
        scan_probs = np.zeros((len(polar), len(self.mapping)))
        for scan_phase, bundle_phase in enumerate(self.mapping):
            scan_probs[:, scan_phase] = probs[:, bundle_phase]
        return scan_probs, features

    def candidates(self, polar: np.ndarray, features: np.ndarray, scan_phase: np.ndarray):
        """The orientation network of each pattern's (covered) ``scan_phase`` -> (B, top) template
        indices into the indexer's library, in-plane angles (radians) and scores on the
        matcher's scale."""
        b = len(polar)
        templates = np.zeros((b, self.top), np.int64)
        for p in np.unique(scan_phase):
            rows = np.flatnonzero(scan_phase == p)
            direction_probs = self.networks.direction_probabilities(self.mapping[p], features[rows])
            templates[rows] = self.offsets[p] + np.argsort(-direction_probs, axis=1)[:, :self.top]
        flat = templates.reshape(-1)
        alpha, score = best_in_plane(polar, self.real[flat], self.imag[flat], each=self.top)
        return templates, alpha.reshape(b, self.top), score.reshape(b, self.top)

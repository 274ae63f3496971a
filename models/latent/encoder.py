"""The second embedding source of the latent maps: an encoder network (ONNX) per modality.

An encoder is a small autoencoder on the modality's own latent features (EBSD: the binned,
mean-divided frame; spots: the rotation-invariant polar features), trained on simulated
patterns (models/latent/train.py, torch, offline) and shipped as one ONNX file per modality
(models/latent/encoders/<modality>.onnx). The file is the encoder graph (features -> latent);
its ``metadata_props`` carry the decoder graph (latent -> features, for a cluster's mean
pattern), the modality, the feature shape and the number of latent dims that are invariant
to an in-plane turn of the pattern (spots: all of them; EBSD: none).

It travels as the basis does: where the frames are (publisher, ``liveindex index``), the
encoder is read, the scan's noise normalisation is measured on 3x3 tiles of its features
(``scan_normalisation``: per feature, the median of the tile means and the median of the
point-to-point spread inside a tile, so the network sees features in noise sigmas of this
scan), and the scan_start's ``latent`` entry carries both (``kind: "encoder"``, the graph
bytes, a few hundred kB). Workers run the graph with ONNX Runtime on each page; a worker on
another host needs no file. ``latent_from_wire`` reads either kind; a malformed entry is a
ProtocolError that names what is off.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from liveindex.models.errors import InputError, ProtocolError

from .basis import MAX_DIMS, MAX_FEATURES, MIN_DIMS, TILE, LatentBasis, tile_starts

log = logging.getLogger(__name__)

WIRE_VERSION = 1
KINDS = ("pca", "encoder")
MAX_MODEL_BYTES = 4_000_000  # an encoder (with its decoder) a scan_start may carry
ENCODERS = Path(__file__).resolve().parent / "encoders"  # the shipped default per modality
META_PREFIX = "liveindex."
# The embedding a scan gets when --latent says only "on" (see the README's "Latent maps":
# measured, the PCA basis clusters as well or better and costs less; the encoder is opt-in).
DEFAULT_KIND = "pca"


def default_encoder_path(modality: str) -> Path:
    return ENCODERS / f"{modality}.onnx"


@dataclass
class EncoderFile:
    """An encoder as stored: the graphs' bytes and what they were made for."""

    encoder: bytes
    decoder: bytes
    modality: str
    feature_shape: tuple[int, int]
    dims: int
    invariant_dims: int = 0
    provenance: dict = field(default_factory=dict)

    def save(self, path) -> Path:
        import onnx

        model = onnx.load_from_string(self.encoder)
        del model.metadata_props[:]
        meta = {"decoder": base64.b64encode(self.decoder).decode("ascii"), "modality": self.modality,
                "feature_shape": json.dumps(list(self.feature_shape)), "dims": str(self.dims),
                "invariant_dims": str(self.invariant_dims), "provenance": json.dumps(self.provenance)}
        for key, value in meta.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = META_PREFIX + key, value
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(model.SerializeToString())
        return path

    @classmethod
    def load(cls, path) -> "EncoderFile":
        """InputError (one line) where the file is not a liveindex encoder."""
        import onnx

        path = Path(path)
        try:
            model = onnx.load_from_string(path.read_bytes())
            meta = {p.key[len(META_PREFIX):]: p.value for p in model.metadata_props if p.key.startswith(META_PREFIX)}
            decoder = base64.b64decode(meta["decoder"])
            del model.metadata_props[:]
            return cls(model.SerializeToString(), decoder, meta["modality"],
                       tuple(int(v) for v in json.loads(meta["feature_shape"])), int(meta["dims"]),
                       int(meta.get("invariant_dims", 0)), json.loads(meta.get("provenance", "{}")))
        except FileNotFoundError:
            raise InputError(f"encoder {path} does not exist") from None
        except Exception as exc:
            raise InputError(f"{path} is not a liveindex encoder ({type(exc).__name__}: {exc}); make one with "
                             "liveindex models train-encoder or adapt") from None


class LatentEncoder:
    """embedding = (encoder((features - centre) * scale) - offset) @ whiten, float16; the same
    interface as LatentBasis (dims, feature_shape, n_features, embed, reconstruct, to_wire).

    ``whiten`` (D, D) makes the scan's point-to-point noise in the latent about white
    (``whitening``): the sink's clusters and boundaries measure Euclidean distances, which
    then count noise sigmas in every direction, as in the PCA basis' embedding."""

    method = "encoder"
    makes_patterns = True  # its decoder's output is a pattern's features

    def __init__(self, model: EncoderFile, centre: np.ndarray, scale: np.ndarray, offset: np.ndarray | None = None,
                 whiten: np.ndarray | None = None):
        self.model = model
        self.centre = np.asarray(centre, np.float32)
        self.scale = np.asarray(scale, np.float32)
        d = int(model.dims)
        self.offset = np.zeros(d, np.float32) if offset is None else np.asarray(offset, np.float32).reshape(d)
        self.whiten = np.eye(d, dtype=np.float32) if whiten is None else np.asarray(whiten, np.float32).reshape(d, d)
        self.feature_shape = tuple(model.feature_shape)
        self._sessions: dict[str, object] = {}
        self._lock = threading.Lock()

    @property
    def dims(self) -> int:
        return int(self.model.dims)

    @property
    def n_features(self) -> int:
        return int(self.feature_shape[0] * self.feature_shape[1])

    def _session(self, which: str):
        with self._lock:
            session = self._sessions.get(which)
            if session is None:
                import onnxruntime as ort

                from liveindex.models.onnx_runtime import session_options

                # One thread and the CPU: a few tens of kFLOP a frame, beside the indexer's own sessions.
                session = ort.InferenceSession(getattr(self.model, which), session_options(1),
                                               providers=["CPUExecutionProvider"])
                self._sessions[which] = session
            return session

    def normalise(self, features: np.ndarray) -> np.ndarray:
        return (np.asarray(features, np.float32) - self.centre) * self.scale

    def latent(self, features: np.ndarray) -> np.ndarray:
        """(B, P) features -> (B, D) float32 network latent (before the whitening); NaN rows
        where a feature is not finite."""
        x = self.normalise(features)
        bad = ~np.isfinite(x).all(axis=1)
        out = np.full((len(x), self.dims), np.nan, np.float32)
        if (~bad).any():
            session = self._session("encoder")
            out[~bad] = session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(x[~bad])})[0]
        return out

    def embed(self, features: np.ndarray) -> np.ndarray:
        """(B, P) features -> (B, D) float16 embeddings (NaN rows where a feature is not finite)."""
        out = (self.latent(features) - self.offset) @ self.whiten
        out[~np.isfinite(out).all(axis=1)] = np.nan
        return np.clip(out, -6e4, 6e4).astype(np.float16)

    def reconstruct(self, embedding: np.ndarray) -> np.ndarray:
        """(..., D) embeddings -> (..., P) features through the decoder: a cluster's mean pattern."""
        e = np.asarray(embedding, np.float32)
        flat = np.ascontiguousarray(np.linalg.solve(self.whiten.T.astype(np.float64), e.reshape(-1, self.dims).T).T
                                    + self.offset, np.float32)
        session = self._session("decoder")
        x = session.run(None, {session.get_inputs()[0].name: flat})[0]
        return (x / self.scale + self.centre).reshape(*e.shape[:-1], self.n_features)

    def to_wire(self) -> dict:
        return {"v": WIRE_VERSION, "kind": "encoder", "method": "encoder", "dims": self.dims,
                "feature_shape": list(self.feature_shape), "modality": self.model.modality,
                "invariant_dims": self.model.invariant_dims, "encoder": self.model.encoder,
                "decoder": self.model.decoder, "centre": self.centre.astype("<f4").tobytes(),
                "scale": self.scale.astype("<f4").tobytes(), "offset": self.offset.astype("<f4").tobytes(),
                "whiten": self.whiten.astype("<f4").tobytes()}

    @classmethod
    def from_wire(cls, wire) -> "LatentEncoder":
        """The encoder a scan_start carries; ProtocolError names what is off (the graphs are
        loaded here, so a graph ONNX Runtime refuses is found on receipt, not on a page)."""
        try:
            if not isinstance(wire, dict) or wire.get("v") != WIRE_VERSION:
                raise ValueError(f"version {wire.get('v') if isinstance(wire, dict) else None}, expected {WIRE_VERSION}")
            dims, shape = int(wire["dims"]), tuple(int(v) for v in wire["feature_shape"])
            p = shape[0] * shape[1] if len(shape) == 2 else 0
            if not MIN_DIMS <= dims <= MAX_DIMS or not 0 < p <= MAX_FEATURES:
                raise ValueError(f"{dims} dims of {shape} features")
            enc, dec = wire["encoder"], wire["decoder"]
            if not isinstance(enc, bytes) or not isinstance(dec, bytes) or len(enc) + len(dec) > MAX_MODEL_BYTES:
                raise ValueError(f"the graphs must be bytes, {MAX_MODEL_BYTES} at most together")
            centre = np.frombuffer(wire["centre"], "<f4").astype(np.float32)
            scale = np.frombuffer(wire["scale"], "<f4").astype(np.float32)
            if centre.size != p or scale.size != p:
                raise ValueError("normalisation sizes do not match feature_shape")
            offset = np.frombuffer(wire.get("offset", np.zeros(dims, "<f4").tobytes()), "<f4").astype(np.float32)
            whiten = np.frombuffer(wire.get("whiten", np.eye(dims, dtype="<f4").tobytes()), "<f4").astype(np.float32)
            if offset.size != dims or whiten.size != dims * dims:
                raise ValueError("offset or whiten sizes do not match dims")
            if abs(np.linalg.det(whiten.reshape(dims, dims).astype(np.float64))) < 1e-30:
                raise ValueError("a singular whiten matrix")
            if not (np.isfinite(centre).all() and np.isfinite(scale).all() and np.isfinite(offset).all()
                    and np.isfinite(whiten).all()):
                raise ValueError("non-finite normalisation")
            invariant = int(wire.get("invariant_dims", 0))
            model = EncoderFile(enc, dec, str(wire.get("modality", ""))[:32], shape, dims, invariant)
            out = cls(model, centre, scale, offset, whiten)
            out.check()
            return out
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"scan_start latent encoder is malformed ({exc})") from None

    def check(self) -> None:
        """Both graphs load and give the shapes the header says (ValueError otherwise)."""
        try:
            enc, dec = self._session("encoder"), self._session("decoder")
            declared = (enc.get_inputs()[0].shape[-1], enc.get_outputs()[0].shape[-1], dec.get_inputs()[0].shape[-1],
                        dec.get_outputs()[0].shape[-1])
        except Exception as exc:
            raise ValueError(f"the graphs do not run ({type(exc).__name__}: {str(exc)[:200]})") from None
        if declared != (self.n_features, self.dims, self.dims, self.n_features):
            raise ValueError(f"the graphs take and give {declared}; the header says {self.n_features} features and "
                             f"{self.dims} dims")
        try:
            z = self._session("encoder").run(None, {self._session("encoder").get_inputs()[0].name:
                                                    np.zeros((2, self.n_features), np.float32)})[0]
            x = self._session("decoder").run(None, {self._session("decoder").get_inputs()[0].name:
                                                    np.zeros((2, self.dims), np.float32)})[0]
        except Exception as exc:
            raise ValueError(f"the graphs do not run ({type(exc).__name__}: {str(exc)[:200]})") from None
        if z.shape != (2, self.dims) or x.shape != (2, self.n_features):
            raise ValueError(f"the graphs give {z.shape} and {x.shape}, not (2, {self.dims}) and (2, {self.n_features})")


def latent_from_wire(wire) -> LatentBasis | LatentEncoder:
    """A scan_start's ``latent`` entry, either kind (``kind`` absent: a PCA basis, as before)."""
    kind = wire.get("kind", "pca") if isinstance(wire, dict) else None
    if kind == "encoder":
        return LatentEncoder.from_wire(wire)
    if kind == "pca":
        return LatentBasis.from_wire(wire)
    raise ProtocolError(f"scan_start latent is malformed (kind {kind!r}, expected one of {', '.join(KINDS)})")


# -- the scan's normalisation and the choice on the command line ---------------------------------


def scan_tiles(read, nav_shape, features, count: int = 256):
    """(T, 9, P) features of ``count`` 3x3 tiles spread over the scan (as basis.read_tiles,
    the frames kept): the fit of the normalisation, and adapt's training data."""
    ny, nx = (int(v) for v in nav_shape)
    h, w = min(TILE, ny), min(TILE, nx)
    out = []
    for y, x in tile_starts(nav_shape, count):
        out.append(np.concatenate([features(read(int((y + dy) * nx + x), w)) for dy in range(h)]))
    return np.stack(out).astype(np.float32)


def scan_normalisation(tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(T, k, P) tile features -> (centre, scale), (P,) each: the median of the tile means, and
    1 / the median over tiles of the spread inside a tile (robust to tiles across a boundary),
    floored at 5% of its median (features that never move are not blown up)."""
    tiles = np.asarray(tiles, np.float64)
    ok = np.isfinite(tiles).all(axis=(1, 2))
    if ok.sum() < 4:
        raise InputError(f"{ok.sum()} tiles with signal: too few to normalise an encoder's features on")
    tiles = tiles[ok]
    centre = np.median(tiles.mean(axis=1), axis=0)
    spread = np.median(tiles.std(axis=1), axis=0)
    spread = np.maximum(spread, 0.05 * float(np.median(spread)) + 1e-12)
    return centre.astype(np.float32), (1.0 / spread).astype(np.float32)


def whitening(encoder: LatentEncoder, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(offset (D,), whiten (D, D)) for the scan's (T, k, P) tile features: the median latent,
    and the inverse square root of the latent's covariance inside a tile (the point-to-point
    noise; eigenvalues floored at 1e-4 of the largest), so that noise is white in the embedding."""
    t, k, p = tiles.shape
    z = encoder.latent(tiles.reshape(-1, p)).astype(np.float64).reshape(t, k, -1)
    z = z[np.isfinite(z).all(axis=(1, 2))]
    if len(z) < 4:
        raise InputError("too few tiles with signal to whiten an encoder's latent on")
    inside = (z - z.mean(axis=1, keepdims=True)).reshape(-1, z.shape[-1])
    cov = inside.T @ inside / max(len(inside) - len(z), 1)
    w, v = np.linalg.eigh(cov)
    w = np.maximum(w, 1e-4 * max(w.max(), 1e-12))
    whiten = v @ np.diag(w ** -0.5) @ v.T
    return np.median(z.reshape(-1, z.shape[-1]), axis=0).astype(np.float32), whiten.astype(np.float32)


def parse_latent(text: str):
    """--latent: off -> False; on -> True (the default kind); pca; encoder (the shipped one);
    encoder:PATH (a trained or adapted one)."""
    text = str(text)
    if text == "off":
        return False
    if text == "on":
        return True
    if text in KINDS or text == "fixed":
        return text
    if text.startswith("encoder:") and len(text) > len("encoder:"):
        return text
    import argparse

    raise argparse.ArgumentTypeError(f"{text!r}: use on, off, pca, fixed, encoder or encoder:PATH.onnx")


def latent_choice(value):
    """A --latent value as parsed (True, False, a kind) from either a parsed or a raw string."""
    return parse_latent(value) if isinstance(value, str) else bool(value) if value in (None, 0, 1) else value


LATENT_HELP = ("the embedding of every frame for the cluster, boundary and novelty maps: on (the default kind, "
               f"{DEFAULT_KIND}; fixed for a live source), off, pca (the scan's linear basis), fixed (the lowest "
               "spatial frequencies of the features, no fit), encoder (the modality's shipped encoder network) or "
               "encoder:PATH.onnx (one made by liveindex models train-encoder or adapt)")


def chosen_encoder(choice, modality: str) -> Path | None:
    """The encoder file a --latent choice names, or None where it asks for the PCA basis."""
    if choice is True:
        choice = DEFAULT_KIND
    if choice in (False, None, "pca", "fixed"):
        return None
    if choice == "encoder":
        return default_encoder_path(modality)
    return Path(str(choice).split(":", 1)[1])


def encoder_for_scan(path, modality: str, read, nav_shape, features, feature_shape) -> LatentEncoder:
    """The encoder in ``path`` with the scan's normalisation (InputError where it does not fit)."""
    model = EncoderFile.load(path)
    if model.modality != modality:
        raise InputError(f"encoder {path} is for {model.modality} patterns, not {modality}")
    if tuple(model.feature_shape) != tuple(feature_shape):
        raise InputError(f"encoder {path} takes {tuple(model.feature_shape)} features; this scan's are "
                         f"{tuple(feature_shape)} (train one for it: liveindex models adapt FILE --modality "
                         f"{modality} --out NEW.onnx, then --latent encoder:NEW.onnx)")
    tiles = scan_tiles(read, nav_shape, features)
    centre, scale = scan_normalisation(tiles)
    offset, whiten = whitening(LatentEncoder(model, centre, scale), tiles)
    encoder = LatentEncoder(model, centre, scale, offset, whiten)
    log.info("latent encoder %s (%d dims, %d invariant to an in-plane turn) normalised on this scan", path,
             model.dims, model.invariant_dims)
    return encoder


def latent_start(source, modality: str, *, fit_pca, features, feature_shape, dims: int) -> dict:
    """``{"latent": wire}`` for the scan_start: the PCA basis (``fit_pca(source)``) or the
    encoder the source's ``fit_latent`` (the --latent choice) names; for a live source (its
    frames come only as they are acquired, after the scan_start) or ``--latent fixed``, the
    basis that needs no frames (basis.py ``fixed_basis``). A named encoder that does not fit
    the scan is an InputError (the user asked for it); any other failure leaves the scan
    without an embedding, as before."""
    if source.fit_latent == "fixed" or getattr(source, "live", False):
        if source.fit_latent not in (True, "fixed"):
            log.warning("latent maps: a live source gets the fixed basis (--latent %s needs the scan's frames "
                        "before it starts)", source.fit_latent)
        from .basis import fixed_basis

        return {"latent": fixed_basis(feature_shape, dims).to_wire()}
    path = chosen_encoder(source.fit_latent, modality)
    if path is not None:
        return {"latent": encoder_for_scan(path, modality, source.read, source.nav_shape, features,
                                           feature_shape).to_wire()}
    try:
        return {"latent": fit_pca(source).to_wire()}
    except Exception as exc:  # a scan too small or frames without signal: indexing goes on without
        log.warning("no latent basis for this scan (%s: %s); its points get no embedding", type(exc).__name__, exc)
        return {}

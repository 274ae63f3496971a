"""A scan-adaptive linear basis: an embedding of every frame, comparable across workers.

Several workers on several hosts embed different pages of one scan, so they must all use
the same basis. It is fitted once, where the frames are, before any page is embedded: by
``ScanSource.scan_start`` (the publisher's, or ``liveindex index``'s), and it travels in the
scan_start header (``latent``: about 60 kB for 16 x 900), which every worker and the sink
get. A deterministic fit in each worker would need the same frames in each, which a worker
never has; a refit as the scan grows would make embeddings sent earlier incomparable, so
there is none (measured: the fit on 3x3 tiles spread over the scan finds the structure the
whole scan has; a fit on the first rows only sees the grains there).

The fit (``fit_basis``) works on *tile means*: the mean feature of 3x3 neighbouring points.
Averaging 9 frames divides the detector noise by 9 while a region's own pattern stays, so
weak differences (gamma prime's superlattice bands over the gamma matrix: 3.4 noise sigmas
a pattern at moderate noise) rise above the noise floor that hides them in single frames.
Features are scaled per element by 1/sqrt(mean) (Poisson noise made about white), then:

1. principal components of the tiles, as many as stand clearly above the noise
   (eigenvalue over 4x the Marchenko-Pastur edge), at most half the dims;
2. the tiles grouped on those components (HDBSCAN), and in each group the first principal
   component of what is left inside it where it stands out (1.5x the next): the direction
   that splits a region that the first step sees as one (matrix and precipitates of one
   grain, same orientation);
3. the rest filled with the next principal components; all orthonormalised.

``nmf_basis`` fits non-negative parts instead (scikit-learn NMF); its embedding needs an
iterative solve per frame, measured in benchmarks/latent.py, so PCA is what workers use.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from liveindex.models.errors import InputError, LiveIndexError, ProtocolError

log = logging.getLogger(__name__)

DEFAULT_DIMS = 16
MIN_DIMS, MAX_DIMS = 8, 32
TILE = 3  # tile side in scan points
FIT_TILES = 1024  # tiles read for a fit (9216 frames; fewer where the scan is smaller)
MAX_FEATURES = 4096  # elements of a feature vector a basis may have on the wire
WIRE_VERSION = 1


@dataclass(frozen=True)
class LatentBasis:
    """embedding = ((features - mean) * scale) @ components.T, as float16."""

    mean: np.ndarray  # (P,) float32
    scale: np.ndarray  # (P,) float32
    components: np.ndarray  # (D, P) float32, orthonormal rows
    feature_shape: tuple[int, int]  # how a feature vector is shown as an image
    method: str = "pca"

    @property
    def dims(self) -> int:
        return int(self.components.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.components.shape[1])

    def embed(self, features: np.ndarray) -> np.ndarray:
        """(B, P) features -> (B, D) float16 embeddings (NaN rows where a feature is not finite)."""
        x = (np.asarray(features, np.float32) - self.mean) * self.scale
        # In float64, then rounded to float16: a float32 product's last bits depend on how many
        # rows the BLAS call has (its kernels differ with the row count on AVX-512 hosts), and a
        # frame must get the same embedding whatever page it comes in.
        out = x.astype(np.float64) @ self.components.T.astype(np.float64)
        out[~np.isfinite(out).all(axis=1)] = np.nan
        return np.clip(out, -6e4, 6e4).astype(np.float16)

    @property
    def makes_patterns(self) -> bool:
        """Whether ``reconstruct`` gives a pattern an indexer can answer for: not the fixed
        basis' low-pass sketch (``fixed_basis``)."""
        return self.method != "fixed"

    def reconstruct(self, embedding: np.ndarray) -> np.ndarray:
        """(..., D) embeddings -> (..., P) features: a cluster's mean pattern from its mean embedding."""
        e = np.asarray(embedding, np.float32)
        return (e @ self.components) / self.scale + self.mean

    def to_wire(self) -> dict:
        return {"v": WIRE_VERSION, "kind": "pca", "method": self.method, "dims": self.dims, "feature_shape": list(self.feature_shape),
                "mean": self.mean.astype("<f4").tobytes(), "scale": self.scale.astype("<f4").tobytes(),
                "components": self.components.astype("<f4").tobytes()}

    @classmethod
    def from_wire(cls, wire) -> "LatentBasis":
        """The basis a scan_start carries; ProtocolError names what is off."""
        try:
            if not isinstance(wire, dict) or wire.get("v") != WIRE_VERSION:
                raise ValueError(f"version {wire.get('v') if isinstance(wire, dict) else None}, expected {WIRE_VERSION}")
            dims, shape = int(wire["dims"]), tuple(int(v) for v in wire["feature_shape"])
            p = shape[0] * shape[1]
            if not MIN_DIMS <= dims <= MAX_DIMS or len(shape) != 2 or not 0 < p <= MAX_FEATURES:
                raise ValueError(f"{dims} dims of {shape} features")
            mean = np.frombuffer(wire["mean"], "<f4").astype(np.float32)
            scale = np.frombuffer(wire["scale"], "<f4").astype(np.float32)
            comps = np.frombuffer(wire["components"], "<f4").astype(np.float32)
            if mean.size != p or scale.size != p or comps.size != dims * p:
                raise ValueError("array sizes do not match dims and feature_shape")
            if not (np.isfinite(mean).all() and np.isfinite(scale).all() and np.isfinite(comps).all()):
                raise ValueError("non-finite values")
            return cls(mean, scale, comps.reshape(dims, p), shape, str(wire.get("method", "pca"))[:16])
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"scan_start latent basis is malformed ({exc})") from None


def fixed_basis(feature_shape, dims: int = DEFAULT_DIMS) -> LatentBasis:
    """A basis that needs no frames, for a source that gives them only as they come (a
    detector stream, a file being written), which cannot be fitted on before its scan_start:
    the ``dims`` lowest spatial frequencies of the feature image (2-D cosines, orthonormal,
    the constant left out). Every worker embeds alike in it, as in a fitted basis; the
    sink's clustering is indifferent to its overall scale (densities, radii and the boundary
    map are all relative). It sees coarser differences than a fitted basis: grains and a phase
    missing from the list, not weak ordering (benchmarks/latent.py --embedding fixed)."""
    h, w = (int(v) for v in feature_shape)
    if not MIN_DIMS <= dims <= min(MAX_DIMS, h * w - 1):
        raise InputError(f"latent dims {dims} must be in {MIN_DIMS}..{min(MAX_DIMS, h * w - 1)} for {h}x{w} features")
    cos_y = np.cos(np.pi * (np.arange(h)[:, None] + 0.5) * np.arange(h)[None, :] / h)  # (y, u)
    cos_x = np.cos(np.pi * (np.arange(w)[:, None] + 0.5) * np.arange(w)[None, :] / w)  # (x, v)
    # Lowest frequencies first (u/h and v/w as cycles over the image), the constant left out.
    order = sorted(((u, v) for u in range(h) for v in range(w) if u or v),
                   key=lambda uv: ((uv[0] / h) ** 2 + (uv[1] / w) ** 2, uv))[:dims]
    components = np.stack([np.outer(cos_y[:, u], cos_x[:, v]).ravel() for u, v in order]).astype(np.float32)
    components /= np.linalg.norm(components, axis=1, keepdims=True)
    p = h * w
    return LatentBasis(np.zeros(p, np.float32), np.ones(p, np.float32), components, (h, w), method="fixed")


def basis_of_scan(scan_start: dict):
    """The embedding a scan_start carries (a LatentBasis, or a LatentEncoder where its
    ``kind`` is ``encoder``: models/latent/encoder.py), or None (said once in the log): a
    modality's page indexer embeds its frames in it."""
    from .encoder import latent_from_wire

    wire = scan_start.get("latent")
    if wire is None:
        log.info("scan %s carries no latent basis; its points get no embedding", scan_start.get("scan", ""))
        return None
    try:
        return latent_from_wire(wire)
    except LiveIndexError as exc:
        log.warning("scan %s: %s; its points get no embedding", scan_start.get("scan", ""), exc)
        return None


def check_dims(dims) -> int:
    if not isinstance(dims, int) or not MIN_DIMS <= dims <= MAX_DIMS:
        raise InputError(f"latent dims {dims!r} must be an integer in {MIN_DIMS}..{MAX_DIMS}")
    return dims


def tile_starts(nav_shape, count: int = FIT_TILES, seed: int = 0) -> np.ndarray:
    """(T, 2) top-left corners of ``count`` 3x3 tiles spread over the scan (seeded: the same
    scan gets the same tiles); fewer where the scan has fewer."""
    ny, nx = (int(v) for v in nav_shape)
    ty, tx = max(1, ny - TILE + 1), max(1, nx - TILE + 1)
    count = min(count, ty * tx, max(64, ny * nx // TILE**2))  # a small scan: about each point once
    flat = np.random.default_rng(seed).choice(ty * tx, count, replace=False)
    return np.stack([flat // tx, flat % tx], axis=1)


def read_tiles(read, nav_shape, features, count: int = FIT_TILES) -> np.ndarray:
    """Mean feature of each of ``count`` 3x3 tiles, (T, P); ``read(first, n)`` gives frames,
    ``features(frames)`` their (n, P) features. Reads TILE rows of TILE frames a tile."""
    ny, nx = (int(v) for v in nav_shape)
    h, w = min(TILE, ny), min(TILE, nx)
    out = []
    for y, x in tile_starts(nav_shape, count):
        rows = [features(read(int((y + dy) * nx + x), w)) for dy in range(h)]
        out.append(np.concatenate(rows).mean(axis=0))
    return np.stack(out).astype(np.float32)


def fit_basis(tiles: np.ndarray, feature_shape, dims: int = DEFAULT_DIMS) -> LatentBasis:
    """The basis of (T, P) tile-mean features (see the module's docstring for the steps)."""
    check_dims(dims)
    tiles = np.asarray(tiles, np.float64)
    t, p = tiles.shape
    mean = tiles.mean(axis=0)
    scale = 1.0 / np.sqrt(np.maximum(np.abs(mean), 1e-6 * max(np.abs(mean).max(), 1e-12)))
    x = (tiles - mean) * scale
    _, sv, vt = np.linalg.svd(x, full_matrices=False)
    ev = sv**2 / t
    noise = float(np.median(ev)) if len(ev) else 0.0
    edge = noise * (1 + np.sqrt(p / t)) ** 2
    k = int(np.clip((ev > 4 * edge).sum(), 1, dims // 2))
    rows = [vt[:k]]
    rows += _group_directions(x, x @ vt[:k].T)
    basis = _orthonormal(np.concatenate(rows))[:dims]
    if len(basis) < dims:  # the next principal components, orthogonal to what is in
        rest = vt[k:] - (vt[k:] @ basis.T) @ basis
        basis = _orthonormal(np.concatenate([basis, rest[:dims - len(basis) + 4]]))[:dims]
    if len(basis) < dims:  # fewer tiles than dims: seeded directions, so the embedding keeps its width
        extra = np.random.default_rng(0).standard_normal((dims - len(basis) + 4, p))
        basis = _orthonormal(np.concatenate([basis, extra]))[:dims]
    log.info("latent basis: %d x %d from %d tiles (%d principal, %d splitting directions)", len(basis), p, t, k,
             sum(len(r) for r in rows[1:]))
    return LatentBasis(mean.astype(np.float32), scale.astype(np.float32), basis.astype(np.float32),
                       tuple(int(v) for v in feature_shape))


def _group_directions(x: np.ndarray, scores: np.ndarray, min_group: int = 20) -> list[np.ndarray]:
    """In each group of similar tiles, the first principal direction of what is left inside
    the group, where it stands out (1.5x the next): a split the first components miss."""
    from sklearn.cluster import HDBSCAN

    if len(x) < 2 * min_group:
        return []
    labels = HDBSCAN(min_cluster_size=min_group, copy=True).fit_predict(scores)
    out = []
    for g in range(labels.max() + 1):
        r = x[labels == g]
        r = r - r.mean(axis=0)
        _, s, v = np.linalg.svd(r, full_matrices=False)
        if len(s) > 1 and s[0] ** 2 > 1.5 * s[1] ** 2:
            out.append(v[:1])
    return out


def _orthonormal(rows: np.ndarray) -> np.ndarray:
    """Rows orthonormalised in order, dropping any that the earlier ones already span."""
    q, r = np.linalg.qr(rows.T)
    keep = np.abs(np.diag(r)) > 1e-6 * max(np.abs(np.diag(r)).max(), 1e-12)
    return q.T[keep]


def nmf_basis(tiles: np.ndarray, feature_shape, dims: int = DEFAULT_DIMS, seed: int = 0):
    """Non-negative parts of the tiles (scikit-learn NMF): (components (D, P), fitted model).
    An NMF embedding of a frame is a non-negative least-squares solve (``model.transform``)."""
    from sklearn.decomposition import NMF

    model = NMF(n_components=check_dims(dims), init="nndsvda", max_iter=300, random_state=seed)
    model.fit(np.maximum(np.asarray(tiles, np.float64), 0.0))
    return model.components_.astype(np.float32), model

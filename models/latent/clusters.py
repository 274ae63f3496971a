"""Cluster, boundary and novelty maps of a scan's embeddings, refreshed while it grows.

``LatentClusters`` keeps a few centres. ``refresh`` clusters a bounded random subsample of
the points in (HDBSCAN, or k-means for a given count), matches the new clusters to the old
centres (so a cluster keeps its id and colour between refreshes), and assigns every point
to its nearest centre; between refreshes ``assign`` places each arriving point the same
way. Memory and time are bounded by the subsample (``SAMPLE`` points: HDBSCAN is about
n log n on it) and one pass over the map in chunks for the assignment, boundary and
novelty maps.

- clusters with a spatial prior (spatial.py): a cluster whose two halves (2-means) lie together
  in space is split, and the halves again where they are also two modes (``split_coherent``),
  every point takes its label with its 8 neighbours' say (``spatial_labels``: iterated
  conditional modes), and a cluster's places that do not touch are clusters of their own but
  for places inside one other place (``split_components``); measured on the superalloy scan
  (benchmarks/latent.py), where gamma prime differs from the gamma matrix by about 3 noise
  sigmas a pattern and density alone finds only the grains, and on the spot scans, where one
  HDBSCAN cluster held up to 9 grains and grains apart can share one rotation-invariant embedding;
- boundary: mean embedding distance of a point to its 4 neighbours that are in, over the
  scan's median of it (about 1 inside a region, higher across a boundary);
- novelty, in [0, 1]: how far a point is from every cluster (its distance to the nearest
  centre over that cluster's 95th-percentile radius: 0 up to 1.5 radii, 1 from 3), or, where
  the points are answered with an explanation, the share of its cluster that no listed phase
  explains, above the share of the best explained clusters (``explained_baseline``): a
  cluster is the pattern population; most of it unexplained is a phase missing from the
  list, a few unexplained points in a well explained cluster are noise; in a cluster a
  quarter or more unexplained, each unexplained point is novel too.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import numpy as np

from liveindex.models.errors import InputError

from .spatial import boundary_map, spatial_labels, split_coherent, split_components

log = logging.getLogger(__name__)

SAMPLE = 5000  # points clustered per refresh (measured: HDBSCAN about 1 s on 5000 x 16 here)
MIN_CLUSTER_SHARE = 0.01  # HDBSCAN's min_cluster_size: this share of the sample ...
MIN_CLUSTER_POINTS = 15  # ... and at least this many points
MAX_CLUSTERS = 64  # ids drawn on the map (a palette of this many colours)
NOVEL = 0.5  # novelty at or above this counts as novel (the maps' and the benchmark's threshold)


def parse_clusters(text) -> int | None:
    """``--clusters auto|N``: None (HDBSCAN finds how many) or N (k-means)."""
    if text is None or str(text).lower() == "auto":
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 2 <= n <= MAX_CLUSTERS:
        raise InputError(f"--clusters {text!r} must be auto or a number of clusters in 2..{MAX_CLUSTERS}")
    return n


@dataclass
class Cluster:
    id: int
    centre: np.ndarray  # (D,) float32
    radius: float = 0.0  # 95th percentile of its sampled members' distance to the centre
    size: int = 0  # points assigned at the last refresh
    unexplained: float = 0.0  # share of its points no listed phase explains


@dataclass
class LatentClusters:
    nav_shape: tuple[int, int]
    clusters: int | None = None  # None: HDBSCAN (auto); N: k-means with N clusters
    sample: int = SAMPLE
    seed: int = 0
    known: list[Cluster] = field(default_factory=list)
    next_id: int = 0
    refreshes: int = 0
    baseline: float = 0.0  # unexplained share of the best explained clusters (explained_baseline)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # -- per point -----------------------------------------------------------------------------
    def assign(self, embedding: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, D) embeddings -> (cluster id (B,) int16, -1 none or not finite; distance (B,) float32)."""
        with self.lock:
            known = list(self.known)
        return _nearest(embedding, known)

    # -- the whole map -------------------------------------------------------------------------
    def refresh(self, embedding: np.ndarray, received: np.ndarray, unexplained: np.ndarray | None = None) -> dict:
        """Recluster a subsample of the received points and recompute every map: returns
        ``cluster`` (N,) int16, ``distance``, ``boundary`` and ``novelty`` (N,) float32.
        numpy's BLAS on one thread meanwhile: this runs beside the sink's loop (and, in
        ``liveindex index``, after the pages), and a small SVD on OpenBLAS's default threads took
        0.3 s on this loaded 2-core machine, against milliseconds on one."""
        from liveindex.models.onnx_runtime import blas_threads

        with blas_threads(1):
            return self._refresh(embedding, received, unexplained)

    def _refresh(self, embedding, received, unexplained) -> dict:
        n = len(received)
        embedding = np.asarray(embedding, np.float32)  # once (float16 on the wire): 64 MB at 1e6 x 16
        finite = received.copy()
        finite[received] = np.isfinite(embedding[received]).all(axis=1)
        points = np.flatnonzero(finite)
        rng = np.random.default_rng((self.seed, self.refreshes))
        self.refreshes += 1
        if len(points) > self.sample:
            points = np.sort(rng.choice(points, self.sample, replace=False))
        centres = None
        if len(points) >= 2 * MIN_CLUSTER_POINTS:
            z = embedding[points]
            labels = self._labels(z)
            found = sorted((z[labels == c] for c in range(labels.max() + 1) if (labels == c).any()), key=len,
                           reverse=True)[:MAX_CLUSTERS]
            centres = np.stack([f.mean(axis=0) for f in found])
            if self.clusters is None:
                centres = split_coherent(embedding, finite, centres, self.nav_shape,
                                         min_size=self._min_size(len(z)), limit=MAX_CLUSTERS)
        if centres is None:
            with self.lock:
                centres = np.stack([c.centre for c in self.known]) if self.known else None
        cluster, distance = np.full(n, -1, np.int16), np.full(n, np.nan, np.float32)
        if centres is not None:
            # The spatial prior (ICM) settles each point with its neighbours; the centres it ends
            # with are the clusters' (matched to the old ones, so ids stay).
            index, centres = spatial_labels(embedding, finite, centres, self.nav_shape)
            if self.clusters is None:  # each cluster's places that do not touch: clusters of their own
                index, centres = split_components(index, centres, embedding, self.nav_shape,
                                                  min_size=self._min_size(len(points)), limit=MAX_CLUSTERS)
            self._update(centres, embedding, index)
            with self.lock:
                ids = np.array([c.id for c in self.known], np.int16)
            cluster[finite] = ids[index[finite]]
            own = np.stack([c.centre for c in self.known])[index[finite]]
            distance[finite] = np.linalg.norm(embedding[finite].astype(np.float32) - own, axis=1)
        with self.lock:
            known = list(self.known)
        for c in known:  # sizes and radii from every point now
            mine = cluster == c.id
            c.size = int(mine.sum())
            if c.size:
                c.radius = float(np.percentile(distance[mine], 95))
            c.unexplained = float(unexplained[mine].mean()) if unexplained is not None and c.size else 0.0
        self.baseline = explained_baseline(known)
        novelty = self.novelty(cluster, distance, unexplained)
        return {"cluster": cluster, "distance": distance, "novelty": novelty,
                "boundary": boundary_map(embedding, finite, self.nav_shape)}

    def novelty(self, cluster: np.ndarray, distance: np.ndarray, unexplained: np.ndarray | None = None) -> np.ndarray:
        """(N,) in [0, 1], NaN where no cluster (see the module's docstring). ``unexplained``:
        each point's own evidence, which counts in a cluster a quarter or more unexplained
        (above the baseline): a cluster that mixes a missing phase's points with others (43%
        unexplained on the missing-phase scan) marks its unexplained points, not all of them."""
        with self.lock:
            known = list(self.known)
        out = np.full(len(cluster), np.nan, np.float32)
        base = self.baseline
        for c in known:
            mine = cluster == c.id
            far = np.clip((distance[mine] / max(c.radius, 1e-6) - 1.5) / 1.5, 0.0, 1.0)
            share = max(c.unexplained - base, 0.0) / (1.0 - base)
            point = unexplained[mine] * min(1.0, 2.0 * share) if unexplained is not None else 0.0
            out[mine] = np.maximum(np.maximum(far, share), point)
        return out

    def describe(self) -> list[dict]:
        with self.lock:
            return [{"id": c.id, "size": c.size, "radius": round(c.radius, 4), "unexplained": round(c.unexplained, 4)}
                    for c in self.known]

    def centre(self, cluster_id: int) -> np.ndarray | None:
        with self.lock:
            for c in self.known:
                if c.id == cluster_id:
                    return c.centre.copy()
        return None

    # -- inside ------------------------------------------------------------------------------
    @staticmethod
    def _min_size(n: int) -> int:
        return max(MIN_CLUSTER_POINTS, int(MIN_CLUSTER_SHARE * n))

    def _labels(self, z: np.ndarray) -> np.ndarray:
        if self.clusters is not None:
            from sklearn.cluster import KMeans

            k = min(self.clusters, len(z))
            return KMeans(n_clusters=k, n_init=3, random_state=self.seed).fit_predict(z)
        from sklearn.cluster import HDBSCAN

        labels = HDBSCAN(min_cluster_size=self._min_size(len(z)), copy=True).fit_predict(z)
        if labels.max() < 0:  # one population, no structure: one cluster
            labels[:] = 0
        return labels

    def _update(self, centres: np.ndarray, embedding: np.ndarray, index: np.ndarray) -> None:
        """New centres; each takes the id of the old centre it matches (Hungarian on distance,
        within the larger of their radii) so ids and colours stay between refreshes."""
        from scipy.optimize import linear_sum_assignment

        radii = np.zeros(len(centres))
        for k in range(len(centres)):
            mine = np.flatnonzero(index == k)[:SAMPLE]
            if len(mine):
                radii[k] = np.percentile(np.linalg.norm(embedding[mine].astype(np.float32) - centres[k], axis=1), 95)
        with self.lock:
            old = list(self.known)
        ids = [-1] * len(centres)
        if old:
            d = np.linalg.norm(centres[:, None, :] - np.stack([c.centre for c in old])[None], axis=2)
            rows, cols = linear_sum_assignment(d)
            for r, c in zip(rows, cols):
                if d[r, c] <= max(radii[r], old[c].radius, 1e-6):
                    ids[r] = old[c].id
        new = []
        for r in range(len(centres)):
            if ids[r] < 0:
                ids[r] = self.next_id
                self.next_id += 1
            new.append(Cluster(ids[r], centres[r].astype(np.float32), float(radii[r])))
        with self.lock:
            self.known = new


BASELINE_SHARE = 0.2  # the best explained clusters holding this share of the points set the baseline ...
BASELINE_MOST = 0.8  # ... which is at most this: beyond it no listed phase explains the scan, all is novel


def explained_baseline(clusters: list[Cluster]) -> float:
    """The unexplained share of the best explained clusters that hold a fifth of the points,
    at most 0.8. A cluster's novelty is its unexplained share above this, so patterns poor
    everywhere (hard noise: 62% of the right answers below confidence 0.5 on the
    missing-phase scan) do not make every cluster novel, while a population worse explained
    than the rest still stands out; where even the best fifth is over 80% unexplained, no
    listed phase explains the scan and every cluster is novel."""
    sized = sorted((c for c in clusters if c.size), key=lambda c: c.unexplained)
    total = sum(c.size for c in sized)
    held = 0
    for c in sized:
        held += c.size
        if held >= BASELINE_SHARE * total:
            return min(c.unexplained, BASELINE_MOST)
    return 0.0


def _nearest(embedding: np.ndarray, known: list[Cluster]) -> tuple[np.ndarray, np.ndarray]:
    e = np.asarray(embedding, np.float32)
    n = len(e)
    if not known or n == 0:
        return np.full(n, -1, np.int16), np.full(n, np.nan, np.float32)
    centres = np.stack([c.centre for c in known])
    d2 = (e * e).sum(1)[:, None] - 2 * e @ centres.T + (centres * centres).sum(1)[None]
    best = d2.argmin(axis=1)
    dist = np.sqrt(np.maximum(d2[np.arange(n), best], 0)).astype(np.float32)
    ids = np.array([c.id for c in known], np.int16)[best]
    bad = ~np.isfinite(dist)
    ids[bad], dist[bad] = -1, np.nan
    return ids, dist

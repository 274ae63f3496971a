"""Cluster, boundary and novelty maps of a scan's embeddings, refreshed while it grows.

``LatentClusters`` keeps a few centres. ``refresh`` clusters a bounded random subsample of
the points in (HDBSCAN, or k-means for a given count) when it has changed enough (``_refit``:
every 4th refresh, a quarter more points, or a new population), matches the new clusters to
the old centres (so a cluster keeps its id and colour between refreshes), and assigns every
point to its nearest centre; between refreshes ``assign`` places each arriving point the same
way. Memory and time are bounded by the subsample (``SAMPLE`` points: HDBSCAN is about
n log n on it) and a few chunked passes over the map for the assignment, boundary and
novelty maps (0.4-0.6 s of CPU at 1e6 points, 1.2-1.4 s where it reclusters; benchmarks/latent.py).

- clusters with a spatial prior (spatial.py): a cluster whose two halves (2-means) lie together
  in space is split, and the halves again where they are also two modes (``split_coherent``,
  where the subsample is clustered), every point takes its label with its 8 neighbours' say
  (``spatial_labels``: iterated conditional modes), and a cluster's places that do not touch
  are clusters of their own but for places inside one other place (``split_components``, every
  refresh: the ICM follows the centres before it, ``base``, since places apart can share one
  centre; ids are matched by place first); measured on the superalloy scan (benchmarks/latent.py),
  where gamma prime differs from the gamma matrix by about 3 noise sigmas a pattern and density
  alone finds only the grains, and on the spot scans, where one HDBSCAN cluster held up to 9
  grains and grains apart can share one rotation-invariant embedding;
- boundary: mean embedding distance of a point to its 4 neighbours that are in, over the
  scan's median of it (about 1 inside a region, higher across a boundary); recomputed on the
  rows where points came in;
- novelty, in [0, 1]: how far a point is from every cluster (its distance to the nearest
  centre over that cluster's 95th-percentile radius: 0 up to 1.5 radii, 1 from 3), or, where
  the points are answered, how little a listed phase explains it: its explained share (the
  indexer's calibrated confidence, the chance its answer is right) pooled over the points of
  its own cluster in the 15x15 around it (``pooled_explained``), over the explained share of
  the best explained clusters (``explained_baseline``; at least ``baseline_least``, on the
  scale of the field it reads, so that a scan no listed phase explains is novel): novelty 1
  below 0.0175 of it, 0 above 0.07 (0.5 at 0.035, on a log scale). A missing phase's points
  are answered with confidence about 0; a listed phase's poor patterns (hard noise) with less
  than the best grains' but far from 0, and the pooling over a few hundred neighbours tells
  them apart where one frame does not; pooling within the point's own cluster keeps a missing
  phase's grain apart from a listed one's that shares its cluster. Spots: see QUALITY_GATE.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import numpy as np

from liveindex.models.errors import InputError

from .spatial import (
    boundary_distances,
    normalised_boundary,
    spatial_labels,
    split_coherent,
    split_components,
    squared_norms,
)

log = logging.getLogger(__name__)

SAMPLE = 5000  # points clustered per refresh (measured: HDBSCAN about 1 s on 5000 x 16 here)
MIN_CLUSTER_SHARE = 0.01  # HDBSCAN's min_cluster_size: this share of the sample ...
MIN_CLUSTER_POINTS = 15  # ... and at least this many points
MAX_CLUSTERS = 64  # ids drawn on the map (a palette of this many colours)
NOVEL = 0.5  # novelty at or above this counts as novel (the maps' and the benchmark's threshold)
FAR_FROM, FAR_SPAN = 1.5, 1.5  # novelty from distance: 0 up to 1.5 radii of its cluster, 1 from 3
POOL_RADIUS = 2  # a point's explained share is pooled over its cluster's points in the 15x15 around it ...
RATIO_NOVEL, RATIO_NOT_NOVEL = 0.0175, 0.07  # ... and over the baseline's: novelty 1 below 0.0175, 0 above 0.07,
# 0.5 at 0.035 (on a log scale). The missing-phase scan at hard noise, seeds 1, 2 and 5: the missing phase's
# points above 0.035 0-0.21%, 99% of them below 0.013-0.020; the listed phase's below it 0-0.12%, 99% of
# them above 0.065-0.60 (its worst grain, seed 5, answered with a mean confidence of 0.057, 0.12 of the best).
QUALITY_GATE = 0.62  # spots: no novelty where a point's pooled match score is at least this share of the scan's
# listed points' (listed > 0.5) median score: the templates match that region about as well as the sure points,
# so a listed phase explains it, however unsure its orientations (hard noise). A listed phase's poor grains keep
# 0.65-0.93 of it, a missing phase's grains 0.38-0.68 (hard seeds 3, 5; moderate 3, 7; clean 5). 40x40 scans of
# the three steel phases indexed with them (benchmarks/spots_novelty.py), listed points novel without -> with the
# gate: hard seeds 5 / 9 / 13 470 / 388 / 246 -> 14 / 9 / 0 of about 1420 (the scan's "is a phase missing?" no
# longer asked); with hcp Ti unlisted, Ti points novel: moderate 7 / 11 / 13 89 / 78 / 51% -> 73 / 72 / 49%,
# clean 5 47% -> 47%, hard 5 / 9 77 / 74% -> 64 / 23% (still asked: far above 1% of the scan).
QUALITY_REFERENCE_SHARE = 0.05  # the gate's reference (the sure points' median score) only from sure points that
QUALITY_REFERENCE_LEAST = 50  # are at least this share of the answered points and at least this many; else no gate.
# Why: a phase missing from the list gives a few falsely sure points too, and where no listed phase is in the scan
# at all they alone set the reference: their median score is the missing phase's own, so its regions passed the
# gate (all-Ti 40x40 scans, with BASELINE_LEAST_LISTED: Ti points novel moderate seeds 5 / 9 69 / 89 of about 1460,
# hard 5 0 of 1502, the line not asking; with no gate there 468 / 494 / 1142). Sure points (listed > 0.5) measured
# on the 40x40 scans of benchmarks/spots_novelty.py: all hcp Ti (--all-missing) 0.6-2.1% of the answered points
# (8-30 points; clean 5, moderate 5 / 9, hard 5), any listed phase in the scan 15-36% (205-875 points; steel only
# hard 5 / 9 / 13, moderate 7; with Ti moderate 5 / 9 / 13, hard 5 / 9). Without the gate the novelty still
# weighs each region against the best explained clusters (and BASELINE_LEAST_LISTED where none is explained).
REFIT_EVERY = 4  # the subsample is clustered again every this many refreshes at least, ...
REFIT_GROWTH = 1.25  # ... where the points in grew by this factor since, ...
REFIT_FAR = 0.02  # ... or where this share of the subsample is far from every cluster (novelty 0.5 or more)
RADIUS_SAMPLE = 200_000  # points of the map a cluster's radius (95th percentile) is taken from
BASELINE_SHARE = 0.2  # the best explained clusters holding this share of the points set the baseline ...
BASELINE_LEAST = 0.2  # ... taken as at least this: where nothing is explained, all is novel (below 0.01-0.05).
# The least is on the scale of the explained share the novelty reads: just below what the best fifth of a scan
# with a listed phase in it reads, so that it changes nothing there and decides only where no listed phase is
# in the scan. The calibrated confidence (EBSD): 0.2 (the listed grains' 0.21-0.59: explained_baseline).
# A modality's listed field (spots: the chance that a listed phase explains the pattern) reads higher for a
# listed phase and about as low for a missing one (median 0.01-0.05): the baselines of the 40x40 scans with a
# listed phase (benchmarks/spots_novelty.py: steel only hard 5 / 9 / 13, moderate 7; with Ti moderate 5 / 9 / 13,
# hard 5 / 9) 0.60-0.99, so 0.5, the field's own threshold for sure; at 0.2 an all-Ti scan's pooled 0.01-0.07
# stayed above 0.035 of it (novelty 0.5): 0-17 of 1502 Ti points novel. Measured without the gate (which takes
# no reference there: QUALITY_REFERENCE_SHARE), Ti novel at 0.5 / 0.7 / 1.0: moderate seed 5 31 / 58 / 76%,
# clean 5 9 / 19 / 36%, hard 5 76 / 80 / 83%; above 0.6 the floor would reach the scans with listed phases (hard
# seed 9 with Ti, baseline 0.60), which its job is not.
BASELINE_LEAST_LISTED = 0.5


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
    unexplained: float = 0.0  # share of its answered points no listed phase explains (explained below 0.5)
    explained: float = 0.0  # mean of its answered points' explained (calibrated confidence): the share right
    novel: float = 0.0  # share of its points novel at the last refresh


@dataclass
class LatentClusters:
    nav_shape: tuple[int, int]
    clusters: int | None = None  # None: HDBSCAN (auto); N: k-means with N clusters
    sample: int = SAMPLE
    seed: int = 0
    known: list[Cluster] = field(default_factory=list)
    next_id: int = 0
    refreshes: int = 0
    baseline: float = 1.0  # explained share of the best explained clusters (explained_baseline)
    # The least baseline the novelty takes, on the scale of the explained share it is given: BASELINE_LEAST for a
    # calibrated confidence, BASELINE_LEAST_LISTED for a modality's listed field (stream/latent_map.py sets it).
    baseline_least: float = BASELINE_LEAST
    quality_top: float | None = None  # spots: the sure points' median match score (QUALITY_GATE); None: no gate
    fitted_points: int = 0  # points in at the last clustering of a subsample ...
    since_fit: int = 0  # ... and refreshes since
    boundary_raw: np.ndarray | None = field(default=None, repr=False)  # boundary before the median (incremental)
    boundary_in: np.ndarray | None = field(default=None, repr=False)  # the points it was computed with
    base: np.ndarray | None = field(default=None, repr=False)  # the ICM's centres, before places apart were split
    last_cluster: np.ndarray | None = field(default=None, repr=False)  # the cluster map of the last refresh (ids)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # -- per point -----------------------------------------------------------------------------
    def assign(self, embedding: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, D) embeddings -> (cluster id (B,) int16, -1 none or not finite; distance (B,) float32)."""
        with self.lock:
            known = list(self.known)
        return _nearest(embedding, known)

    # -- the whole map -------------------------------------------------------------------------
    def refresh(self, embedding: np.ndarray, received: np.ndarray, explained: np.ndarray | None = None,
                quality: np.ndarray | None = None) -> dict:
        """Recluster a subsample of the received points (where it has changed enough, see
        ``_refit``) and recompute every map: returns ``cluster`` (N,) int16, ``distance``,
        ``boundary`` and ``novelty`` (N,) float32. ``explained`` (N,): each answered point's
        chance that a listed phase explains it (its calibrated confidence), NaN where not
        answered. numpy's BLAS on one thread meanwhile: this runs beside the sink's loop (and, in
        ``liveindex index``, after the pages), and a small SVD on OpenBLAS's default threads took
        0.3 s on this loaded 2-core machine, against milliseconds on one."""
        from liveindex.models.onnx_runtime import blas_threads

        with blas_threads(1):
            return self._refresh(embedding, received, explained, quality)

    def _refresh(self, embedding, received, explained, quality=None) -> dict:
        n = len(received)
        embedding = np.asarray(embedding, np.float32)  # once (float16 on the wire): 64 MB at 1e6 x 16
        ee = squared_norms(embedding, received)  # |z|^2, NaN where a value is not finite: one pass
        finite = received & np.isfinite(ee)
        points = np.flatnonzero(finite)
        rng = np.random.default_rng((self.seed, self.refreshes))
        self.refreshes += 1
        if len(points) > self.sample:
            points = np.sort(rng.choice(points, self.sample, replace=False))
        centres = None
        with self.lock:
            known = list(self.known)
        if len(points) >= 2 * MIN_CLUSTER_POINTS and self._refit(embedding[points], len(np.flatnonzero(finite)), known):
            z = embedding[points]
            labels = self._labels(z)
            found = sorted((z[labels == c] for c in range(labels.max() + 1) if (labels == c).any()), key=len,
                           reverse=True)[:MAX_CLUSTERS]
            centres = np.stack([f.mean(axis=0) for f in found])
            if self.clusters is None:
                centres = split_coherent(embedding, finite, centres, self.nav_shape,
                                         min_size=self._min_size(len(z)), limit=MAX_CLUSTERS)
            self.fitted_points, self.since_fit = int(finite.sum()), 0
        else:
            self.since_fit += 1
        if centres is None and self.base is not None:  # the ICM follows the clusters it settled last
            centres = self.base
        elif centres is None and known:
            centres = np.stack([c.centre for c in known])
        cluster, distance = np.full(n, -1, np.int16), np.full(n, np.nan, np.float32)
        if centres is not None:
            # The spatial prior (ICM) settles each point with its neighbours; the centres it ends
            # with are the clusters' (matched to the old ones, so ids stay).
            index, centres, d2 = spatial_labels(embedding, finite, centres, self.nav_shape, ee=ee)
            self.base = centres
            if self.clusters is None:  # each cluster's places that do not touch: clusters of their own
                index, centres, d2 = split_components(index, centres, embedding, self.nav_shape,
                                                      min_size=self._min_size(len(points)), limit=MAX_CLUSTERS,
                                                      d2=d2, ee=ee)
            self._update(centres, embedding, index)
            with self.lock:
                known = list(self.known)
            ids = np.array([c.id for c in known], np.int16)
            cluster[finite] = ids[index[finite]]
            distance[finite] = np.sqrt(d2[finite])
        else:
            index = np.full(n, -1, np.int64)
        self._describe_clusters(known, index, distance, explained)
        pooled = self.pooled(cluster, explained) if explained is not None else None
        pooled_quality = None
        if quality is not None and explained is not None:
            self.quality_top = quality_reference(quality, explained)
            if self.quality_top is not None:
                pooled_quality = self.pooled(cluster, quality)
        novelty = self.novelty(cluster, distance, pooled, pooled_quality)
        if known:
            novel = np.bincount(index[finite], weights=(novelty[finite] >= NOVEL), minlength=len(known))
            for k, c in enumerate(known):
                c.novel = float(novel[k] / c.size) if c.size else 0.0
        self.last_cluster = cluster
        return {"cluster": cluster, "distance": distance, "novelty": novelty,
                "boundary": self._boundary(embedding, finite)}

    def _refit(self, z: np.ndarray, points: int, known: list[Cluster]) -> bool:
        """Cluster the subsample again? Always where there are no clusters yet; else where the
        points in grew by a quarter since the last fit, ``REFIT_EVERY`` refreshes went by, or
        the subsample holds a new population (``REFIT_FAR`` of it far from every cluster, as
        the novelty map's 0.5). Between fits the clusters follow the points through the ICM's
        centres (HDBSCAN and the split were 1.0 of the 2.9 s of a refresh at 1e6 points)."""
        if not known:
            return True
        if self.since_fit + 1 >= REFIT_EVERY or points >= REFIT_GROWTH * max(self.fitted_points, 1):
            return True
        ids, dist = _nearest(z, known)
        slot = _slots(known)
        radius = np.array([max(c.radius, 1e-6) for c in known], np.float32)
        far = dist[ids >= 0] / radius[slot[ids[ids >= 0]]]
        return bool(np.mean(far >= FAR_FROM + 0.5 * FAR_SPAN) >= REFIT_FAR)

    def _describe_clusters(self, known, index, distance, explained) -> None:
        """Each cluster's size, radius (95th percentile of its members' distances, from at most
        ``RADIUS_SAMPLE`` points of the map), explained and unexplained shares; the baseline."""
        if not known:
            return
        k = len(known)
        own = np.flatnonzero(index >= 0)
        sizes = np.bincount(index[own], minlength=k)
        step = max(1, len(own) // RADIUS_SAMPLE)
        sub = own[::step]
        order = np.argsort(index[sub], kind="stable")
        sorted_d = distance[sub][order]
        bounds = np.searchsorted(index[sub][order], np.arange(k + 1))
        if explained is not None:
            answered = own[np.isfinite(explained[own])]
            counts = np.bincount(index[answered], minlength=k)
            mean = np.bincount(index[answered], weights=explained[answered], minlength=k) / np.maximum(counts, 1)
            below = np.bincount(index[answered], weights=explained[answered] < 0.5, minlength=k) / np.maximum(counts, 1)
        for j, c in enumerate(known):
            c.size = int(sizes[j])
            d = sorted_d[bounds[j]:bounds[j + 1]]
            if len(d):
                c.radius = float(np.percentile(d, 95))
            if explained is not None and counts[j]:
                c.explained, c.unexplained = float(mean[j]), float(below[j])
            else:  # nothing answered (or no answers given): nothing says it is unexplained
                c.explained, c.unexplained = 1.0, 0.0
        self.baseline = explained_baseline(known)

    def pooled(self, cluster: np.ndarray, explained: np.ndarray, rows: tuple[int, int] | None = None) -> np.ndarray:
        """Each point's explained share pooled over the points of its own cluster about it
        (``pooled_explained``)."""
        return pooled_explained(cluster, explained, self.nav_shape, rows=rows)

    def novelty(self, cluster: np.ndarray, distance: np.ndarray, pooled: np.ndarray | None = None,
                pooled_quality: np.ndarray | None = None) -> np.ndarray:
        """(N,) in [0, 1], NaN where no cluster (see the module's docstring): far from its
        cluster, or (``pooled``, each point's explained share over its neighbours of its own
        cluster) explained far less than the scan's best explained clusters are."""
        with self.lock:
            known = list(self.known)
        out = np.full(len(cluster), np.nan, np.float32)
        if not known:
            return out
        radius = np.array([max(c.radius, 1e-6) for c in known], np.float32)
        slot = _slots(known)
        c = cluster.astype(np.int64)
        k = np.where((c >= 0) & (c < len(slot)), slot[np.clip(c, 0, len(slot) - 1)], -1)
        mine = k >= 0
        far = np.clip((distance[mine] / radius[k[mine]] - FAR_FROM) / FAR_SPAN, 0.0, 1.0)
        if pooled is not None:
            ratio = np.maximum(pooled[mine] / max(self.baseline, self.baseline_least), 1e-9)
            poor = np.clip(np.log(RATIO_NOT_NOVEL / ratio) / np.log(RATIO_NOT_NOVEL / RATIO_NOVEL), 0.0, 1.0)
            top = self.quality_top
            if pooled_quality is not None and top is not None and top > 0:
                poor = np.where(pooled_quality[mine] / top >= QUALITY_GATE, 0.0, poor)
            far = np.maximum(far, np.nan_to_num(poor, nan=0.0))
        out[mine] = far
        return out

    def _boundary(self, embedding: np.ndarray, finite: np.ndarray) -> np.ndarray:
        """The boundary map, recomputed only on the rows where points came in (or went) since
        the last refresh, with their neighbour rows: a scan grows a few rows a refresh."""
        ny, nx = (int(v) for v in self.nav_shape)
        if self.boundary_raw is None or self.boundary_in is None or len(self.boundary_in) != len(finite):
            self.boundary_raw = boundary_distances(embedding, finite, self.nav_shape)
        else:
            rows = np.flatnonzero((finite != self.boundary_in).reshape(ny, nx).any(axis=1))
            if len(rows):
                y0, y1 = max(int(rows[0]) - 1, 0), min(int(rows[-1]) + 2, ny)
                self.boundary_raw[y0 * nx:y1 * nx] = boundary_distances(embedding, finite, self.nav_shape,
                                                                        rows=(y0, y1))
        self.boundary_in = finite.copy()
        return normalised_boundary(self.boundary_raw)

    def describe(self) -> list[dict]:
        with self.lock:
            return [{"id": c.id, "size": c.size, "radius": round(c.radius, 4), "unexplained": round(c.unexplained, 4),
                     "explained": round(c.explained, 4), "novel_share": round(c.novel, 4)} for c in self.known]

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
        """New centres; each takes the id of the old cluster it matches so ids and colours stay
        between refreshes: first by place (Hungarian on the points each new cluster shares with
        each old one on the last map, where it holds half or more of the new one's points that
        had an id), then by centre (Hungarian on distance, within the larger of their radii).
        The place comes first: a cluster's places apart (``split_components``) can have one
        centre (grains that differ by a turn about the beam), which distance does not tell apart."""
        from scipy.optimize import linear_sum_assignment

        radii = np.zeros(len(centres))
        for k in range(len(centres)):
            mine = np.flatnonzero(index == k)[:SAMPLE]
            if len(mine):
                radii[k] = np.percentile(np.linalg.norm(embedding[mine].astype(np.float32) - centres[k], axis=1), 95)
        with self.lock:
            old = list(self.known)
        ids = [-1] * len(centres)
        taken = np.zeros(len(old), bool)
        last = self.last_cluster
        if old and last is not None and len(last) == len(index):
            slot = _slots(old)
            prev = last.astype(np.int64)
            prev = np.where((prev >= 0) & (prev < len(slot)), slot[np.clip(prev, 0, len(slot) - 1)], -1)
            both = np.flatnonzero((index >= 0) & (prev >= 0))
            shared = np.bincount(index[both] * len(old) + prev[both],
                                 minlength=len(centres) * len(old)).reshape(len(centres), len(old))
            had = shared.sum(axis=1)
            rows, cols = linear_sum_assignment(-shared)
            for r, c in zip(rows, cols):
                if shared[r, c] > 0 and 2 * shared[r, c] >= had[r]:
                    ids[r], taken[c] = old[c].id, True
        if old and not taken.all():
            free = np.flatnonzero(~taken)
            open_rows = np.array([r for r in range(len(centres)) if ids[r] < 0], np.int64)
            if len(open_rows):
                d = np.linalg.norm(centres[open_rows][:, None, :] - np.stack([old[c].centre for c in free])[None],
                                   axis=2)
                rows, cols = linear_sum_assignment(d)
                for r, c in zip(rows, cols):
                    if d[r, c] <= max(radii[open_rows[r]], old[free[c]].radius, 1e-6):
                        ids[open_rows[r]] = old[free[c]].id
        new = []
        for r in range(len(centres)):
            if ids[r] < 0:
                ids[r] = self.next_id
                self.next_id += 1
            new.append(Cluster(ids[r], centres[r].astype(np.float32), float(radii[r])))
        with self.lock:
            self.known = new


def quality_reference(quality: np.ndarray, explained: np.ndarray) -> float | None:
    """The gate's reference (QUALITY_GATE): the median match score of the sure points (explained above
    0.5), or None (no gate) where they are too few to stand for a listed phase (QUALITY_REFERENCE_SHARE)."""
    answered = np.isfinite(explained)
    quality = np.asarray(quality)
    sure = answered & (np.nan_to_num(explained) > 0.5) & np.isfinite(quality)
    count = int(np.count_nonzero(sure))
    if count == 0 or count < max(QUALITY_REFERENCE_LEAST, QUALITY_REFERENCE_SHARE * np.count_nonzero(answered)):
        return None
    return float(np.median(quality[sure]))


def explained_baseline(clusters: list[Cluster]) -> float:
    """The explained share (mean calibrated confidence) of the best explained clusters that
    hold a fifth of the points. A point's novelty weighs its own explained share against it,
    so patterns poor everywhere (hard noise: 51-62% of the right answers below confidence 0.5
    on the missing-phase scan) do not make everything novel, while a population no listed
    phase explains (mean confidence 0.002-0.005 there, against 0.21-0.59 for the grains of
    the listed phase) stands out."""
    sized = sorted((c for c in clusters if c.size), key=lambda c: -c.explained)
    total = sum(c.size for c in sized)
    held = 0
    for c in sized:
        held += c.size
        if held >= BASELINE_SHARE * total:
            return c.explained
    return 1.0


def pooled_explained(cluster: np.ndarray, explained: np.ndarray, nav_shape, *, rows: tuple[int, int] | None = None,
                     radius: int = POOL_RADIUS) -> np.ndarray:
    """(N,) (or the rows ``rows`` = (y0, y1), flat): the mean explained share of the points of
    the same cluster about a point: the (2 radius + 1)^2 around each point summed first, then
    the 3x3 such blocks around it (the point's and its 8 neighbouring blocks', each where the
    block's centre is of the point's cluster): a 15x15 window at radius 2, from 34 shifted
    slices, not 225. NaN where none is answered.

    One frame of a missing phase is not told from a poor frame of a listed one (hard noise:
    a quarter of the listed phase's points below confidence 0.2, one of its grains answered
    with a mean 0.057 on seed 5 against 0.001-0.005 for the missing phase's); a few hundred
    neighbours are, and keeping to the point's own cluster keeps a grain's points apart from
    the next grain's, also where one cluster holds both. In bands of rows: bounded memory."""
    ny, nx = (int(v) for v in nav_shape)
    y0, y1 = rows if rows is not None else (0, ny)
    grid = np.asarray(cluster, np.int16).reshape(ny, nx)
    x = np.asarray(explained, np.float32).reshape(ny, nx)
    out = np.full((y1 - y0, nx), np.nan, np.float32)
    r, st = radius, 2 * radius + 1
    margin = r + st  # rows a band needs about it
    band = max(1, (1 << 14) // max(nx, 1))  # rows a step: its arrays stay in cache
    for b0 in range(y0, y1, band):
        b1 = min(y1, b0 + band)
        lo, hi = max(0, b0 - margin), min(ny, b1 + margin)
        h = hi - lo
        c = grid[lo:hi]
        xs = x[lo:hi]
        ok = np.isfinite(xs)
        cp = np.full((h + 2 * r, nx + 2 * r), -1, np.int16)  # the clusters about, -1 where not answered
        cp[r:r + h, r:r + nx] = np.where(ok, c, -1)
        xp = np.zeros(cp.shape, np.float32)
        xp[r:r + h, r:r + nx] = np.where(ok, xs, 0)
        centre = np.where(c >= 0, c, -2).astype(np.int16)  # no cluster: matches nothing
        total = np.zeros((h, nx), np.float32)
        count = np.zeros((h, nx), np.float32)
        same = np.empty((h, nx), bool)
        for dy in range(st):
            for dx in range(st):
                np.equal(cp[dy:dy + h, dx:dx + nx], centre, out=same)
                np.add(total, xp[dy:dy + h, dx:dx + nx], out=total, where=same)
                count += same
        # The blocks: each row of the band (b0..b1) with the blocks st rows and columns about it.
        k0, k1 = b0 - lo, b1 - lo
        tp = np.zeros((h + 2 * st, nx + 2 * st), np.float32)
        tp[st:st + h, st:st + nx] = total
        np_ = np.zeros(tp.shape, np.float32)
        np_[st:st + h, st:st + nx] = count
        bp = np.full(tp.shape, -1, np.int16)
        bp[st:st + h, st:st + nx] = c
        me = centre[k0:k1]
        s_sum = np.zeros((k1 - k0, nx), np.float32)
        n_sum = np.zeros((k1 - k0, nx), np.float32)
        same = np.empty((k1 - k0, nx), bool)
        for i in (0, st, 2 * st):
            for j in (0, st, 2 * st):
                np.equal(bp[k0 + i:k1 + i, j:j + nx], me, out=same)
                np.add(s_sum, tp[k0 + i:k1 + i, j:j + nx], out=s_sum, where=same)
                np.add(n_sum, np_[k0 + i:k1 + i, j:j + nx], out=n_sum, where=same)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[b0 - y0:b1 - y0] = np.where(n_sum > 0, s_sum / n_sum, np.nan)
    return out.ravel()


def _slots(known: list[Cluster]) -> np.ndarray:
    """Cluster id -> its position in ``known`` (-1 for ids no longer there)."""
    ids = np.array([c.id for c in known], np.int64)
    slot = np.full(int(ids.max()) + 1 if len(ids) else 1, -1, np.int64)
    slot[ids] = np.arange(len(known))
    return slot


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

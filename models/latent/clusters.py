"""Cluster, boundary and novelty maps of a scan's embeddings, refreshed while it grows.

``LatentClusters`` keeps a few centres. ``refresh`` clusters a bounded random subsample of
the points in (HDBSCAN, or k-means for a given count), matches the new clusters to the old
centres (so a cluster keeps its id and colour between refreshes), and assigns every point
to its nearest centre; between refreshes ``assign`` places each arriving point the same
way. Memory and time are bounded by the subsample (``SAMPLE`` points: HDBSCAN is about
n log n on it) and one pass over the map in chunks for the assignment, boundary and
novelty maps.

- clusters with a spatial prior: a cluster whose two halves (along its first principal
  direction) lie together in space is split (``split_coherent``), and every point takes
  its label with its 8 neighbours' say (``spatial_labels``: iterated conditional modes);
  measured on the superalloy scan (benchmarks/latent.py), where gamma prime differs from the
  gamma matrix by about 3 noise sigmas a pattern and density alone finds only the grains;
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

log = logging.getLogger(__name__)

SAMPLE = 5000  # points clustered per refresh (measured: HDBSCAN about 1 s on 5000 x 16 here)
MIN_CLUSTER_SHARE = 0.01  # HDBSCAN's min_cluster_size: this share of the sample ...
MIN_CLUSTER_POINTS = 15  # ... and at least this many points
MAX_CLUSTERS = 64  # ids drawn on the map (a palette of this many colours)
CHUNK = 65536  # points a step of the assignment (about 4 MB of distances at 16 clusters)
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
                centres = split_coherent(embedding, finite, centres, self.nav_shape, min_size=self._min_size(len(z)))
        if centres is None:
            with self.lock:
                centres = np.stack([c.centre for c in self.known]) if self.known else None
        cluster, distance = np.full(n, -1, np.int16), np.full(n, np.nan, np.float32)
        if centres is not None:
            # The spatial prior (ICM) settles each point with its neighbours; the centres it ends
            # with are the clusters' (matched to the old ones, so ids stay).
            index, centres = spatial_labels(embedding, finite, centres, self.nav_shape)
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


SPLIT_COHERENCE = 0.15  # a cluster is split where its two halves are this much more coherent in space than chance
ICM_ITERATIONS = 2  # measured on the superalloy scan: 2 and 3 (and 5) give the same map, 1 a worse one
MEAN_SAMPLE = 200_000  # points a centre is re-estimated from (every k-th): 0.19 to 0.04 s a round at 1e6
ICM_BETA = 1.0  # weight of one agreeing neighbour against the embedding's distance (in noise variances)


def split_coherent(embedding: np.ndarray, finite: np.ndarray, centres: np.ndarray, nav_shape, *,
                   min_size: int, index: np.ndarray | None = None) -> np.ndarray:
    """Split each cluster in two along its first principal direction where the two halves
    lie together in space: a precipitate phase in a grain differs by a few noise sigmas a
    point, too little for a density valley, but its points are neighbours of each other.

    The test: among pairs of neighbouring points of the cluster, the share on the same side
    against the share two random labels with those proportions would have (p^2 + (1-p)^2);
    the excess over chance, as a fraction of what is left above chance, must reach
    ``SPLIT_COHERENCE`` (measured on the superalloy scan at moderate noise: 0.19-0.49 where a
    grain holds many precipitates, 0.08-0.13 where it holds a few dozen points of them;
    -0.02-0 for regions of independent noise)."""
    if index is None:
        index, _ = _nearest_index(embedding, finite, centres)
    ny, nx = (int(v) for v in nav_shape)
    out = []
    for k, centre in enumerate(centres):
        members = np.flatnonzero(index == k)
        if len(members) < 2 * min_size:
            out.append(centre)
            continue
        z = embedding[members].astype(np.float32)
        mean = z.mean(axis=0)
        step = max(1, len(z) // SAMPLE)  # direction and cut from a subsample: bounded time
        _, _, v = np.linalg.svd(z[::step] - mean, full_matrices=False)
        p = (z - mean) @ v[0]
        side = p > _two_means_cut(p[::step])
        small = min(int(side.sum()), int((~side).sum()))
        excess = _coherence(members, side, ny, nx)
        if small >= min_size and excess >= SPLIT_COHERENCE:
            out += [z[~side].mean(axis=0), z[side].mean(axis=0)]
        else:
            out.append(centre)
    return np.stack(out[:MAX_CLUSTERS])


def _two_means_cut(p: np.ndarray) -> float:
    """The cut of a 1-D 2-means of projections."""
    lo, hi = np.percentile(p, [25, 75])
    for _ in range(20):
        upper = p > 0.5 * (lo + hi)
        if upper.all() or not upper.any():
            break
        lo, hi = p[~upper].mean(), p[upper].mean()
    return float(0.5 * (lo + hi))


def _coherence(members: np.ndarray, side: np.ndarray, ny: int, nx: int) -> float:
    """Excess of same-side neighbour pairs over chance, 0 (chance) .. 1 (every pair agrees)."""
    grid = np.full(ny * nx, -1, np.int8)
    grid[members] = side
    grid = grid.reshape(ny, nx)
    same = total = 0
    for a, b in ((grid[:, 1:], grid[:, :-1]), (grid[1:], grid[:-1])):
        both = (a >= 0) & (b >= 0)
        total += int(both.sum())
        same += int(((a == b) & both).sum())
    if not total:
        return 0.0
    q = float(side.mean())
    chance = q * q + (1 - q) ** 2
    return (same / total - chance) / max(1 - chance, 1e-9)


def spatial_labels(embedding: np.ndarray, finite: np.ndarray, centres: np.ndarray, nav_shape,
                   iterations: int = ICM_ITERATIONS, beta: float = ICM_BETA) -> tuple[np.ndarray, np.ndarray]:
    """Each point's cluster with its neighbours' say (iterated conditional modes on a Potts
    prior): energy = |z - c_k|^2 / (2 s^2) - beta * (neighbours labelled k of 8), s^2 the
    noise variance per dimension; the centres re-estimated from the labels each round.
    Returns (index into the centres (N,), -1 where not finite; the final centres)."""
    ny, nx = (int(v) for v in nav_shape)
    index, d2 = _nearest_index(embedding, finite, centres)
    own = np.flatnonzero(finite)
    z = embedding[own].astype(np.float32)  # the points in, once (a copy per cluster was most of the time)
    zz = (z * z).sum(axis=1)
    step = max(1, len(own) // MEAN_SAMPLE)
    for _ in range(iterations):
        if not len(own):
            break
        centres = _means(z[::step], index[own][::step], centres)
        noise = max(float(np.mean(d2[own])) / z.shape[1], 1e-12)
        grid = index.reshape(ny, nx)
        best = np.full(len(own), np.inf, np.float32)
        choice = index[own].copy()
        dots = z @ centres.T  # (n, K): one matrix product for every cluster
        for k, c in enumerate(centres):
            energy = np.maximum(zz - 2 * dots[:, k] + float(c @ c), 0.0) / (2 * noise)
            energy -= beta * _neighbours_with(grid == k)[own]
            better = energy < best
            best[better] = energy[better]
            choice[better] = k
        index = np.full(ny * nx, -1, np.int64)
        index[own] = choice
        d2 = np.zeros(ny * nx, np.float32)
        d2[own] = np.maximum(zz - 2 * dots[np.arange(len(own)), choice] + (centres * centres).sum(axis=1)[choice], 0)
    centres = _means(z[::step], index[own][::step], centres)
    keep = np.array([(index == k).any() for k in range(len(centres))])
    if not keep.all():  # a cluster no point holds any more goes
        remap = np.cumsum(keep) - 1
        index = np.where(index >= 0, remap[np.maximum(index, 0)], -1)
        centres = centres[keep]
    return index, centres


def _means(z: np.ndarray, labels: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Mean of the rows of each label (the old centre where a label has none): a bincount per dimension."""
    out = centres.astype(np.float32).copy()
    counts = np.bincount(labels, minlength=len(centres))
    sums = np.stack([np.bincount(labels, weights=z[:, d], minlength=len(centres)) for d in range(z.shape[1])], axis=1)
    has = counts > 0
    out[has] = (sums[has] / counts[has, None]).astype(np.float32)
    return out


def _neighbours_with(mask: np.ndarray) -> np.ndarray:
    """(ny, nx) bool -> (N,) how many of each point's 8 neighbours are True."""
    ny, nx = mask.shape
    pad = np.zeros((ny + 2, nx + 2), np.uint8)
    pad[1:-1, 1:-1] = mask
    count = np.zeros((ny, nx), np.uint8)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            if dy != 1 or dx != 1:
                count += pad[dy:dy + ny, dx:dx + nx]
    return count.ravel()


def _nearest_index(embedding: np.ndarray, finite: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index of the nearest centre (N,), -1 where not finite; squared distance (N,))."""
    n = len(finite)
    index = np.full(n, -1, np.int64)
    d2 = np.zeros(n, np.float32)
    idx = np.flatnonzero(finite)
    cc = (centres * centres).sum(axis=1)
    for start in range(0, len(idx), CHUNK):
        part = idx[start:start + CHUNK]
        e = embedding[part].astype(np.float32)
        d = np.maximum((e * e).sum(axis=1)[:, None] - 2 * e @ centres.T + cc[None], 0.0)
        index[part] = d.argmin(axis=1)
        d2[part] = d[np.arange(len(part)), index[part]]
    return index, d2


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


def boundary_map(embedding: np.ndarray, received: np.ndarray, nav_shape) -> np.ndarray:
    """(N,) mean embedding distance to the 4 neighbours that are in, over the median of it;
    NaN where a point or all its neighbours are not in. Row by row: bounded memory."""
    ny, nx = (int(v) for v in nav_shape)
    e = embedding.reshape(ny, nx, -1)
    ok = received.reshape(ny, nx)
    total = np.zeros((ny, nx), np.float32)
    count = np.zeros((ny, nx), np.float32)
    rows = max(1, CHUNK // max(nx, 1))
    for y0 in range(0, ny, rows):
        y1 = min(ny, y0 + rows)
        a = e[y0:y1].astype(np.float32)
        if nx > 1:  # right neighbour, both ways
            d = np.linalg.norm(a[:, 1:] - a[:, :-1], axis=2)
            both = ok[y0:y1, 1:] & ok[y0:y1, :-1]
            d = np.where(both, d, 0)
            total[y0:y1, :-1] += d
            total[y0:y1, 1:] += d
            count[y0:y1, :-1] += both
            count[y0:y1, 1:] += both
        b = e[y0 + 1:min(y1 + 1, ny)].astype(np.float32)  # each row's lower neighbour
        if len(b):
            d = np.linalg.norm(b - a[: len(b)], axis=2)
            both = ok[y0 + 1:y1 + 1] & ok[y0:y0 + len(b)]
            d = np.where(both, d, 0)
            total[y0:y0 + len(b)] += d
            total[y0 + 1:y0 + 1 + len(b)] += d
            count[y0:y0 + len(b)] += both
            count[y0 + 1:y0 + 1 + len(b)] += both
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / count, np.nan).ravel()
    finite = np.isfinite(mean)
    if finite.any():
        mean = mean / max(float(np.median(mean[finite])), 1e-12)
    return mean.astype(np.float32)

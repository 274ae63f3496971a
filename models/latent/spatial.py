"""The spatial prior of the latent cluster map: neighbouring scan points are mostly in the
same region. ``split_coherent`` splits a cluster whose two halves lie together in space,
``spatial_labels`` labels each point with its 8 neighbours' say (iterated conditional
modes), ``split_components`` makes a cluster's places that do not touch clusters of their
own, ``boundary_map`` measures how far a point's embedding is from its neighbours'.
Every step is one pass (or a few) over the map in numpy (scipy.ndimage for the places, one
labelling a cluster): bounded time and memory."""

from __future__ import annotations

import numpy as np

CHUNK = 65536  # points a step of the boundary pass
NEAREST_CHUNK = 16384  # points a step of the nearest-centre passes: 0.30 s of CPU for the ICM at 1e6 points, 0.42
# at 65536 and at 4096 (fresh large arrays fault their pages in; small ones stay in cache)
SAMPLE = 5000  # members a split direction and cut are found from

SPLIT_COHERENCE = 0.15  # a cluster is split where its two halves are this much more coherent in space than chance
SPLIT_SEPARATION = 3.5  # ... and its halves split again where they are two modes this far apart (within-half sigmas)
SPLIT_DEPTH = 4  # halves of halves ...: at most 16 clusters of one
ICM_ITERATIONS = 2  # measured on the superalloy scan: 2 and 3 (and 5) give the same map, 1 a worse one
MEAN_SAMPLE = 200_000  # points a centre is re-estimated from (every k-th): 0.19 to 0.04 s a round at 1e6
ICM_BETA = 1.0  # weight of one agreeing neighbour against the embedding's distance (in noise variances)


def split_coherent(embedding: np.ndarray, finite: np.ndarray, centres: np.ndarray, nav_shape, *,
                   min_size: int, index: np.ndarray | None = None, limit: int | None = None) -> np.ndarray:
    """Split each cluster in two (2-means) where the two halves lie together in space: a
    precipitate phase in a grain differs by a few noise sigmas a point, too little for a
    density valley, but its points are neighbours of each other.

    The test: among pairs of neighbouring points of the cluster, the share on the same side
    against the share two random labels with those proportions would have (p^2 + (1-p)^2);
    the excess over chance, as a fraction of what is left above chance, must reach
    ``SPLIT_COHERENCE`` (measured on the superalloy scan at moderate noise: 0.19-0.49 where a
    grain holds many precipitates, 0.08-0.13 where it holds a few dozen points of them;
    -0.02-0 for regions of independent noise).

    The cut: the 1-D 2-means of the projections on the first principal direction, then 2-means
    in the full embedding from it (a cut along the first direction alone went through a grain
    where a cluster held three or four). The halves are tested again (at most ``SPLIT_DEPTH``
    deep, ``limit`` centres in all) where, along their mean difference, they are also two modes
    ``SPLIT_SEPARATION`` apart: one HDBSCAN cluster can hold several grains (a spot scan's
    grains of few spots: up to 9 grains in one, 5-9 sigmas apart along their mean difference),
    which one split does not part. A split of one population gives halves 2.4-3.7 apart
    (within-half sigmas; small clusters the most), of several grains 4-9 on the spot scans; the
    superalloy's matrix and precipitates are one mode (2.1-2.9), which only the spatial test
    parts, so a first split needs no two modes.

    Level by level (halves of every cluster at once): each cluster's mean, direction, cut,
    halves and separation come from every k-th of its members (at most ``SAMPLE``); the sides
    of every point weighed from one chunked pass over the map, and the neighbour pairs of
    every cluster counted at once (a copy and a grid per cluster were 0.44 s of a refresh at
    1e6 points). A level's members are its parent's on one side: no search of the map."""
    if index is None:
        index, _ = nearest_index(embedding, finite, centres)
    ny, nx = (int(v) for v in nav_shape)
    dims = centres.shape[1]
    limit = len(centres) * 2 ** SPLIT_DEPTH if limit is None else limit
    node = np.asarray(index, np.int64).copy()  # each point's cluster of the current level (-1: none)
    own = np.flatnonzero(node >= 0)
    order = np.argsort(node[own], kind="stable")
    bounds = np.searchsorted(node[own][order], np.arange(len(centres) + 1))
    members = {k: own[order[bounds[k]:bounds[k + 1]]] for k in range(len(centres))}
    leaves = [np.asarray(c, np.float32) for c in centres]  # centre of every node (the leaves' kept)
    children: dict[int, tuple[int, int]] = {}
    active = [k for k in range(len(centres))]
    for depth in range(SPLIT_DEPTH):
        trial = {}  # node -> (direction, threshold, lower mean, upper mean, separation)
        for k in active:
            m = members.get(k)
            if m is None or len(m) < 2 * min_size:
                continue
            step = max(1, len(m) // SAMPLE)  # direction and cut from a subsample: bounded time
            z = embedding[m[::step]].astype(np.float32)
            mean = z.mean(axis=0)
            sub = z - mean
            _, _, v = np.linalg.svd(sub, full_matrices=False)
            first = sub @ v[0]
            cut = first > _two_means_cut(first)
            if cut.all() or not cut.any():  # all alike (frames without noise)
                continue
            a, b = _two_means(sub, cut)
            u = (b - a) / max(float(np.linalg.norm(b - a)), 1e-12)
            p = z @ u
            up = p > _weighted_cut(p, float(0.5 * (a + b) @ u + mean @ u))
            if up.all() or not up.any():
                continue
            apart = (p[up].mean() - p[~up].mean()) / np.sqrt(0.5 * (p[up].var() + p[~up].var()) + 1e-12)
            threshold = _weighted_cut(p, float(0.5 * (a + b) @ u + mean @ u))
            up = p > threshold
            trial[k] = (u, threshold, z[~up].mean(axis=0), z[up].mean(axis=0), float(apart))
        if not trial:
            break
        weighed = np.array(sorted(trial), np.int64)
        slot = np.full(len(leaves), -1, np.int64)
        slot[weighed] = np.arange(len(weighed))
        ut = np.ascontiguousarray(np.stack([trial[int(k)][0] for k in weighed]).T.reshape(dims, -1))
        thr = np.array([trial[int(k)][1] for k in weighed], np.float32)
        side = np.zeros(ny * nx, bool)
        pts = np.flatnonzero(slot[np.maximum(node, 0)] >= 0) if len(own) else own
        pts = pts[node[pts] >= 0]
        for start in range(0, len(pts), NEAREST_CHUNK):
            part = pts[start:start + NEAREST_CHUNK]
            j = slot[node[part]]
            side[part] = (_rows(embedding, part) @ ut)[np.arange(len(part)), j] > thr[j]
        k_all = len(leaves)
        counts = np.bincount(node[pts], minlength=k_all)
        upper = np.bincount(node[pts], weights=side[pts], minlength=k_all)
        excess = _coherence_all(node, side, ny, nx, k_all, upper / np.maximum(counts, 1))
        count = sum(1 for k in range(len(leaves)) if k not in children)  # the leaves now
        active = []
        for k in weighed.tolist():
            u, threshold, lower, higher, apart = trial[k]
            small = min(upper[k], counts[k] - upper[k])
            if small < min_size or excess[k] < SPLIT_COHERENCE or (depth > 0 and apart < SPLIT_SEPARATION):
                continue
            if count + 1 > limit:
                break
            count += 1
            lo, hi = len(leaves), len(leaves) + 1
            leaves += [lower, higher]
            children[k] = (lo, hi)
            m = members.pop(k)
            up = side[m]
            members[lo], members[hi] = m[~up], m[up]
            node[m[~up]], node[m[up]] = lo, hi
            active += [lo, hi]
        for k in [k for k in members if k not in active]:
            del members[k]  # settled: its members are not needed again
        if not active:
            break
    return _leaves_in_order(leaves, children, len(centres))


def _leaves_in_order(leaves: list, children: dict, roots: int) -> np.ndarray:
    """The centres of the nodes not split, each cluster's halves where it was (depth first)."""
    out = []
    stack = list(range(roots))[::-1]
    while stack:
        k = stack.pop()
        if k in children:
            stack += list(children[k])[::-1]
        else:
            out.append(leaves[k])
    return np.stack(out)


def _two_means(z: np.ndarray, side: np.ndarray, rounds: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """The two means of 2-means in the full embedding, started from a first cut (``side``)."""
    a, b = z[~side].mean(axis=0), z[side].mean(axis=0)
    for _ in range(rounds):
        new = z @ (b - a) > 0.5 * float(b @ b - a @ a)  # nearer b
        if np.array_equal(new, side) or new.all() or not new.any():
            break
        side = new
        a, b = z[~side].mean(axis=0), z[side].mean(axis=0)
    return a, b


def _coherence_all(index: np.ndarray, side: np.ndarray, ny: int, nx: int, k_all: int, q: np.ndarray) -> np.ndarray:
    """(K,) each cluster's excess of same-side neighbour pairs over chance, 0 (chance) .. 1
    (every pair agrees); ``q`` its share on the upper side."""
    grid = index.reshape(ny, nx)
    s = side.reshape(ny, nx)
    same = np.zeros(k_all)
    total = np.zeros(k_all)
    for (ga, gb), (sa, sb) in (((grid[:, 1:], grid[:, :-1]), (s[:, 1:], s[:, :-1])),
                               ((grid[1:], grid[:-1]), (s[1:], s[:-1]))):
        labels = np.where((ga == gb) & (ga >= 0), ga, k_all).ravel()  # k_all: not a pair of one cluster
        total += np.bincount(labels, minlength=k_all + 1)[:k_all]
        same += np.bincount(labels, weights=(sa == sb).ravel(), minlength=k_all + 1)[:k_all]
    chance = q * q + (1 - q) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        excess = (same / np.maximum(total, 1) - chance) / np.maximum(1 - chance, 1e-9)
    return np.where(total > 0, excess, 0.0)


def _weighted_cut(p: np.ndarray, cut: float, rounds: int = 5) -> float:
    """A 2-means cut moved where the two halves' densities (one pooled variance, each half's
    share as its weight) are equal: with halves of unequal size, the midpoint gives the small
    one the larger one's tail (a grain's precipitates, a seventh of it, 3 sigmas off: 356 points
    for 196 in the test, and the tail then split off on its own as a second mode)."""
    for _ in range(rounds):
        up = p > cut
        n_up = int(up.sum())
        if n_up in (0, len(p)):
            break
        lo, hi = float(p[~up].mean()), float(p[up].mean())
        var = float((p[~up].var() * (len(p) - n_up) + p[up].var() * n_up) / len(p))
        new = 0.5 * (lo + hi) + var * np.log((len(p) - n_up) / n_up) / max(hi - lo, 1e-12)
        if abs(new - cut) < 1e-6 * max(hi - lo, 1e-12):
            break
        cut = float(new)
    return cut


def _two_means_cut(p: np.ndarray) -> float:
    """The cut of a 1-D 2-means of projections."""
    lo, hi = np.percentile(p, [25, 75])
    for _ in range(20):
        upper = p > 0.5 * (lo + hi)
        if upper.all() or not upper.any():
            break
        lo, hi = p[~upper].mean(), p[upper].mean()
    return float(0.5 * (lo + hi))


def spatial_labels(embedding: np.ndarray, finite: np.ndarray, centres: np.ndarray, nav_shape,
                   iterations: int = ICM_ITERATIONS, beta: float = ICM_BETA,
                   ee: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each point's cluster with its neighbours' say (iterated conditional modes on a Potts
    prior): energy = |z - c_k|^2 / (2 s^2) - beta * (neighbours labelled k of 8), s^2 the
    noise variance per dimension; the centres re-estimated from the labels each round.
    Returns (index into the centres (N,), -1 where not finite; the centres of the last round;
    each point's squared distance to its centre (N,)). ``ee``: each point's |z|^2 where known
    (``squared_norms``). The centres are those the last round weighed, not the means of its
    labels once more: the distances come with them (a pass over the map less, 0.1-0.2 s at 1e6).

    Only the points whose neighbours could change their label are weighed: the prior moves an
    energy by at most ``8 beta``, so a point whose second nearest centre is further than that
    (in energy) keeps its nearest one, as the sum over every centre would give (the test
    compares the two). On the synthetic 1e6-point scan of benchmarks/latent.py (well separated
    regions) the distances to every centre, chunked, are the work left: 1.25 s -> 0.3 s of
    CPU here, one core, load 2.6-3."""
    ny, nx = (int(v) for v in nav_shape)
    own = np.flatnonzero(finite)
    if ee is None:
        ee = squared_norms(embedding, finite)
    index, d2 = nearest_index(embedding, finite, centres, ee=ee)
    step = max(1, len(own) // MEAN_SAMPLE)
    sub = own[::step]
    zsub = embedding[sub].astype(np.float32)  # the centres' sample, once
    for _ in range(iterations):
        if not len(own):
            break
        centres = _means(zsub, index[sub], centres)
        noise = max(float(np.mean(d2[own])) / embedding.shape[1], 1e-12)
        grid = np.full((ny + 2, nx + 2), -1, np.int16)  # the labels before this round, -1 around
        grid[1:-1, 1:-1] = index.reshape(ny, nx)
        index, d2 = _icm_round(embedding, own, ee, centres, grid.ravel(), nx, beta, noise)
    keep = np.bincount(index[own], minlength=len(centres)) > 0
    if not keep.all():  # a cluster no point holds any more goes
        remap = np.cumsum(keep) - 1
        index = np.where(index >= 0, remap[np.maximum(index, 0)], -1)
        centres = centres[keep]
    return index, centres, d2


def _icm_round(embedding, own, ee, centres, grid, nx, beta, noise):
    """One synchronous ICM round over the points ``own`` in chunks: (index (N,), squared
    distance to the chosen centre (N,)). ``grid``: the padded (ny+2, nx+2) labels, flat."""
    n = len(ee)
    index = np.full(n, -1, np.int64)
    d2 = np.zeros(n, np.float32)
    c2, cc = _centre_terms(centres)
    w = nx + 2
    offsets = (-w - 1, -w, -w + 1, -1, 1, w - 1, w, w + 1)
    margin = 8 * beta * 2 * noise  # the neighbours' most say, in squared distance
    for start in range(0, len(own), NEAREST_CHUNK):
        part = own[start:start + NEAREST_CHUNK]
        g = cc[:, None] - c2 @ _rows(embedding, part).T  # (K, chunk): |c|^2 - 2 c.z
        best, score, weigh = _nearest_of(g, margin)
        if len(weigh):
            gw = g[:, weigh]
            pos = part[weigh]
            padded = (pos // nx + 1) * w + pos % nx + 1
            votes = np.zeros(gw.shape, np.float32)
            r = np.arange(len(weigh))
            for off in offsets:
                lab = grid[padded + off]
                ok = lab >= 0
                votes[lab[ok], r[ok]] += 1
            choice = (gw / (2 * noise) - beta * votes).argmin(axis=0)
            best[weigh] = choice
            score[weigh] = gw[choice, r]
        index[part] = best
        d2[part] = np.maximum(score + ee[part], 0)
    return index, d2


def squared_norms(embedding: np.ndarray, received: np.ndarray) -> np.ndarray:
    """(N,) float32 |z|^2 of each received point (not finite where a value is not), NaN elsewhere:
    one chunked pass (the finite test of every value was 0.1 s at 1e6 x 16)."""
    out = np.full(len(received), np.nan, np.float32)
    idx = np.flatnonzero(received)
    ones = np.ones(embedding.shape[1], np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        for start in range(0, len(idx), NEAREST_CHUNK):
            part = idx[start:start + NEAREST_CHUNK]
            out[part] = np.square(_rows(embedding, part)) @ ones
    return out


def _centre_terms(centres):
    c = np.asarray(centres, np.float32)
    return 2 * c, (c * c).sum(axis=1)


def _nearest_of(g: np.ndarray, margin: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(K, n) scores -> (each column's lowest row, its score, the columns where another row is
    within ``margin`` of it: their lowest row is left for the caller, or ties). Reductions
    along the first axis: numpy's argmin along a row of K was 5x a min down the columns."""
    low = g.min(axis=0)
    near = g <= low + margin
    count = np.count_nonzero(near, axis=0)
    best = (np.arange(len(g), dtype=np.float32) @ near.astype(np.float32)).astype(np.int64)  # the one near row
    return best, low, np.flatnonzero(count > 1)


def _rows(embedding: np.ndarray, part: np.ndarray) -> np.ndarray:
    """embedding[part] as float32: a view where ``part`` is a run of consecutive points (a
    scan's points in are, mostly), a copy otherwise."""
    if len(part) and part[-1] - part[0] == len(part) - 1:
        return np.asarray(embedding[part[0]:part[-1] + 1], np.float32)
    return embedding[part].astype(np.float32)


def _means(z: np.ndarray, labels: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Mean of the rows of each label (the old centre where a label has none): one matrix
    product with the labels one-hot (a bincount per dimension: 60 ms a call at 200k x 16, this
    about 18 ms)."""
    out = centres.astype(np.float32).copy()
    ok = labels >= 0
    labels, z = labels[ok], np.asarray(z[ok], np.float32)
    onehot = np.zeros((len(centres), len(labels)), np.float32)
    onehot[labels, np.arange(len(labels))] = 1
    counts = np.bincount(labels, minlength=len(centres))
    has = counts > 0
    out[has] = (onehot @ z)[has] / counts[has, None]
    return out


def nearest_index(embedding: np.ndarray, finite: np.ndarray, centres: np.ndarray, *,
                  ee: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(index of the nearest centre (N,), -1 where not finite; squared distance (N,), where
    ``ee``, each point's |z|^2, is given; else zeros)."""
    n = len(finite)
    index = np.full(n, -1, np.int64)
    d2 = np.zeros(n, np.float32)
    idx = np.flatnonzero(finite)
    c2, cc = _centre_terms(centres)
    for start in range(0, len(idx), NEAREST_CHUNK):
        part = idx[start:start + NEAREST_CHUNK]
        g = cc[:, None] - c2 @ _rows(embedding, part).T
        best, score, tied = _nearest_of(g, 0.0)
        if len(tied):
            best[tied] = g[:, tied].argmin(axis=0)
        index[part] = best
        if ee is not None:
            d2[part] = np.maximum(score + ee[part], 0)
    return index, d2


def boundary_map(embedding: np.ndarray, received: np.ndarray, nav_shape) -> np.ndarray:
    """(N,) mean embedding distance to the 4 neighbours that are in, over the median of it;
    NaN where a point or all its neighbours are not in. Row by row: bounded memory."""
    return normalised_boundary(boundary_distances(embedding, received, nav_shape))


def normalised_boundary(raw: np.ndarray) -> np.ndarray:
    """The mean distances over their median (from at most ``MEAN_SAMPLE`` of them, every k-th)."""
    finite = np.flatnonzero(np.isfinite(raw))
    if not len(finite):
        return raw.astype(np.float32)
    step = max(1, len(finite) // MEAN_SAMPLE)
    return (raw / max(float(np.median(raw[finite[::step]])), 1e-12)).astype(np.float32)


def boundary_distances(embedding: np.ndarray, received: np.ndarray, nav_shape, *,
                       rows: tuple[int, int] | None = None) -> np.ndarray:
    """(N,) (or the rows ``rows`` = (y0, y1), flat): each point's mean embedding distance to
    its 4 neighbours that are in, NaN where it or all of them are not. In bands of rows."""
    ny, nx = (int(v) for v in nav_shape)
    y0, y1 = rows if rows is not None else (0, ny)
    e = embedding.reshape(ny, nx, -1)
    ok = received.reshape(ny, nx)
    out = np.full((y1 - y0, nx), np.nan, np.float32)
    band = max(1, CHUNK // max(nx, 1))
    for b0 in range(y0, y1, band):
        b1 = min(y1, b0 + band)
        lo, hi = max(0, b0 - 1), min(ny, b1 + 1)  # the band with a row above and below
        a = np.asarray(e[lo:hi], np.float32)
        k = ok[lo:hi]
        total = np.zeros(a.shape[:2], np.float32)
        count = np.zeros(a.shape[:2], np.float32)
        if nx > 1:  # right neighbour, both ways
            d = np.linalg.norm(a[:, 1:] - a[:, :-1], axis=2)
            both = k[:, 1:] & k[:, :-1]
            d = np.where(both, d, 0)
            total[:, :-1] += d
            total[:, 1:] += d
            count[:, :-1] += both
            count[:, 1:] += both
        if hi - lo > 1:  # lower neighbour, both ways
            d = np.linalg.norm(a[1:] - a[:-1], axis=2)
            both = k[1:] & k[:-1]
            d = np.where(both, d, 0)
            total[:-1] += d
            total[1:] += d
            count[:-1] += both
            count[1:] += both
        t, c = total[b0 - lo:b1 - lo], count[b0 - lo:b1 - lo]
        with np.errstate(invalid="ignore", divide="ignore"):
            out[b0 - y0:b1 - y0] = np.where((c > 0) & k[b0 - lo:b1 - lo], t / c, np.nan)
    return out.ravel()


HOST_SHARE = 0.5  # a place lies inside another where half its neighbours or more are in that one


def split_components(index: np.ndarray, centres: np.ndarray, embedding: np.ndarray, nav_shape, *, min_size: int,
                     limit: int, d2: np.ndarray | None = None,
                     ee: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Each cluster's places in the scan that do not touch: separate clusters (each with its own
    centre, the mean of its points), the largest keeping the cluster's place in ``centres``, the
    others after them (in the order of the clusters). Two grains of one phase whose patterns
    differ by a turn about the beam have the same rotation-invariant features (a spot scan's),
    and grains of few spots lie closer together than the noise (3.6-3.8 sigmas along their mean
    difference, against 5-9 for most pairs): one cluster, but two regions, and every grain is a
    region of its own.

    Places of fewer than ``min_size`` points stay with the largest. Places inside one other
    place (half their neighbours or more in it, ``HOST_SHARE``: precipitates in a grain, 63-100%
    on the superalloy scan, against 27-71% for a spot scan's grains) stay together with the
    others inside it: one population of that grain. Points not in (index -1: not received yet,
    or no embedding) join places rather than part them, so a page not in yet splits no grain.
    At most ``limit`` centres in all.

    One labelling a cluster, in its bounding box (scipy.ndimage); the points moved and the
    centres in one pass each (a table from place to cluster; the centres from every k-th point,
    at most ``MEAN_SAMPLE``). ``d2`` (with ``ee``, each point's |z|^2): each point's squared
    distance to its centre, recomputed for the points moved. Returns (index (N,), centres, d2)."""
    from scipy import ndimage

    ny, nx = (int(v) for v in nav_shape)
    k_all = len(centres)
    grid = np.asarray(index).reshape(ny, nx)
    eight = np.ones((3, 3), bool)
    # Every cluster's places, numbered across the scan (0: a point not in): one labelling a cluster,
    # in the cluster's bounding box. A gap that leaves the box joins no places there.
    places = np.zeros((ny, nx), np.int32)
    first = [1]
    for k, box in enumerate(ndimage.find_objects((grid + 1).astype(np.int32), max_label=k_all)):
        count = 0
        if box is not None:
            near = grid[box]
            mine = near == k
            labels, count = ndimage.label(mine | (near < 0), structure=eight)
            if count > 1:
                places[box][mine] = labels[mine] + (first[-1] - 1)
            else:
                places[box][mine] = first[-1]
                count = 1
        first.append(first[-1] + count)
    sizes = np.bincount(places.ravel(), minlength=first[-1])
    sizes[0] = 0
    large = sizes >= min_size
    cluster_of = np.repeat(np.arange(k_all), np.diff(first))  # place p's cluster: cluster_of[p - 1]
    boxes, hosts = None, {}

    def host(p: int) -> int:
        if p not in hosts:
            hosts[p] = _host(places, boxes[p - 1], p, cluster_of, large)
        return hosts[p]

    def key(p: int, depth: int = 0) -> int:
        """What place p of a cluster is grouped by: the place it lies inside (precipitates in one
        grain: one group), or where that one lies inside a place of p's own cluster, that place's
        group (a piece of a grain that its precipitates cut off); else p itself."""
        h = host(p)
        if not h:
            return p
        hh = host(h)
        if hh == p:  # each lies against the other, neither inside
            return p
        if hh and cluster_of[hh - 1] == cluster_of[p - 1] and depth < 4:
            return key(hh, depth + 1)
        return h

    table = np.full(first[-1], -1, np.int64)  # place -> the new cluster its points go to (-1: stay)
    total = k_all
    for k in range(k_all):
        own = np.arange(first[k], first[k + 1])
        big = own[large[own]]
        if len(big) < 2:
            continue
        if boxes is None:
            boxes = ndimage.find_objects(places)
        groups: dict = {}
        for c in big:
            groups.setdefault(key(int(c)), []).append(int(c))
        if len(groups) < 2:
            continue
        parts = sorted(groups.values(), key=lambda cs: -int(sizes[cs].sum()))
        for cs in parts[1:]:
            if total >= limit:
                break
            table[cs] = total
            total += 1
    if total == k_all:
        return index, centres, d2
    index = np.asarray(index).copy()
    moved_to = table[places.ravel()]
    moved = np.flatnonzero(moved_to >= 0)
    index[moved] = moved_to[moved]
    out = np.concatenate([np.asarray(centres, np.float32), np.zeros((total - k_all, centres.shape[1]), np.float32)])
    changed = np.zeros(total + 1, bool)  # the clusters split and their parts (the last: no cluster)
    changed[cluster_of[np.flatnonzero(table >= 0) - 1]] = True
    changed[k_all:total] = True
    mine = np.flatnonzero(changed[index])  # index -1: the last
    take = np.zeros(len(index), bool)  # every k-th of their points, every part in the sample
    take[mine[::max(1, len(mine) // MEAN_SAMPLE)]] = True
    take[moved[::max(1, len(moved) // MEAN_SAMPLE)]] = True
    sub = np.flatnonzero(take)
    fresh = _means(embedding[sub].astype(np.float32), index[sub], out)
    out[changed[:-1]] = fresh[changed[:-1]]  # the clusters not split keep their centres
    if d2 is not None and ee is not None:
        d2 = d2.copy()
        c2, cc = _centre_terms(out)
        for start in range(0, len(mine), NEAREST_CHUNK):
            part = mine[start:start + NEAREST_CHUNK]
            z = _rows(embedding, part)
            k = index[part]
            d2[part] = np.maximum(ee[part] + cc[k] - np.einsum("ij,ij->i", z, c2[k]), 0)
    return index, out, d2


def _host(places: np.ndarray, box, place: int, cluster_of: np.ndarray, large: np.ndarray) -> int:
    """The place of another cluster that ``place`` lies inside (HOST_SHARE of its neighbours in
    large places of other clusters; a few points of another cluster beside it are noise, not a
    place it lies in), 0 where none."""
    from scipy import ndimage

    ny, nx = places.shape
    ys = slice(max(box[0].start - 1, 0), min(box[0].stop + 1, ny))
    xs = slice(max(box[1].start - 1, 0), min(box[1].stop + 1, nx))
    inside = places[ys, xs] == place
    ring = ndimage.binary_dilation(inside, structure=np.ones((3, 3), bool)) & ~inside
    around = places[ys, xs][ring]
    around = around[large[around] & (cluster_of[np.maximum(around, 1) - 1] != cluster_of[place - 1])]
    if len(around):
        found, counts = np.unique(around, return_counts=True)
        if counts.max() >= HOST_SHARE * len(around):
            return int(found[counts.argmax()])
    return 0

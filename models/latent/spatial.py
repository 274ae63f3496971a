"""The spatial prior of the latent cluster map: neighbouring scan points are mostly in the
same region. ``split_coherent`` splits a cluster whose two halves lie together in space,
``spatial_labels`` labels each point with its 8 neighbours' say (iterated conditional
modes), ``boundary_map`` measures how far a point's embedding is from its neighbours'.
Every step is one pass (or a few) over the map in numpy: bounded time and memory."""

from __future__ import annotations

import numpy as np

CHUNK = 65536  # points a step of the boundary pass
NEAREST_CHUNK = 16384  # points a step of the nearest-centre passes: 0.30 s of CPU for the ICM at 1e6 points, 0.42
# at 65536 and at 4096 (fresh large arrays fault their pages in; small ones stay in cache)
SAMPLE = 5000  # members a split direction and cut are found from

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
    -0.02-0 for regions of independent noise).

    Each cluster's mean, direction, cut and halves' means come from every k-th of its members
    (at most ``SAMPLE``); the sides of every point from one chunked pass over the map, and
    the neighbour pairs of every cluster counted at once (a copy and a grid per cluster were
    0.44 s of a refresh at 1e6 points)."""
    if index is None:
        index, _ = nearest_index(embedding, finite, centres)
    ny, nx = (int(v) for v in nav_shape)
    k_all, dims = centres.shape
    direction = np.zeros((k_all, dims), np.float32)
    offset = np.zeros(k_all, np.float32)
    cut = np.full(k_all, np.inf, np.float32)  # no side: a cluster not weighed
    halves: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for k in range(k_all):
        members = np.flatnonzero(index == k)
        if len(members) < 2 * min_size:
            continue
        step = max(1, len(members) // SAMPLE)  # direction and cut from a subsample: bounded time
        z = embedding[members[::step]].astype(np.float32)
        mean = z.mean(axis=0)
        _, _, v = np.linalg.svd(z - mean, full_matrices=False)
        direction[k], offset[k] = v[0], float(mean @ v[0])
        p = z @ v[0] - offset[k]
        cut[k] = _two_means_cut(p)
        upper = p > cut[k]
        halves[k] = (z[~upper].mean(axis=0) if (~upper).any() else mean, z[upper].mean(axis=0) if upper.any() else mean)
    side = np.zeros(ny * nx, bool)
    own = np.flatnonzero(index >= 0)
    if halves:
        dt = np.ascontiguousarray(direction.T)
        for start in range(0, len(own), NEAREST_CHUNK):
            part = own[start:start + NEAREST_CHUNK]
            k = index[part]
            p = (_rows(embedding, part) @ dt)[np.arange(len(part)), k] - offset[k]
            side[part] = p > cut[k]
    counts = np.bincount(index[own], minlength=k_all)
    upper = np.bincount(index[own], weights=side[own], minlength=k_all)
    excess = _coherence_all(index, side, ny, nx, k_all, upper / np.maximum(counts, 1))
    out = []
    for k, centre in enumerate(centres):
        small = min(upper[k], counts[k] - upper[k])
        if k in halves and small >= min_size and excess[k] >= SPLIT_COHERENCE:
            out += list(halves[k])
        else:
            out.append(centre)
    return np.stack(out)


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

"""The spatial prior of the latent cluster map: neighbouring scan points are mostly in the
same region. ``split_coherent`` splits a cluster whose two halves lie together in space,
``spatial_labels`` labels each point with its 8 neighbours' say (iterated conditional
modes), ``split_components`` makes a cluster's places that do not touch clusters of their
own, ``boundary_map`` measures how far a point's embedding is from its neighbours'.
Every step is one pass (or a few) over the map in numpy (scipy.ndimage for the places):
bounded time and memory."""

from __future__ import annotations

import numpy as np

CHUNK = 65536  # points a step of the nearest-centre pass (about 4 MB of distances at 16 clusters)
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

    The cut: the 1-D 2-means of the projections, then 2-means in the full embedding from it
    (a cut along the first direction alone went through a grain where a cluster held three or
    four). The halves are tested again (at most ``SPLIT_DEPTH`` deep, ``limit`` centres in all)
    where, along their mean difference, they are also two modes ``SPLIT_SEPARATION`` apart: one
    HDBSCAN cluster can hold several grains (a spot scan's grains of few spots: up to 9 grains
    in one, 5-9 sigmas apart along their mean difference), which one split does not part. A
    split of one population gives halves 2.4-3.7 apart (within-half sigmas; small clusters the
    most), of several grains 4-9 on the spot scans; the superalloy's matrix and precipitates
    are one mode (2.1-2.9), which only the spatial test parts, so a first split needs no two modes."""
    if index is None:
        index, _ = nearest_index(embedding, finite, centres)
    ny, nx = (int(v) for v in nav_shape)
    limit = len(centres) * 2 ** SPLIT_DEPTH if limit is None else limit
    queue = [(np.flatnonzero(index == k), centre, 0) for k, centre in enumerate(centres)]
    out = []
    while queue:
        members, centre, depth = queue.pop(0)
        if len(members) < 2 * min_size or depth >= SPLIT_DEPTH or len(out) + len(queue) + 2 > limit:
            out.append(centre)
            continue
        z = embedding[members].astype(np.float32)
        mean = z.mean(axis=0)
        step = max(1, len(z) // SAMPLE)  # direction and cut from a subsample: bounded time
        sub = z[::step] - mean
        _, _, v = np.linalg.svd(sub, full_matrices=False)
        first = sub @ v[0]
        cut = first > _two_means_cut(first)
        if cut.all() or not cut.any():  # all alike (frames without noise)
            out.append(centre)
            continue
        a, b = _two_means(sub, cut)
        u = (b - a) / max(float(np.linalg.norm(b - a)), 1e-12)
        p = z @ u  # along the halves' mean difference (one product over the members)
        side = p > float(0.5 * (a + b) @ u + mean @ u)
        small = min(int(side.sum()), int((~side).sum()))
        if small < min_size:
            out.append(centre)
            continue
        excess = _coherence(members, side, ny, nx)
        apart = (p[side].mean() - p[~side].mean()) / np.sqrt(0.5 * (p[side].var() + p[~side].var()) + 1e-12)
        if excess >= SPLIT_COHERENCE and (depth == 0 or apart >= SPLIT_SEPARATION):
            upper = side.astype(np.float32) @ z / side.sum()
            lower = (mean * len(z) - upper * side.sum()) / (~side).sum()
            queue += [(members[~side], lower, depth + 1), (members[side], upper, depth + 1)]
        else:
            out.append(centre)
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
    index, d2 = nearest_index(embedding, finite, centres)
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


def nearest_index(embedding: np.ndarray, finite: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def split_components(index: np.ndarray, centres: np.ndarray, embedding: np.ndarray, nav_shape, *, min_size: int,
                     limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Each cluster's places in the scan that do not touch: separate clusters (each with its own
    centre, the mean of its points), the largest keeping the cluster's place in ``centres``.
    Two grains of one phase whose patterns differ by a turn about the beam have the same
    rotation-invariant features (a spot scan's), and grains of few spots lie closer together
    than the noise (3.6-3.8 sigmas along their mean difference, against 5-9 for most pairs):
    one cluster, but two regions, and every grain is a region of its own.

    Places of fewer than ``min_size`` points stay with the largest. Places inside one other
    place (half their neighbours or more in it, ``HOST_SHARE``: precipitates in a grain, 63-100%
    on the superalloy scan, against 27-71% for a spot scan's grains) stay together with the
    others inside it: one population of that grain. Points not in (index -1: not received yet,
    or no embedding) join places rather than part them, so a page not in yet splits no grain.
    At most ``limit`` centres in all. Returns (index (N,), centres)."""
    from scipy import ndimage

    ny, nx = (int(v) for v in nav_shape)
    grid = index.reshape(ny, nx)
    eight = np.ones((3, 3), bool)
    # Every cluster's places, numbered across the scan (0: a point not in): one labelling a cluster.
    # Each labelling in the cluster's bounding box: split_components took 0.13 s against 0.28-0.33 s
    # with the whole map (12 clusters of a 1000x1000 scan, load 4). A gap that leaves the box
    # joins no places there.
    places = np.zeros((ny, nx), np.int64)
    first = [1]
    for k, box in enumerate(ndimage.find_objects(grid + 1, max_label=len(centres))):
        count = 0
        if box is not None:
            near = grid[box]
            mine = near == k
            labels, count = ndimage.label(mine | (near < 0), structure=eight)
            places[box][mine] = labels[mine] + (first[-1] - 1)
        first.append(first[-1] + count)
    sizes = np.bincount(places.ravel(), minlength=first[-1])
    sizes[0] = 0
    index = index.copy()
    out = [c for c in np.asarray(centres, np.float32)]
    large = sizes >= min_size
    cluster_of = np.repeat(np.arange(len(centres)), np.diff(first))  # place p's cluster: cluster_of[p - 1]
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

    for k in range(len(centres)):
        own = np.arange(first[k], first[k + 1])
        big = own[large[own]]
        if len(big) < 2:
            continue
        if boxes is None:
            boxes = ndimage.find_objects(places)
        groups: dict = {}
        for c in big:
            groups.setdefault(key(int(c)), []).append(c)
        if len(groups) < 2:
            continue
        parts = sorted(groups.values(), key=lambda cs: -int(sizes[cs].sum()))
        for cs in parts[1:]:
            if len(out) >= limit:
                break
            moved = np.flatnonzero(np.isin(places, cs).ravel())
            index[moved] = len(out)
            out.append(embedding[moved].astype(np.float32).mean(axis=0))
        kept = np.flatnonzero(index == k)
        if len(kept):
            out[k] = embedding[kept].astype(np.float32).mean(axis=0)
    return index, np.stack(out)


HOST_SHARE = 0.5  # a place lies inside another where half its neighbours or more are in that one


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

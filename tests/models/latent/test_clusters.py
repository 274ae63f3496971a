"""Cluster, boundary and novelty maps from embeddings (the sink's)."""

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from liveindex.models.errors import InputError
from liveindex.models.latent.clusters import (
    BASELINE_LEAST_LISTED,
    NOVEL,
    QUALITY_REFERENCE_LEAST,
    LatentClusters,
    parse_clusters,
    quality_reference,
)
from liveindex.models.latent.spatial import boundary_map


def _regions(ny=60, nx=60, dims=8, noise=0.3, seed=0):
    """Three regions (left, right, a disc) with well separated mean embeddings, as float16."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:ny, 0:nx]
    label = np.where(xx < nx // 2, 0, 1)
    label[((yy - 30) ** 2 + (xx - 45) ** 2) <= 81] = 2
    label = label.ravel()
    centres = rng.normal(0, 3, (3, dims))
    e = centres[label] + rng.normal(0, noise, (ny * nx, dims))
    return e.astype(np.float16), label


def test_clusters_match_the_regions_and_keep_their_ids():
    e, label = _regions()
    received = np.ones(len(e), bool)
    clusters = LatentClusters((60, 60), sample=1000)
    first = clusters.refresh(e, received)
    assert adjusted_rand_score(label, first["cluster"]) > 0.95
    second = clusters.refresh(e, received)  # another subsample: the same ids
    assert np.mean(first["cluster"] == second["cluster"]) > 0.99
    ids, _ = clusters.assign(e[:10])  # a point on arrival: its nearest cluster
    assert np.array_equal(ids, second["cluster"][:10])


def test_a_growing_scan_keeps_ids_and_adds_new_regions():
    e, label = _regions()
    clusters = LatentClusters((60, 60), sample=1000)
    received = label != 2  # the disc not scanned yet
    before = clusters.refresh(e, received)["cluster"]
    after = clusters.refresh(e, np.ones(len(e), bool))["cluster"]
    old = received
    assert np.mean(before[old] == after[old]) > 0.99  # the regions already there keep their ids
    new_ids = set(np.unique(after[label == 2])) - set(np.unique(before[old]))
    assert len(new_ids) == 1  # the disc is a cluster of its own, with an id never used before


def test_a_given_count_uses_k_means():
    e, label = _regions()
    out = LatentClusters((60, 60), clusters=3, sample=1000).refresh(e, np.ones(len(e), bool))
    assert len(np.unique(out["cluster"])) == 3 and adjusted_rand_score(label, out["cluster"]) > 0.95


def test_boundary_map_peaks_on_region_edges():
    e, label = _regions()
    b = boundary_map(e, np.ones(len(e), bool), (60, 60)).reshape(60, 60)
    lab = label.reshape(60, 60)
    edge = np.zeros_like(lab, bool)
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    edge[:, :-1] |= lab[:, 1:] != lab[:, :-1]
    assert np.median(b[edge]) > 3 * np.median(b[~edge]) and abs(np.median(b) - 1) < 0.2
    missing = np.ones(3600, bool)
    missing[:60] = False  # the first row not in: NaN there, the rest as before
    b2 = boundary_map(e, missing, (60, 60))
    assert np.isnan(b2[:60]).all() and np.isfinite(b2[60:]).all()


def _explained(unexplained):
    """1/0 explained shares of a modality without confidences (as stream/latent_map.explained_of gives)."""
    return np.where(unexplained, 0.0, 1.0).astype(np.float32)


def test_novelty_marks_unexplained_clusters_and_outliers():
    e, label = _regions()
    e = e.astype(np.float32)
    e[100] += 40  # one point far from everything
    unexplained = (label == 2) & (np.random.default_rng(1).random(len(e)) < 0.98)  # a phase nobody listed
    unexplained |= (label == 0) & (np.random.default_rng(2).random(len(e)) < 0.05)  # a few noisy patterns
    out = LatentClusters((60, 60), sample=1000).refresh(e.astype(np.float16), np.ones(len(e), bool),
                                                        _explained(unexplained))
    novel = out["novelty"] >= NOVEL
    assert novel[label == 2].mean() > 0.99 and novel[100]
    others = label != 2
    others[100] = False
    assert novel[others].mean() < 0.01


def test_poor_patterns_of_a_listed_phase_are_not_novel():
    """Hard noise (benchmarks/latent.py --part b --noise hard): the listed phase's grains answered
    with a mean confidence of 0.2-0.6 by grain, most points below 0.5 in the worst; the missing
    phase's at about 0.003. Judged per point, or by a cluster's share below 0.5 against the best
    clusters', the poor grains were novel (28.7% of the listed phase's points on that scan)."""
    e, label = _regions()
    rng = np.random.default_rng(4)
    mean = np.array([0.2, 0.6, 0.003])[label]  # the left grain poor, the right good, the disc missing
    confidence = rng.beta(0.6, 0.6 * (1 - mean) / mean).astype(np.float32)
    assert (confidence[label == 0] < 0.5).mean() > 0.75
    out = LatentClusters((60, 60), sample=1000).refresh(e, np.ones(len(e), bool), confidence)
    novel = out["novelty"] >= NOVEL
    assert novel[label == 2].mean() > 0.99 and novel[label != 2].mean() < 0.01


def test_points_not_in_or_not_finite_get_no_cluster():
    e, label = _regions()
    e[5] = np.nan
    received = np.ones(len(e), bool)
    received[10] = False
    out = LatentClusters((60, 60), sample=1000).refresh(e, received)
    assert out["cluster"][5] == -1 and out["cluster"][10] == -1 and np.isnan(out["novelty"][[5, 10]]).all()


def test_a_scan_no_listed_phase_explains_is_novel_on_the_listed_fields_scale():
    """Spots: the novelty reads the ``listed`` field, where a missing phase reads about 0.01-0.05
    (not the confidence's 0.002-0.005). A scan of a missing phase alone has no listed cluster to set
    the baseline; its least must be on that field's scale: at the confidence's (0.2) no point of an
    all-Ti spot scan was novel and ``liveindex index`` said the patterns were hard to index."""
    e, label = _regions()
    listed = np.random.default_rng(4).uniform(0.005, 0.015, len(e)).astype(np.float32)
    received = np.ones(len(e), bool)
    out = LatentClusters((60, 60), sample=1000, baseline_least=BASELINE_LEAST_LISTED).refresh(e, received, listed)
    assert (out["novelty"] >= NOVEL).all()
    # The same values read as a calibrated confidence (EBSD's least, unchanged) are not novel.
    out = LatentClusters((60, 60), sample=1000).refresh(e, received, listed)
    assert not (out["novelty"] >= NOVEL).any()


def test_the_quality_gate_takes_no_reference_from_a_few_falsely_sure_points():
    """A missing phase alone in the scan gives a few falsely sure points (listed > 0.5: 0.6-2.1% of
    an all-Ti spot scan); their median score is the missing phase's own, and as the gate's reference
    it kept every region from being novel. Too few sure points: no reference, no gate."""
    e, label = _regions()
    rng = np.random.default_rng(5)
    listed = rng.uniform(0.002, 0.006, len(e)).astype(np.float32)
    falsely_sure = rng.random(len(e)) < 0.01
    listed[falsely_sure] = 0.6
    quality = rng.normal(0.1, 0.01, len(e)).astype(np.float32)  # they match no better than the rest
    assert quality_reference(quality, listed) is None
    clusters = LatentClusters((60, 60), sample=1000, baseline_least=BASELINE_LEAST_LISTED)
    out = clusters.refresh(e, np.ones(len(e), bool), listed, quality)
    assert clusters.quality_top is None and (out["novelty"] >= NOVEL).mean() > 0.9
    # A population of sure points (a listed phase in the scan) is the reference: their median score.
    listed[label == 1] = 0.9
    assert quality_reference(quality, listed) == pytest.approx(np.median(quality[listed > 0.5]))
    # Not where they are a large share of a small scan but fewer than QUALITY_REFERENCE_LEAST.
    few = np.flatnonzero(listed > 0.5)[:QUALITY_REFERENCE_LEAST - 1]
    assert quality_reference(quality[few], listed[few]) is None


def test_clusters_option():
    assert parse_clusters("auto") is None and parse_clusters("5") == 5
    for bad in ("1", "x", "1000"):
        with pytest.raises(InputError, match="auto or a number"):
            parse_clusters(bad)


def test_novelty_is_relative_to_the_best_explained_clusters():
    e, label = _regions()
    rng = np.random.default_rng(3)
    # Poor patterns everywhere (60% unexplained in the listed phase's regions), the missing
    # phase's region (the disc) all unexplained: only the disc is novel.
    unexplained = np.where(label == 2, True, rng.random(len(e)) < 0.6)
    out = LatentClusters((60, 60), sample=1000).refresh(e, np.ones(len(e), bool), _explained(unexplained))
    novel = out["novelty"] >= NOVEL
    assert novel[label == 2].mean() > 0.99 and novel[label != 2].mean() < 0.01
    # Nothing explained anywhere: no listed phase explains the scan, every point is novel.
    out = LatentClusters((60, 60), sample=1000).refresh(e, np.ones(len(e), bool), np.zeros(len(e), np.float32))
    assert (out["novelty"] >= NOVEL).all()


def test_in_a_mixed_cluster_the_missing_phase_points_are_novel():
    """One cluster (the right half) holds a grain of a missing phase (its top) and one of a
    listed phase (its bottom): a point's explained share is pooled over its own cluster's
    points about it, so the two are told apart, all but the rows near where they meet."""
    rng = np.random.default_rng(6)
    yy, xx = np.mgrid[0:80, 0:80]
    right = (xx >= 40).ravel()
    e = (np.where(right[:, None], 3.0, -3.0) + rng.normal(0, 0.3, (6400, 8))).astype(np.float32)
    unexplained = right & (yy < 40).ravel()
    out = LatentClusters((80, 80), sample=1000).refresh(e, np.ones(6400, bool), _explained(unexplained))
    novel = out["novelty"] >= NOVEL
    away = (np.abs(yy - 39.5) > 8).ravel()
    assert novel[unexplained & away].all() and not novel[~unexplained & away].any()
    assert len(np.unique(out["cluster"][right])) == 1  # one cluster holds both


def test_the_neighbourhood_pools_only_its_own_cluster():
    from liveindex.models.latent.clusters import pooled_explained

    cluster = np.zeros((5, 6), np.int16)
    cluster[:, 3:] = 1
    cluster[0, 0] = -1
    explained = np.where(cluster == 1, 1.0, 0.0).astype(np.float32)
    explained[4, 5] = np.nan  # not answered: not counted
    explained[2, 4] = 0.0
    out = pooled_explained(cluster.ravel(), explained.ravel(), (5, 6)).reshape(5, 6)
    assert np.isnan(out[0, 0]) and (out[:, :3][cluster[:, :3] == 0] == 0).all()
    assert out[4, 5] == 7 / 8 and out[2, 3] == 13 / 14  # (2, 4) counts; (4, 5) itself does not
    rows = pooled_explained(cluster.ravel(), explained.ravel(), (5, 6), rows=(2, 4))
    assert np.array_equal(rows, out[2:4].ravel(), equal_nan=True)


def _icm_every_centre(embedding, finite, centres, nav_shape, iterations=2, beta=1.0):
    """The ICM as it was, every point weighed against every centre (the reference)."""
    from liveindex.models.latent.spatial import _means, nearest_index, squared_norms

    ny, nx = nav_shape
    ee = squared_norms(embedding, finite)
    index, d2 = nearest_index(embedding, finite, centres, ee=ee)
    own = np.flatnonzero(finite)
    z = embedding[own].astype(np.float32)
    for _ in range(iterations):
        centres = _means(z, index[own], centres)
        noise = max(float(np.mean(d2[own])) / z.shape[1], 1e-12)
        pad = np.full((ny + 2, nx + 2), -1)
        pad[1:-1, 1:-1] = index.reshape(ny, nx)
        d = ((z[:, None, :] - centres[None]) ** 2).sum(axis=2)
        votes = np.zeros_like(d)
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                if dy != 1 or dx != 1:
                    lab = pad[dy:dy + ny, dx:dx + nx].ravel()[own]
                    ok = lab >= 0
                    votes[np.flatnonzero(ok), lab[ok]] += 1
        choice = (d / (2 * noise) - beta * votes).argmin(axis=1)
        index = np.full(ny * nx, -1, np.int64)
        index[own] = choice
        d2 = np.zeros(ny * nx, np.float32)
        d2[own] = d[np.arange(len(own)), choice]
    return index


def test_the_icm_weighs_only_points_its_neighbours_could_move_and_agrees_with_weighing_all():
    from liveindex.models.latent.spatial import spatial_labels

    rng = np.random.default_rng(5)
    e, label = _regions(dims=8, noise=3.0, seed=5)  # noisy: many points within reach of another centre
    e = e.astype(np.float32)
    finite = rng.random(len(e)) < 0.97
    centres = np.stack([e[label == k].mean(axis=0) for k in range(3)]) + rng.normal(0, 0.3, (3, 8)).astype(np.float32)
    index, _, d2 = spatial_labels(e, finite, centres, (60, 60))
    reference = _icm_every_centre(e, finite, centres, (60, 60))
    assert np.mean(index == reference) > 0.999 and (index[~finite] == -1).all()
    naive = np.argmin(((e[:, None] - centres[None]) ** 2).sum(axis=2), axis=1)
    assert np.mean(index[finite] != naive[finite]) > 0.01  # the neighbours did move points here
    assert np.all(d2[finite] >= 0)


def test_a_refresh_reclusters_only_now_and_then():
    from liveindex.models.latent.clusters import REFIT_EVERY

    e, label = _regions()
    clusters = LatentClusters((60, 60), sample=1000)
    received = np.ones(len(e), bool)
    fits = []
    for _ in range(2 * REFIT_EVERY):
        clusters.refresh(e, received)
        fits.append(clusters.since_fit == 0)
    assert fits == ([True] + [False] * (REFIT_EVERY - 1)) * 2


def test_a_cluster_whose_halves_lie_together_in_space_is_split_and_noise_is_not():
    from liveindex.models.latent.spatial import split_coherent

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:80, 0:80]
    grain = ((yy >= 40) * 2 + (xx >= 40)).ravel()
    disc = (((yy % 20 - 10) ** 2 + (xx % 20 - 10) ** 2) <= 16).ravel()  # precipitates: 1 noise sigma a dimension
    centres = rng.normal(0, 3, (4, 16))
    e = (centres[grain] + disc[:, None] * rng.normal(0, 0.75, 16) + rng.normal(0, 1, (6400, 16))).astype(np.float32)
    start = np.stack([e[grain == k].mean(axis=0) for k in range(4)])
    out = split_coherent(e, np.ones(6400, bool), start, (80, 80), min_size=50)
    assert len(out) == 8  # each grain and its precipitates
    flat = (centres[grain] + rng.normal(0, 1, (6400, 16))).astype(np.float32)  # no precipitates: nothing to split
    assert len(split_coherent(flat, np.ones(6400, bool), start, (80, 80), min_size=50)) == 4


def _painted(label, means, noise=0.3, seed=0):
    rng = np.random.default_rng(seed)
    return (means[label.ravel()] + rng.normal(0, noise, (label.size, means.shape[1]))).astype(np.float16)


def test_places_apart_with_one_embedding_are_clusters_of_their_own():
    # Four vertical bands: two grains whose patterns differ by a turn about the beam (one
    # rotation-invariant embedding, bands 0 and 3) with two other grains between them: four regions.
    yy, xx = np.mgrid[0:60, 0:60]
    label = np.minimum(xx // 15, 3)
    means = np.random.default_rng(5).normal(0, 3, (3, 8))[[0, 1, 2, 0]]
    out = LatentClusters((60, 60), sample=1000).refresh(_painted(label, means), np.ones(label.size, bool))
    assert len(np.unique(out["cluster"])) == 4 and adjusted_rand_score(label.ravel(), out["cluster"]) > 0.95
    # A grain not all in yet (a page missing across it) is not split by the gap.
    received = np.ones(label.size, bool)
    received[(yy.ravel() == 30) & (xx.ravel() < 15)] = False
    out = LatentClusters((60, 60), sample=1000).refresh(_painted(label, means), received)
    assert len(np.unique(out["cluster"][received])) == 4


def test_places_apart_keep_their_ids_between_refreshes():
    # The two bands of one embedding are one cluster to the ICM (its centres between refits) and
    # two on the map: each keeps its id through refreshes with and without reclustering.
    from liveindex.models.latent.clusters import REFIT_EVERY

    yy, xx = np.mgrid[0:60, 0:60]
    label = np.minimum(xx // 15, 3)
    means = np.random.default_rng(5).normal(0, 3, (3, 8))[[0, 1, 2, 0]]
    clusters = LatentClusters((60, 60), sample=1000)
    received = np.ones(label.size, bool)
    maps = [clusters.refresh(_painted(label, means, seed=s), received)["cluster"] for s in range(REFIT_EVERY + 2)]
    assert len(np.unique(maps[0])) == 4 and len(clusters.base) == 3
    for m in maps[1:]:
        assert np.mean(m == maps[0]) > 0.99


def test_precipitates_in_one_grain_stay_one_cluster():
    # Two grains (left, right), the left one with four precipitates apart from each other: one
    # population in that grain (the superalloy's truth), not four clusters.
    yy, xx = np.mgrid[0:60, 0:60]
    label = np.where(xx < 30, 0, 1)
    for cy, cx in ((12, 10), (12, 22), (45, 10), (45, 22)):
        label[(yy - cy) ** 2 + (xx - cx) ** 2 <= 16] = 2
    means = np.random.default_rng(6).normal(0, 3, (3, 8))
    out = LatentClusters((60, 60), sample=1000).refresh(_painted(label, means), np.ones(label.size, bool))
    assert len(np.unique(out["cluster"])) == 3 and adjusted_rand_score(label.ravel(), out["cluster"]) > 0.95


def test_a_cluster_of_several_grains_is_split_until_each_is_one():
    # Four quadrants 4.4-7.3 noise sigmas apart, given as one cluster (as HDBSCAN gave up to 9
    # grains of few spots on the spot scans): halves of halves, four clusters (one split: two).
    from liveindex.models.latent.spatial import split_coherent

    yy, xx = np.mgrid[0:60, 0:60]
    label = ((yy >= 30) * 2 + (xx >= 30)).ravel()
    rng = np.random.default_rng(1)
    e = (rng.normal(0, 1, (4, 24))[label] + rng.normal(0, 1, (label.size, 24))).astype(np.float32)
    centres = split_coherent(e, np.ones(label.size, bool), e.mean(axis=0, keepdims=True), (60, 60), min_size=30)
    assert len(centres) == 4
    nearest = np.linalg.norm(e[:, None] - centres[None], axis=2).argmin(axis=1)
    assert adjusted_rand_score(label, nearest) > 0.9


def test_a_region_the_templates_match_well_is_not_novel_however_unsure():
    """Spot patterns at hard noise: a listed phase's grain can read as unexplained (its ``listed``
    values low) while its patterns match the templates about as well as the scan's sure points;
    the quality gate keeps it from being taken for a missing phase. A region that matches poorly
    too (a missing phase) stays novel."""
    e, label = _regions()
    listed = np.array([0.02, 0.9, 0.01], np.float32)[label]  # the left grain unsure, the disc missing
    quality = np.array([0.8, 1.0, 0.4], np.float32)[label]  # match scores: the left grain near the sure ones
    received = np.ones(len(e), bool)
    without = LatentClusters((60, 60), sample=1000).refresh(e, received, listed)
    assert (without["novelty"][label == 0] >= NOVEL).mean() > 0.99  # what the gate is for
    out = LatentClusters((60, 60), sample=1000).refresh(e, received, listed, quality)
    novel = out["novelty"] >= NOVEL
    assert novel[label == 2].mean() > 0.99 and novel[label != 2].mean() < 0.01

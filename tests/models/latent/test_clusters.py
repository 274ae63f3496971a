"""Cluster, boundary and novelty maps from embeddings (the sink's)."""

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from liveindex.models.errors import InputError
from liveindex.models.latent.clusters import NOVEL, LatentClusters, boundary_map, parse_clusters


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


def test_novelty_marks_unexplained_clusters_and_outliers():
    e, label = _regions()
    e = e.astype(np.float32)
    e[100] += 40  # one point far from everything
    unexplained = (label == 2) & (np.random.default_rng(1).random(len(e)) < 0.8)  # a phase nobody listed
    unexplained |= (label == 0) & (np.random.default_rng(2).random(len(e)) < 0.05)  # a few noisy patterns
    out = LatentClusters((60, 60), sample=1000).refresh(e.astype(np.float16), np.ones(len(e), bool), unexplained)
    novel = out["novelty"] >= NOVEL
    assert novel[label == 2].mean() > 0.99 and novel[100]
    others = label != 2
    others[100] = False
    assert novel[others].mean() < 0.01


def test_points_not_in_or_not_finite_get_no_cluster():
    e, label = _regions()
    e[5] = np.nan
    received = np.ones(len(e), bool)
    received[10] = False
    out = LatentClusters((60, 60), sample=1000).refresh(e, received)
    assert out["cluster"][5] == -1 and out["cluster"][10] == -1 and np.isnan(out["novelty"][[5, 10]]).all()


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
    out = LatentClusters((60, 60), sample=1000).refresh(e, np.ones(len(e), bool), unexplained)
    novel = out["novelty"] >= NOVEL
    assert novel[label == 2].mean() > 0.99 and novel[label != 2].mean() < 0.01
    # Nothing explained anywhere: no listed phase explains the scan, every point is novel.
    out = LatentClusters((60, 60), sample=1000).refresh(e, np.ones(len(e), bool), np.ones(len(e), bool))
    assert (out["novelty"] >= NOVEL).all()


def test_in_a_mixed_cluster_its_unexplained_points_are_novel():
    e, label = _regions()
    unexplained = (label == 2) & (np.arange(len(e)) % 5 < 2)  # 40% of the disc no listed phase explains
    out = LatentClusters((60, 60), sample=1000).refresh(e, np.ones(len(e), bool), unexplained)
    novel = out["novelty"] >= NOVEL
    assert novel[unexplained].all() and not novel[~unexplained].any()


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

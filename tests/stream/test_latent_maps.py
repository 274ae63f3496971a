"""The sink's latent maps (stream/latent_map.py) on the test modality: live, on the page, in
the files; and once through real processes."""

import json

import numpy as np
import pytest
from orix import io as orix_io
from sklearn.metrics import adjusted_rand_score

from liveindex.models.latent.basis import fit_basis
from liveindex.stream.demo import run_demo
from liveindex.stream.live_view import SinkView, map_update, point_details
from liveindex.stream.protocol import decode, encode
from liveindex.stream.scan_state import ScanState

from ..conftest import results_message
from ..fake_modality import FakeModality, FakeSource


def _state(nav=(10, 12), basis=None):
    source = FakeSource(FakeModality(), nav, seed=1)
    header = {"scan": "lat", **source.scan_start()}
    if basis is not None:
        header["latent"] = basis.to_wire()
    return ScanState(decode(encode("scan_start", header))), source


def _fill(state, indices, embedding):
    frames = results_message(indices, state.scan)
    message = decode(frames)
    message.arrays["embedding"] = np.asarray(embedding, np.float32)
    return state.add(message)


def test_points_are_clustered_on_arrival_and_on_refresh_and_shown_live():
    state, _ = _state()
    n = state.size
    half = np.arange(n) % 12 < 6  # two regions: left and right
    rng = np.random.default_rng(0)
    emb = np.where(half[:, None], [0.0, 0, 0], [3.0, 0, 0]) + rng.normal(0, 0.05, (n, 3))
    _fill(state, np.arange(60), emb[:60])
    state.refresh_latent()
    assert set(np.unique(state.latent.cluster[:60])) == {0, 1} and (state.latent.cluster[60:] == -1).all()
    _fill(state, np.arange(60, n), emb[60:])  # assigned on arrival, before any refresh
    assert adjusted_rand_score(half, state.latent.cluster) == 1.0
    version = state.version
    state.refresh_latent()
    assert state.version == version  # nothing changed cluster: no new change for the page
    update, _ = map_update(state, -1)
    names = [m["name"] for m in update["maps"]]
    assert {"cluster", "boundary", "novelty"} <= set(names)
    layer = np.frombuffer(__import__("base64").b64decode(update["layers"]["cluster"]), np.uint8)
    assert set(np.unique(layer)) == {1, 2}
    details = point_details(state, 5)
    assert details["cluster"] in (0, 1) and dict(details["rows"])["cluster"] in ("0", "1")
    assert len(state.latent.info) == 2 and {c["size"] for c in state.latent.info} == {60}


def test_novelty_weighs_each_points_confidence_with_its_neighbours_on_arrival_and_on_refresh():
    """Three regions, the left two of a listed phase answered poorly (most below confidence 0.5,
    as at hard noise) or well, the right one of a missing phase (confidence about 0): only the
    right one is novel, on refresh and for points placed on arrival between refreshes."""
    state, _ = _state((24, 30))
    n = state.size
    xx = np.arange(n) % 30
    region = np.minimum(xx // 10, 2)
    rng = np.random.default_rng(2)
    emb = np.array([[0.0, 0, 0], [3.0, 0, 0], [0.0, 3, 0]])[region] + rng.normal(0, 0.1, (n, 3))
    mean = np.array([0.25, 0.9, 0.003])[region]
    confidence = rng.beta(0.6, 0.6 * (1 - mean) / mean).astype(np.float32)

    def fill(indices):
        message = decode(results_message(indices, state.scan))
        message.arrays["embedding"] = emb[indices].astype(np.float32)
        message.arrays["confidence"] = confidence[indices]
        state.add(message)

    half = n // 2
    fill(np.arange(half))
    state.refresh_latent()
    novel = state.latent.novelty >= 0.5
    assert novel[:half][region[:half] == 2].mean() > 0.95 and not novel[:half][region[:half] < 2].any()
    for first in range(half, n, 30):  # a row at a time, after the refresh
        fill(np.arange(first, first + 30))
    novel = state.latent.novelty >= 0.5
    assert novel[half:][region[half:] == 2].mean() > 0.95 and novel[half:][region[half:] < 2].mean() < 0.02
    assert np.array_equal(state.latent.embedding, emb.astype(np.float32))  # kept as float32 as points came in
    state.refresh_latent()
    novel = state.latent.novelty >= 0.5
    assert novel[region == 2].mean() > 0.95 and not novel[region < 2].any()
    info = {c["id"]: c for c in state.latent.info}
    assert sorted(c["novel"] for c in info.values()) == [False, False, True]


def test_a_cluster_mean_pattern_comes_back_through_the_basis():
    rng = np.random.default_rng(0)
    basis = fit_basis(rng.normal(1, 0.1, (200, 16 * 16)).astype(np.float32), (16, 16), dims=8)

    class _Sink:  # what SinkView reads of a sink, for its cluster picture
        current = None
        metrics = type("M", (), {"registry": None})()

    state, _ = _state((6, 6), basis=basis)
    _fill(state, np.arange(36), np.zeros((36, 3)))  # the fake's 3-d embedding does not match the basis
    state.refresh_latent()
    assert state.latent.basis is not None and state.latent.mean_pattern(0) is None  # refused, not wrong
    view = SinkView(_Sink())
    view.sink.current = state
    assert view.cluster_png("0") is None and view.cluster_png("x") is None
    state.latent.clusters.known[0].centre = np.zeros(8, np.float32)
    image = state.latent.mean_pattern(0)
    assert image.shape == (16, 16) and np.allclose(image, basis.mean.reshape(16, 16))
    assert view.cluster_png("0")[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_demo_through_real_processes_writes_the_latent_maps(tmp_path):
    summary = run_demo(modality="fake", scan="20x15", workers=2, out_dir=tmp_path, http_port=0, open_browser=False,
                       page_size=32)
    assert summary["missing"] == 0
    scan = summary["scan"]
    xmap = orix_io.load(tmp_path / f"{scan}.h5")
    assert {"cluster", "boundary", "novelty"} <= set(xmap.prop)
    source = FakeSource(FakeModality(), (15, 20), seed=0)
    # The clusters split the phases' places, never mix two phases: places apart with one
    # embedding may be clusters of their own (as two grains of one phase are), up to one a place.
    from scipy import ndimage

    phase, cluster = source.truth["phase_id"], xmap.prop["cluster"]
    places = sum(ndimage.label(phase.reshape(15, 20) == p, structure=np.ones((3, 3)))[1] for p in np.unique(phase))
    assert all(len(np.unique(phase[cluster == c])) == 1 for c in np.unique(cluster))
    assert 2 <= len(np.unique(cluster)) <= places
    assert (xmap.prop["novelty"] < 0.5).all()  # every point explained (confidence 0.9), none far
    assert np.load(tmp_path / f"{scan}_embedding.npy").shape == (300, 3)
    for name in ("cluster", "boundary", "novelty"):
        assert (tmp_path / f"{scan}_{name}.png").stat().st_size > 100
    written = json.loads((tmp_path / f"{scan}.json").read_text())
    assert len(written["clusters"]) == len(np.unique(cluster)) and sum(c["size"] for c in written["clusters"]) == 300


def test_the_embedding_file_is_written_only_where_points_have_one(tmp_path):
    from liveindex.stream.writers import write_outputs

    state, _ = _state((3, 4))
    maps = {k: v.copy() for k, v in state.maps.items()}
    maps["embedding"][:] = np.nan  # --latent off: no point has an embedding
    write_outputs(tmp_path, "off", maps=maps, start=state.spec, summary={})
    assert not (tmp_path / "off_embedding.npy").exists()
    maps["embedding"][:] = 1.0
    write_outputs(tmp_path, "on", maps=maps, start=state.spec, summary={})
    assert np.load(tmp_path / "on_embedding.npy").shape == (12, 3)


def test_the_refresher_keeps_its_core_share_and_the_five_second_promise():
    from liveindex.stream.latent_map import MAX_REFRESH_SECONDS, REFRESHER_CORE_SHARE, refresh_pause

    # A small scan's refresh (10 ms): the next one the period after this one's start.
    assert refresh_pause(2.0, 0.01, 0.01) == pytest.approx(1.99)
    # A 1e6-point refresh (0.6 s of CPU): later, so the thread keeps to its share of a core.
    assert (0.6 + refresh_pause(2.0, 0.6, 0.6)) * REFRESHER_CORE_SHARE == pytest.approx(0.6)
    # One that reclusters (1.3 s of CPU) under load (2 s of wall time): never past the promise.
    assert 2.0 + refresh_pause(2.0, 2.0, 1.3) == pytest.approx(MAX_REFRESH_SECONDS) and MAX_REFRESH_SECONDS < 5
    # Slower than the promise itself: still a pause, half its CPU time, for the sink's loop.
    assert refresh_pause(2.0, 6.0, 3.0) == pytest.approx(1.5)


class MeansModality(FakeModality):
    """The fake modality that can make a frame of a feature vector (as EBSD and spots can)."""

    name = "fake-means"

    def pattern_from_features(self, features, feature_shape, pattern_shape):
        from ..fake_modality import SCALE

        frames = np.zeros((len(features), *pattern_shape), np.uint16)
        frames[:, 0, :4] = np.round(SCALE * (np.float64([1, 0, 0, 0]) + 1))  # the identity orientation
        frames[:, 0, 4] = np.where(features[:, 0] > 1.5, 1000, 0)  # phase 1 where the first feature is high
        return frames


def test_the_sink_indexes_each_clusters_mean_pattern_with_an_indexer_of_its_own():
    from liveindex.models import modality as modalities
    from liveindex.models.latent.basis import LatentBasis

    modalities.register("fake-means", f"{__name__}:MeansModality")
    source = FakeSource(FakeModality(), (10, 12), seed=1)
    identity = LatentBasis(np.zeros(8, np.float32), np.ones(8, np.float32), np.eye(8, dtype=np.float32), (2, 4))
    header = {"scan": "means", **source.scan_start(), "modality": "fake-means", "latent": identity.to_wire()}
    header["fields"] = [f if f[0] != "embedding" else ["embedding", "float32", [8], 0.0] for f in header["fields"]]
    state = ScanState(decode(encode("scan_start", header)), index_cluster_means=True)
    n = state.size
    right = np.arange(n) % 12 >= 6
    emb = 3.0 * right[:, None] * np.eye(8)[0] + np.random.default_rng(0).normal(0, 0.05, (n, 8))
    _fill(state, np.arange(n), emb)
    state.refresh_latent(final=True)  # waits for the sink's indexer, then indexes the two means
    means = {c["id"]: c.get("mean_pattern_indexed") for c in state.latent.info}
    assert len(means) == 2 and all(means.values()), state.latent.info
    left_id = int(np.bincount(state.latent.cluster[~right]).argmax())
    names = state.spec.phases
    assert means[left_id]["phase"] == names[0].name and means[1 - left_id]["phase"] == names[1].name
    assert means[left_id]["confidence"] == pytest.approx(0.9) and len(means[left_id]["euler_deg"]) == 3
    assert state.latent.mean_indexer is None  # let go once the scan is finished

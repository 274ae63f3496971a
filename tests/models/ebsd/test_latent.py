"""EBSD's latent features and basis, and the simulator's precipitates."""

from pathlib import Path

import numpy as np

from liveindex.models.ebsd.files import SimulatedSource
from liveindex.models.ebsd.latent import embed, feature_shape, features, fit_scan_basis
from liveindex.models.ebsd.master_patterns import phases_from_spec
from liveindex.models.ebsd.simulator import SimulatedScan
from liveindex.models.latent.basis import DEFAULT_DIMS, LatentBasis

DATA = Path(__file__).resolve().parents[2] / "data"


def test_features_are_per_frame_and_binned_to_at_most_32_px():
    frames = np.random.default_rng(0).integers(1, 255, (5, 60, 60)).astype(np.uint8)
    f = features(frames)
    assert f.shape == (5, 900) and feature_shape((60, 60)) == (30, 30)
    np.testing.assert_allclose(f.mean(axis=1), 1, rtol=1e-5)  # each frame over its own mean
    np.testing.assert_array_equal(features(frames[2:4]), f[2:4])  # nothing shared between frames
    dark = np.zeros((1, 60, 60), np.uint8)
    assert np.isnan(features(dark)).all()  # no signal: NaN, never a division error


def test_the_scan_start_carries_one_basis_that_every_worker_rebuilds():
    source = SimulatedSource(SimulatedScan((12, 12), seed=1))
    start = source.scan_start()
    assert source.scan_start()["latent"] is start["latent"]  # fitted once per source
    basis = LatentBasis.from_wire(start["latent"])
    assert basis.dims == DEFAULT_DIMS and basis.feature_shape == (30, 30)
    frames = source.read(0, 20)
    e = embed(basis, frames)
    assert e.dtype == np.float16 and e.shape == (20, DEFAULT_DIMS) and np.isfinite(e).all()
    again = embed(LatentBasis.from_wire(start["latent"]), frames[10:])  # another worker, another page
    np.testing.assert_array_equal(again, e[10:])
    assert np.isnan(embed(None, frames)).all()  # --latent off, or no basis: NaN
    off = SimulatedSource(SimulatedScan((4, 4), seed=1))
    off.fit_latent = False  # --latent off on liveindex index and demo: no fit, no basis
    assert "latent" not in off.scan_start()


def test_precipitates_share_the_grain_orientation_and_differ_in_phase():
    gamma, gamma_prime = phases_from_spec(f"{DATA / 'gamma_ni.cif'},{DATA / 'ni3al.cif'}")
    scan = SimulatedScan((24, 24), phase=gamma, precipitate=gamma_prime, seed=3, grain_size=12,
                         precipitate_radius=3.0, noise="clean")
    inside = scan.truth_phase == 1
    assert 0.1 < inside.mean() < 0.45
    grains = len(scan.grain_rotations)
    grain = scan.grain_of_point % grains
    np.testing.assert_array_equal(scan.truth, scan.grain_rotations[grain])  # cube-cube: the grain's orientation
    frames = scan.render(0, scan.size).astype(np.float32)
    a, b = np.flatnonzero(~inside & (grain == grain[inside][0]))[0], np.flatnonzero(inside)[0]
    assert not np.array_equal(frames[a], frames[b])  # the superlattice bands show
    assert fit_scan_basis(SimulatedSource(scan), tiles=64).dims == DEFAULT_DIMS


def test_a_feature_vector_comes_back_as_a_frame_with_the_same_features():
    from liveindex.models.ebsd.latent import frames_from_features

    f = features(np.random.default_rng(1).integers(1, 255, (3, 60, 60)).astype(np.uint8))
    frames = frames_from_features(f, (30, 30), (60, 60))
    assert frames.shape == (3, 60, 60) and frames.dtype == np.float32
    np.testing.assert_allclose(features(frames), f, rtol=1e-5)
    odd = frames_from_features(features(np.ones((1, 61, 59), np.uint8)), feature_shape((61, 59)), (61, 59))
    assert odd.shape == (1, 61, 59)


def test_a_live_source_gets_the_fixed_basis_without_reading_a_frame():
    class Live(SimulatedSource):
        live = True  # a file being written, a detector stream: no frame before the scan_start

        def read(self, start, count):
            raise AssertionError("a live source's frames are read for the fit")

    start = Live(SimulatedScan((6, 6), seed=1)).scan_start()
    basis = LatentBasis.from_wire(start["latent"])
    assert basis.method == "fixed" and basis.dims == DEFAULT_DIMS and basis.feature_shape == (30, 30)
    np.testing.assert_allclose(basis.components @ basis.components.T, np.eye(DEFAULT_DIMS), atol=1e-5)
    # Grains apart in the fixed basis as in a fitted one: frames of one grain nearer each other.
    scan = SimulatedScan((10, 10), seed=2, grain_size=3, noise="moderate")
    frames = scan.render(0, scan.size)
    e = embed(basis, frames).astype(np.float32)
    grain = scan.grain_of_point
    assert len(np.unique(grain)) > 3
    same = grain[:, None] == grain[None, :]
    d = np.linalg.norm(e[:, None] - e[None], axis=2)
    assert d[same & ~np.eye(len(e), dtype=bool)].mean() < 0.8 * d[~same].mean()
    np.fill_diagonal(d, np.inf)
    assert (grain[d.argmin(axis=1)] == grain).mean() > 0.6  # a frame's nearest: its own grain's (chance: 0.1)
    fixed = SimulatedSource(SimulatedScan((4, 4), seed=1))
    fixed.fit_latent = "fixed"  # --latent fixed on a finished scan: the same basis, no fit
    assert LatentBasis.from_wire(fixed.scan_start()["latent"]).method == "fixed"

"""Simulated spot patterns are indexed back to their truth (phase, orientation modulo the
180-degree turn, beam centre); amorphous frames are left not indexed; the ONNX matcher finds
a template's own pattern at its in-plane angle."""

import numpy as np
import pytest

from liveindex.models.spots.evaluate import make_set, score_answers
from liveindex.models.spots.phases import phases_from_spec
from liveindex.models.spots.results import METHOD_CODES
from liveindex.models.spots.setup import check_setup
from liveindex.models.spots.simulator import NOISE_LEVELS, SpotPatternRenderer
from liveindex.models.spots.templates import in_plane

SETUP = check_setup({"kv": 200.0, "calibration": 0.03, "precession": 1.0}, (128, 128))


@pytest.fixture(scope="module")
def phases():
    return phases_from_spec("ferrite,austenite,cementite")


@pytest.fixture(scope="module")
def indexer(phases, tmp_path_factory):
    from liveindex.models.spots.indexer import SpotIndexer

    return SpotIndexer(SETUP, phases, (128, 128), providers="cpu", threads=1)


def test_the_matcher_finds_a_template_at_its_angle(indexer, phases):
    rng = np.random.default_rng(0)
    renderer = SpotPatternRenderer(phases, SETUP, (128, 128))
    picks = rng.integers(0, len(indexer.template_q), 12)
    alpha = rng.uniform(0, np.pi, 12)
    q = in_plane(indexer.template_q[picks], alpha)
    frames = []
    for i in range(12):
        xy, inten = renderer.spots(int(indexer.template_phase[picks[i]]), q[i:i + 1], 0.06)
        frames.append(renderer.render(xy, inten, np.array([[64.0, 64.0]]), NOISE_LEVELS["clean"], rng)[0])
    scores, templates, angles, _ = indexer.matcher.match(np.array(frames, np.float32), np.tile([64.0, 64.0], (12, 1)))
    found = [picks[i] in templates[i, :3] for i in range(12)]
    assert np.mean(found) >= 0.9
    turn = np.rad2deg(np.abs((angles[:, 0] - alpha + np.pi / 2) % np.pi - np.pi / 2))
    assert np.median(turn) <= 2.0


def test_random_orientations_come_back_as_their_truth(indexer, phases):
    # Measured on 1200 such patterns (benchmarks/spots_side_by_side.py): 98% right phase, 91%
    # within 3 deg mod 180, median 0.4 deg (before the turned starts: 85%); this set of 48: 92%,
    # seeds 12-14 85-98%. A wrong sign anywhere in the geometry gives about 0% within 3 deg.
    ev = make_set(phases, SETUP, 48, noise="moderate", seed=11)
    fields = indexer.index(ev.frames)
    scores = score_answers(fields, ev.quaternions, ev.phase_id, phases)
    assert scores["right_phase"] >= 0.9
    assert scores["within3_mod180"] >= 0.8
    assert scores["median_mod180_deg"] <= 1.0
    np.testing.assert_allclose(fields["center"], ev.centers, atol=0.5)
    assert set(np.unique(fields["method"])) <= {METHOD_CODES["refined"], METHOD_CODES["none"]}


def test_zone_axis_patterns_get_their_phase_and_zone(indexer, phases):
    # Near zone axes the tilt is loose (spot positions barely change; measured 64-77% within
    # 3 deg, the rest 3-6 deg off with as good a fit): the phase and the zone must be right.
    ev = make_set(phases, SETUP, 48, noise="moderate", seed=13, near_zone=1.0)
    fields = indexer.index(ev.frames)
    scores = score_answers(fields, ev.quaternions, ev.phase_id, phases)
    assert scores["right_phase"] >= 0.85
    assert np.nanmedian(scores["errors_mod180"]) <= 3.0
    assert np.nanmean(scores["errors_mod180"] < 8.0) >= 0.85


def test_confidence_above_half_means_right(indexer, phases):
    ev = make_set(phases, SETUP, 64, noise="moderate", seed=12, near_zone=0.5)
    fields = indexer.index(ev.frames)
    right = score_answers(fields, ev.quaternions, ev.phase_id, phases)["right"]
    sure = fields["confidence"] > 0.5
    assert right[sure].all()
    assert ((fields["confidence"] >= 0) & (fields["confidence"] <= 1)).all()


def test_amorphous_frames_are_not_indexed(indexer, phases):
    from liveindex.models.spots.simulator import SimulatedSpotScan

    scan = SimulatedSpotScan((12, 12), phases, SETUP, noise="moderate", seed=4)
    amorphous = np.flatnonzero(scan.amorphous)
    assert len(amorphous) >= 4
    fields = indexer.index(scan.render(int(amorphous[0]), 1))
    assert fields["phase_id"][0] == -1 and fields["method"][0] == METHOD_CODES["none"]
    assert np.isnan(fields["fit"][0])


def test_an_unreadable_page_is_not_an_exception(indexer):
    fields = indexer.index(np.zeros((3, 128, 128), np.uint16))
    assert (fields["phase_id"] == -1).all()


def test_the_python_api_indexes_a_spot_array(phases):
    import liveindex

    ev = make_set(phases, SETUP, 12, noise="moderate", seed=14, near_zone=1.0)
    xmap = liveindex.index(ev.frames.reshape(3, 4, 128, 128), {"calibration": 0.03, "precession": 1.0},
                           phases="ferrite,austenite,cementite", modality="spots", progress=False, threads=1,
                           providers="cpu")
    assert xmap.shape == (3, 4)
    assert (xmap.phase_id == ev.phase_id).mean() >= 0.8
    assert "reliability" in xmap.prop and "ambiguous" in xmap.prop


@pytest.mark.parametrize("precession", [1.0, 0.0])
def test_the_compiled_refinement_score_is_the_numpy_one(indexer, phases, precession):
    from liveindex.models.spots.diffraction import axis_rotations, rotation_matrices
    from liveindex.models.spots.refine import SpotRefiner

    ev = make_set(phases, SETUP, 24, noise="moderate", seed=3)
    polar = indexer.matcher.match(ev.frames.astype(np.float32), ev.centers)[3]
    rng = np.random.default_rng(1)
    for p, record in enumerate(phases):
        rows = np.flatnonzero(ev.phase_id == p)
        if not len(rows):
            continue
        refiner = SpotRefiner(record, {**SETUP, "precession": precession}, indexer.grid, indexer.refiners[p].wavelength)
        # 2 degrees off the truth about random lab axes: some spots leave the sphere, some the image
        turn = axis_rotations(int(rng.integers(3)), np.deg2rad(rng.normal(0, 2.0, len(rows))))
        matrices = rotation_matrices(ev.quaternions[rows].astype(np.float64)) @ turn
        g, f2 = refiner._subset(matrices, refiner._subset(matrices, near_sphere=0.2))
        expected = refiner.score_reference(matrices, g, f2, polar, rows)
        assert np.abs(expected).max() > 0.05  # the truth's neighbours fit: a real comparison
        np.testing.assert_allclose(refiner.score(matrices, g, f2, polar, rows), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("steps", [(2.0, 1.0), (0.5, 0.25, 0.125)])
def test_the_compiled_refinement_is_the_numpy_one(indexer, phases, steps):
    from liveindex.models.spots.diffraction import axis_rotations, rotation_matrices

    ev = make_set(phases, SETUP, 24, noise="moderate", seed=5)
    polar = indexer.matcher.match(ev.frames.astype(np.float32), ev.centers)[3]
    rng = np.random.default_rng(2)
    for p in range(len(phases)):
        rows = np.flatnonzero(ev.phase_id == p)
        if not len(rows):
            continue
        refiner = indexer.refiners[p]
        # 3 degrees off the truth: the search moves, more than once at some steps
        turn = axis_rotations(int(rng.integers(3)), np.deg2rad(rng.normal(0, 3.0, len(rows))))
        start = rotation_matrices(ev.quaternions[rows].astype(np.float64)) @ turn
        expected, expected_scores = refiner.refine_reference(start, polar, rows, steps)
        assert np.abs(expected - start).max() > 0.01  # the search moved: a real comparison
        found, scores = refiner.refine(start, polar, rows, steps)
        np.testing.assert_allclose(found, expected, rtol=0, atol=1e-12)
        np.testing.assert_allclose(scores, expected_scores, rtol=1e-12, atol=1e-12)


def test_zone_axes_are_the_lattice_directions(indexer, phases):
    from liveindex.models.spots.refine import zone_axes

    cubic = zone_axes(indexer.refiners[0].refl, 2)  # ferrite
    assert len(cubic) == 49  # the primitive [uvw] within +-2, one of each +- pair
    for uvw in ([0, 0, 1], [1, 1, 0], [1, 1, 1], [1, 2, 0]):
        u = np.array(uvw, float) / np.linalg.norm(uvw)
        assert np.abs(cubic @ u).max() > 1 - 1e-9
    # cementite (orthorhombic): [100], [010], [001] are its Cartesian axes, [110] is not at 45 deg
    ortho = zone_axes(indexer.refiners[2].refl, 1)
    for axis in np.eye(3):
        assert np.abs(ortho @ axis).max() > 1 - 1e-9
    assert not np.any(np.abs(np.abs(ortho @ np.array([1.0, 1.0, 0.0])) / np.sqrt(2) - 1) < 1e-6)


def test_the_reflections_followed_are_those_near_the_sphere_on_the_image(indexer, phases):
    from liveindex.models.spots.diffraction import axis_rotations, rotation_matrices
    from liveindex.models.spots.refine import NEAR_SPHERE

    refiner = indexer.refiners[2]  # cementite: the most reflections
    rng = np.random.default_rng(4)
    start = rotation_matrices(rng.normal(size=(16, 4)))
    pool = refiner._subset(start, near_sphere=0.2)
    moved = start @ axis_rotations(0, np.deg2rad(rng.uniform(-2, 2, 16)))  # a pool is kept while it moves
    # the choice in numpy, from the definition: |s| < NEAR_SPHERE, radius within the polar grid +-1 px
    lab = np.einsum("gi,nij->ngj", refiner.refl.g, moved)
    r_sphere = 1.0 / refiner.wavelength
    r2 = lab[..., 0] ** 2 + lab[..., 1] ** 2
    s = np.abs(r_sphere - np.sqrt(np.maximum(r_sphere**2 - r2, 0.0)) - lab[..., 2])
    r_px = np.sqrt(r2) / SETUP["calibration"]
    near = (s < NEAR_SPHERE) & (r_px >= indexer.grid.r_min - 1) & (r_px <= indexer.grid.r_max + 1)
    assert near.sum() > 16 * 5
    for g, f2 in (refiner._subset(moved), refiner._subset(moved, pool)):
        for i in range(16):
            np.testing.assert_array_equal(g[i][f2[i] > 0], refiner.refl.g[near[i]])
            np.testing.assert_array_equal(f2[i][f2[i] > 0], refiner.refl.f2[near[i]])


def test_the_refinement_image_is_blurred_as_a_round_gaussian_of_the_detector():
    from liveindex.models.spots.indexer import blur_polar

    r_min, n_r, n_a, sigma = 6.0, 40, 360, 1.0
    polar = np.zeros((1, n_r, n_a), np.float32)
    polar[0, 10, 90] = polar[0, 30, 270] = 1.0  # points at radii 16 and 36 pixels
    out = blur_polar(polar, sigma, r_min)[0].astype(np.float64)
    angle = np.deg2rad(np.arange(n_a))
    for row, col, radius in ((10, 90, 16.0), (30, 270, 36.0)):
        along = out[row, col - 40:col + 41]
        spread = np.sqrt((along * (angle[col - 40:col + 41] - angle[col]) ** 2).sum() / along.sum())
        assert spread * radius == pytest.approx(sigma, rel=0.03)  # sigma_px / r radians along the angle
        across = out[row - 5:row + 6, col]
        assert np.sqrt((across * np.arange(-5, 6) ** 2).sum() / across.sum()) == pytest.approx(sigma, rel=0.03)
    assert out.sum() == pytest.approx(2.0, rel=1e-4)  # counts neither made nor lost


def test_the_refinements_polar_angle_is_atan2_within_2e_6():
    from liveindex.models.spots.refine import _polar_angle, polar_angle

    rng = np.random.default_rng(0)
    y, x = rng.normal(size=(2, 20000)) * rng.lognormal(0, 2, (2, 20000))
    y[:8], x[:8] = [0, 1, 0, -1, 1, -1, 1, -1], [1, 0, -1, 0, 1, 1, -1, -1]  # the axes and diagonals
    truth = np.arctan2(y, x) % (2 * np.pi)
    found = polar_angle(y, x)
    assert ((found >= 0) & (found < 2 * np.pi)).all()
    wrapped = np.abs((found - truth + np.pi) % (2 * np.pi) - np.pi)
    assert wrapped.max() < 2e-6
    compiled = np.array([_polar_angle(a, b) for a, b in zip(y[:500], x[:500])])
    np.testing.assert_array_equal(compiled, found[:500])  # the same arithmetic, bit for bit

"""The orientation code book's geometry: invariance under cubic symmetry, neighbours, disorientation."""

import numpy as np

from liveindex.models.ebsd import codebook as cb
from liveindex.models.ebsd.training_data import random_rotations


def test_t_features_are_invariant_under_the_24_cubic_rotations_only():
    q = random_rotations(np.random.default_rng(0), 50)
    t = cb.t_features(q)
    for s in cb.cubic_operators():
        np.testing.assert_allclose(cb.t_features(cb.quat_multiply(s[None], q)), t, atol=1e-5)
    other = random_rotations(np.random.default_rng(1), 50)
    assert np.linalg.norm(cb.t_features(other) - t, axis=1).min() > 1e-3


def test_disorientation_matches_orix():
    from orix.quaternion import Orientation, symmetry

    a = random_rotations(np.random.default_rng(2), 30)
    b = random_rotations(np.random.default_rng(3), 30)
    expected = Orientation(a, symmetry.Oh).angle_with(Orientation(b, symmetry.Oh), degrees=True)
    np.testing.assert_allclose(cb.disorientation_deg(a, b), expected, atol=1e-2)


def test_neighbours_are_near_and_aligned():
    cells, neighbours, aligned = cb.cells_and_neighbours(10.0)
    assert (neighbours[:, 0] == np.arange(len(cells))).all()
    # Every aligned neighbour is within two cell sizes of its cell, in plain quaternion terms.
    angle = np.degrees(2 * np.arccos(np.clip((aligned * cells[:, None, :]).sum(-1), -1, 1)))
    assert angle.max() < 25.0

"""The vectorised kinematical spots (diffraction.py) are diffsims' SimulationGenerator's."""

import numpy as np
from scipy.spatial import cKDTree

from liveindex.models.crystal import record_from_cif
from liveindex.models.spots.diffraction import lab_vectors, reflections, rotation_matrices, spot_intensities, wavelength

DATA = "tests/data"


def test_rotation_matrices_are_orix_s():
    from orix.quaternion import Rotation

    q = np.random.default_rng(1).standard_normal((5, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    np.testing.assert_allclose(rotation_matrices(q), Rotation(q).to_matrix(), atol=1e-12)


def test_spots_match_diffsims():
    from diffsims.generators.simulation_generator import SimulationGenerator
    from orix.quaternion import Rotation

    record = record_from_cif(f"{DATA}/cementite.cif")
    q = np.random.default_rng(0).standard_normal((2, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    sim = SimulationGenerator(200, precession_angle=1.0).calculate_diffraction2d(
        record.orix_phase(), Rotation(q), reciprocal_radius=1.3, with_direct_beam=False, max_excitation_error=0.02)
    refl = reflections(record, 1.3)
    lab = lab_vectors(rotation_matrices(q), refl.g)
    inten = spot_intensities(lab, refl.f2, wavelength_a=wavelength(200), precession_deg=1.0, excitation_width=0.02)
    for i in range(2):
        theirs = np.asarray(sim.coordinates[i].data)[:, :3]
        their_i = np.asarray(sim.coordinates[i].intensity)
        mine = inten[i] > 0
        dist, j = cKDTree(lab[i][mine]).query(theirs)
        strong = their_i > 1e-6 * their_i.max()  # diffsims keeps extinct reflections at |F|^2 ~ 1e-20
        assert (dist[strong] < 1e-9).all()
        assert mine.sum() == strong.sum()
        ours = inten[i][mine][j[strong]]
        np.testing.assert_allclose(ours / ours.max(), their_i[strong] / their_i[strong].max(), atol=1e-9)


def test_frames_that_reach_no_reflection_get_a_clear_error_not_orix_s():
    """16 px frames at 0.03/A per pixel reach 0.24/A; ferrite's first spot (110) is at 0.49/A."""
    import pytest

    from liveindex.models.errors import InputError

    record = record_from_cif(f"{DATA}/ferrite.cif")
    with pytest.raises(InputError, match=r"reach only 0\.24 1/angstrom .*first reflection \(1 1 0\) lies at 0\.49 "
                                         r"1/angstrom; check --calibration"):
        reflections(record, 0.24)

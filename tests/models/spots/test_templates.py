"""Template libraries: one beam direction per orbit of the phase's proper rotations, cached on
disk by a content hash."""

import numpy as np

from liveindex.models.crystal import proper_operators
from liveindex.models.spots.diffraction import rotation_matrices
from liveindex.models.spots.phases import builtin_record
from liveindex.models.spots.setup import check_setup
from liveindex.models.spots.templates import (
    PolarGrid,
    build_library,
    cache_dir,
    directions_to_matrices,
    library_key,
    sector_directions,
)


def test_the_sector_covers_the_sphere_once():
    v = sector_directions(229, 3.0)
    mats = rotation_matrices(proper_operators(229))
    orbit = np.einsum("sij,nj->nsi", mats, v).reshape(-1, 3)
    probe = np.random.default_rng(0).standard_normal((2000, 3))
    probe /= np.linalg.norm(probe, axis=1, keepdims=True)
    nearest = np.degrees(np.arccos(np.clip((probe @ orbit.T).max(1), -1, 1)))
    assert nearest.max() < 3.0  # every direction is near some symmetric copy of the grid
    assert len(orbit) < 1.2 * 4 * np.pi / np.deg2rad(3.0) ** 2  # and the copies do not overlap much
    np.testing.assert_allclose(directions_to_matrices(v) @ [0.0, 0.0, 1.0], v, atol=1e-12)


def test_libraries_are_cached_by_content(tmp_path, monkeypatch):
    monkeypatch.setenv("LIVEINDEX_CACHE", str(tmp_path))
    setup = check_setup({"kv": 200.0, "calibration": 0.03, "precession": 1.0}, (64, 64))
    grid = PolarGrid.for_shape((64, 64))
    ferrite = builtin_record("ferrite")
    first = build_library(ferrite, setup, (64, 64), grid, 5.0)
    assert len(list(cache_dir().glob("*.npz"))) == 1
    again = build_library(ferrite, setup, (64, 64), grid, 5.0)
    np.testing.assert_array_equal(first.real, again.real)
    norms = np.sqrt((first.real**2 + first.imag**2).sum(axis=(1, 2)))
    np.testing.assert_allclose(norms[norms > 0], 1.0, rtol=1e-5)
    other = dict(setup, precession=0.0)
    assert library_key(ferrite, other, (64, 64), grid, 5.0) != library_key(ferrite, setup, (64, 64), grid, 5.0)
    assert library_key(builtin_record("austenite"), setup, (64, 64), grid, 5.0) != \
        library_key(ferrite, setup, (64, 64), grid, 5.0)

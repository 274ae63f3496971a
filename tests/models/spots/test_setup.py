"""The spot setup is checked with a one-line error that names the fix."""

import pytest

from liveindex.models.errors import InputError
from liveindex.models.spots.setup import check_setup


def test_defaults_fill_in():
    setup = check_setup({"calibration": 0.02}, (128, 128))
    assert setup == {"kv": 200.0, "calibration": 0.02, "precession": 0.0, "scan_rotation": 0.0, "center": None,
                     "ellipticity": [1.0, 0.0]}
    assert check_setup(setup, (128, 128)) == setup


@pytest.mark.parametrize("setup, words", [
    ({}, "--calibration"),
    ({"calibration": 2.0}, "1/angstrom per pixel"),
    ({"calibration": 0.02, "kv": -3}, "--kv"),
    ({"calibration": 0.02, "center": [500, 3]}, "outside"),
    ({"calibration": 0.02, "center": [5]}, "two numbers"),
    ({"calibration": 0.02, "precession": 30}, "--precession"),
    ({"calibration": 0.02, "ellipticity": [3, 0]}, "ratio"),
    ({"calibration": 0.02, "pc": [0.5, 0.5, 0.5]}, "unknown keys"),
])
def test_bad_setups_are_refused_with_the_fix(setup, words):
    with pytest.raises(InputError, match=words):
        check_setup(setup, (128, 128))


def test_a_detector_stream_needs_the_calibration_from_the_command_line():
    import argparse

    from liveindex.models import modality as modalities

    spots = modalities.load("spots")
    parser = argparse.ArgumentParser()
    spots.add_arguments(parser, role="publish")
    with pytest.raises(InputError, match="give --calibration"):
        spots.detector_setup(parser.parse_args([]), (128, 128))
    setup, phases, step = spots.detector_setup(parser.parse_args(["--calibration", "0.03", "--precession", "1",
                                                                  "--phases", "ferrite"]), (128, 128))
    assert setup["calibration"] == 0.03 and setup["precession"] == 1.0 and [p.name for p in phases] == ["ferrite"]

"""4D-STEM files are read back as the frames written: .npy, .hspy, .zspy (HyperSpy/pyxem) and
NanoMegas .blo (written by rosettasciio), with the file's reciprocal-space calibration."""

import argparse
import warnings

import numpy as np
import pytest

from liveindex.models import modality as modalities
from liveindex.models.errors import InputError

CAL = 0.025


@pytest.fixture(scope="module")
def frames():
    rng = np.random.default_rng(3)
    return rng.integers(0, 250, (3, 4, 32, 32)).astype(np.uint8)


def _source(path, calibration=None):
    spots = modalities.load("spots")
    parser = argparse.ArgumentParser()
    spots.add_arguments(parser, role="index")
    args = parser.parse_args([] if calibration is None else ["--calibration", str(calibration)])
    args.file = str(path)
    return spots.open_source(args, role="index")


def _signal(frames):
    import hyperspy.api as hs

    s = hs.signals.Signal2D(frames)
    for axis in s.axes_manager.signal_axes:
        axis.scale, axis.units = CAL, "1/A"
    return s


def test_npy_needs_a_calibration(frames, tmp_path):
    path = tmp_path / "scan.npy"
    np.save(path, frames)
    with pytest.raises(InputError, match="--calibration"):
        _source(path)
    source = _source(path, calibration=0.02)
    assert source.nav_shape == (3, 4) and source.setup["calibration"] == 0.02
    np.testing.assert_array_equal(source.read(0, 12), frames.reshape(12, 32, 32))


@pytest.mark.parametrize("suffix, given", [(".hspy", None), (".zspy", None), (".blo", CAL)])
def test_rosettasciio_formats_read_back(frames, tmp_path, suffix, given):
    # .blo keeps the detector's scale in cm (camera units), not 1/A: its calibration is given.
    path = tmp_path / f"scan{suffix}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _signal(frames).save(path)
    source = _source(path, calibration=given)
    assert source.nav_shape == (3, 4) and source.pattern_shape == (32, 32)
    assert source.setup["calibration"] == pytest.approx(CAL, rel=1e-6)
    np.testing.assert_array_equal(source.read(0, 12), frames.reshape(12, 32, 32))
    np.testing.assert_array_equal(source.read(5, 3), frames.reshape(12, 32, 32)[5:8])


def test_a_foreign_file_is_refused_with_the_formats(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(InputError, match=".hspy"):
        _source(path, calibration=0.02)

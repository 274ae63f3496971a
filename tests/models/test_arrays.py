"""Frames of any real dtype are served a page at a time as a dtype the wire carries."""

import numpy as np
import pytest

from liveindex.models import modality as modalities
from liveindex.models.arrays import ArraySource
from liveindex.models.errors import InputError

SETUP = {"kv": 200.0, "calibration": 0.03, "precession": 1.0}


@pytest.mark.parametrize("dtype, wire", [("float64", "float32"), ("int16", "float32"), ("int64", "float32"),
                                         ("float16", "float32"), ("uint16", "uint16"), ("float32", "float32")])
def test_a_memory_mapped_scan_is_converted_page_by_page_not_copied_whole(tmp_path, dtype, wire):
    frames = (np.arange(6 * 32 * 32) % 251 - 100).reshape(2, 3, 32, 32)
    frames = np.abs(frames) if dtype.startswith("uint") else frames
    np.save(tmp_path / "scan.npy", frames.astype(dtype))
    mapped = np.load(tmp_path / "scan.npy", mmap_mode="r")
    source = ArraySource(mapped, modality=modalities.load("spots"), setup=SETUP, phases=[])
    assert source.dtype == wire and source.nav_shape == (2, 3)
    assert isinstance(source.patterns, np.memmap)  # the file's own pages, no copy of the whole scan
    page = source.read(2, 3)
    assert page.dtype == np.dtype(wire) and page.flags.c_contiguous
    np.testing.assert_array_equal(page, frames.reshape(6, 32, 32)[2:5].astype(wire))


def test_patterns_that_are_not_real_numbers_are_refused():
    with pytest.raises(InputError, match="dtype bool; patterns must be real numbers"):
        ArraySource(np.zeros((2, 32, 32), bool), modality=modalities.load("spots"), setup=SETUP, phases=[])

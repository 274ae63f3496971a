"""A vendor file's static background travels to workers in the scan_start setup."""

import argparse
import json

import numpy as np
import pytest

from liveindex.models import modality as modalities
from liveindex.models.errors import InputError
from liveindex.stream.protocol import ScanStart, decode, encode, plain


@pytest.fixture(scope="module")
def nickel_file(tmp_path_factory):
    import kikuchipy as kp

    signal = kp.data.nickel_ebsd_small()
    path = tmp_path_factory.mktemp("bg") / "ni.h5"
    signal.save(path)  # kikuchipy h5ebsd: patterns, PC, static background
    return path, np.asarray(signal.static_background, np.float32)


def _publish_source(path):
    ebsd = modalities.load("ebsd")
    parser = argparse.ArgumentParser()
    ebsd.add_arguments(parser, role="publish")
    args = parser.parse_args(["--phases", "ni"])
    vars(args).update(file=str(path))
    return ebsd, ebsd.open_source(args, role="publish")


def test_the_files_background_reaches_the_workers_indexer(nickel_file):
    path, background = nickel_file
    ebsd, source = _publish_source(path)
    header = {"scan": "bg", "run": "r", **source.scan_start()}
    start = ScanStart.from_header(decode(encode("scan_start", header)).header)
    setup = ebsd.check_setup(start.setup, start.pattern_shape)  # what a worker does on receipt
    page_indexer = ebsd.prepare({**header, "setup": setup}, options={"min_confidence": 0.0})
    indexer = page_indexer.indexer
    # At each size the frames are preprocessed at: the working size and the fine refinement's.
    for prep in (indexer.preprocess, indexer.fine_preprocess):
        expected = prep._to_working(background[None])[0]
        np.testing.assert_allclose(indexer._background[prep.working_shape], expected)
    assert ("static background", "the file's (60x60)") in ebsd.describe_setup(setup)
    json.dumps(plain(setup))  # the live page and the summary take it as JSON


def test_a_malformed_background_is_refused_in_one_line(nickel_file):
    path, _ = nickel_file
    ebsd, source = _publish_source(path)
    setup = dict(source.setup, static_background={"shape": [60, 60], "float32": b"\0" * 12})
    with pytest.raises(InputError, match="static background is malformed"):
        ebsd.check_setup(setup, source.pattern_shape)

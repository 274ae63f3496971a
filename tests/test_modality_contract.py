"""Every modality keeps the contract (models/modality.py): what it declares is valid and
travels in protocol v2, its simulator's scan_start decodes, and a page it indexes has
exactly the declared fields, with their dtypes and shapes, a row per frame."""

import argparse

import numpy as np
import pytest

from liveindex.models import modality as modalities
from liveindex.models.modality import NOT_INDEXED, Field, Method, ScanSource
from liveindex.stream.protocol import ScanStart, decode, encode
from liveindex.stream.worker import conform

MODALITIES = sorted(modalities.known())


def _demo_source(modality, scan="6x4"):
    parser = argparse.ArgumentParser()
    modality.add_arguments(parser, role="demo")
    args = parser.parse_args([])
    vars(args).update(scan=scan, file=None)
    return modality.open_source(args, role="demo")


@pytest.mark.parametrize("name", MODALITIES)
def test_declarations_are_valid_and_travel(name):
    modality = modalities.load(name)
    assert modality.name == name and modalities.load(name) is modality  # one instance a process
    labels = [m.label for m in modality.methods]
    assert NOT_INDEXED in labels and len(set(labels)) == len(labels)
    assert [Field.from_wire(f.to_wire()) for f in modality.fields] == list(modality.fields)
    assert [Method.from_wire(m.to_wire()) for m in modality.methods] == list(modality.methods)
    for role in ("index", "worker", "publish", "demo"):
        modality.add_arguments(argparse.ArgumentParser(), role=role)


@pytest.mark.parametrize("name", MODALITIES)
def test_a_simulated_page_is_indexed_into_exactly_the_declared_fields(name):
    modality = modalities.load(name)
    source = _demo_source(modality)
    assert isinstance(source, ScanSource) and source.modality is modality
    message = decode(encode("scan_start", {"scan": "contract", **source.scan_start()}, source.truth_arrays()))
    start = ScanStart.from_header(message.header)
    assert start.modality == name and start.fields == modality.fields and start.methods == modality.methods
    assert modality.check_setup(start.setup, start.pattern_shape) == start.setup  # normalised already
    indexer = modality.prepare(message.header, threads=1)
    assert isinstance(indexer.model_name, str) and indexer.model_name
    frames = source.read(0, 8)
    assert frames.shape == (8, *start.pattern_shape) and frames.dtype.name == start.dtype
    fields = indexer.index(frames)
    assert set(fields) == {f.name for f in modality.fields}
    for f in modality.fields:
        assert fields[f.name].dtype.name == f.dtype and fields[f.name].shape == (8, *f.shape), f.name
    conform(fields, start, 8)
    if start.has_orientations:
        q = fields["quaternion"][fields["phase_id"] >= 0]
        np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1, atol=1e-3)
        assert (fields["phase_id"] < len(start.phases)).all()


@pytest.mark.parametrize("name", MODALITIES)
def test_a_bad_setup_is_refused_with_a_named_error(name):
    from liveindex.models.errors import InputError

    modality = modalities.load(name)
    with pytest.raises(InputError):
        modality.check_setup({"pc": [5, 5, 5], "gain": -1}, (60, 60))


@pytest.mark.parametrize("name", MODALITIES)
def test_export_header_describes_the_setup_for_the_vendor_files(name):
    from liveindex.models.modality import ExportHeader

    modality = modalities.load(name)
    source = _demo_source(modality)
    header = modality.export_header(source.setup, source.pattern_shape)
    assert isinstance(header, ExportHeader)
    summary = header.summary()
    import json

    json.dumps(summary)  # the scan's summary keeps it
    if header.pc_tsl is not None:
        assert len(header.pc_tsl) == 3 and all(np.isfinite(header.pc_tsl))

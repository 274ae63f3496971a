"""Orientation maps with each phase's own symmetry: a hexagonal (D6h) phase's orientations
round-trip through the sink, the HDF5 and the .ang; IPF colours and errors use its symmetry."""

import threading

import numpy as np
import pytest
import zmq
from orix import io as orix_io
from orix.quaternion import Orientation, symmetry

from liveindex.models.crystal import (
    PhaseRecord,
    disorientation_degrees,
    laue_of,
    point_group_of,
    proper_operators,
    quaternion_multiply,
)
from liveindex.stream.protocol import decode, encode
from liveindex.stream.sink import Sink

from ..conftest import scan_start_message
from ..fake_modality import PHASES

NAV = (4, 6)


def _random_unit(n, seed):
    q = np.random.default_rng(seed).standard_normal((n, 4))
    return (q * np.sign(q[:, :1]) / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def test_every_space_group_has_its_point_group_and_laue_class():
    point_groups = {point_group_of(sg).name for sg in range(1, 231)}
    laue = {laue_of(sg).name for sg in range(1, 231)}
    assert len(point_groups) == 32 and len(laue) == 11
    assert point_group_of(194).name == "6/mmm" and point_group_of(225).name == "m-3m"


def test_disorientation_matches_orix_for_hexagonal_and_cubic():
    q, t = _random_unit(50, 1), _random_unit(50, 2)
    for sg, pg in ((194, symmetry.D6h), (225, symmetry.Oh), (139, symmetry.D4h)):
        ours = disorientation_degrees(q, t, proper_operators(sg))
        theirs = Orientation(q, pg).angle_with(Orientation(t, pg), degrees=True)
        np.testing.assert_allclose(ours, theirs, atol=1e-3)


def test_a_hexagonal_phase_round_trips_through_the_sink_h5_and_ang_with_its_own_symmetry(tmp_path):
    hexagonal = PHASES[1]
    assert hexagonal.point_group.name == "6/mmm" and hexagonal.laue.name == "6/mmm"
    n = NAV[0] * NAV[1]
    truth = decode(scan_start_message("hex", NAV, truth=True)).arrays
    q_true, phase_true = truth["truth_quaternion"], truth["truth_phase_id"]
    # Each answer is its truth times a symmetry operation of its own phase: 60 deg about c for
    # the hexagonal points (not a cubic symmetry), 90 deg about a cube axis for the cubic ones.
    sixfold = np.float32([np.cos(np.pi / 6), 0, 0, np.sin(np.pi / 6)])
    fourfold = np.float32([np.cos(np.pi / 4), np.sin(np.pi / 4), 0, 0])
    # (orix's convention: the crystal symmetry equivalents of q are s * q.)
    answer = np.where((phase_true == 1)[:, None], quaternion_multiply(sixfold, q_true),
                      quaternion_multiply(fourfold, q_true)).astype(np.float32)
    assert (phase_true == 1).sum() > 5 and (phase_true == 0).sum() > 5

    sink = Sink(out_dir=tmp_path, http_port=0, max_scans=1, finish_timeout=1.0)
    thread = threading.Thread(target=sink.run, daemon=True)
    thread.start()
    push = zmq.Context.instance().socket(zmq.DEALER)
    push.connect(sink.endpoint)
    try:
        push.send_multipart(scan_start_message("hex", NAV, truth=True))
        push.send_multipart(encode("results", {"scan": "hex", "first": 0, "count": n, "worker": "w", "timings": {}},
                                   {"indices": np.arange(n, dtype=np.int64), "phase_id": phase_true,
                                    "quaternion": answer, "confidence": np.full(n, 0.9, np.float32),
                                    "method": np.zeros(n, np.uint8), "iq": np.arange(n, dtype=np.float32),
                                    "fit": np.full(n, 0.2, np.float32),
                                    "embedding": np.ones((n, 3), np.float32)}))
        thread.join(30)
        assert not thread.is_alive()
        summary = sink.finished[0]
        # Scored with each point's own symmetry: every answer is right.
        assert summary["median_error_deg"] < 0.1 and summary["within_3deg"] == 1.0 and summary["wrong_phase"] == 0
        details = sink.view.point_details(int(np.flatnonzero(phase_true == 1)[0]))
        assert details["phase"] == "ti-hcp" and details["error_deg"] < 0.1
    finally:
        sink.close()
        push.close(linger=0)

    xmap = orix_io.load(tmp_path / "hex.h5")
    assert [xmap.phases[i].point_group.name for i in (0, 1)] == ["m-3m", "6/mmm"]
    same_sign = np.where(answer[:, :1] < 0, -answer, answer)  # orix keeps w >= 0 (q and -q are one rotation)
    np.testing.assert_allclose(xmap.rotations.data, same_sign, atol=1e-6)
    np.testing.assert_array_equal(xmap.phase_id, phase_true)
    np.testing.assert_allclose(xmap.prop["iq"], np.arange(n))
    ang = orix_io.load(tmp_path / "hex.ang")
    hex_id = next(i for i, p in ang.phases if p.point_group.laue.name == "6/mmm")  # .ang keeps the proper group, 622
    on_hex = ang.phase_id == hex_id
    assert on_hex.sum() == (phase_true == 1).sum()
    # The .ang keeps the hexagonal orientations up to the hexagonal symmetry.
    got = Orientation(ang.rotations.data[on_hex], symmetry.D6h)
    want = Orientation(answer[phase_true == 1], symmetry.D6h)
    assert np.max(got.angle_with(want, degrees=True)) < 0.1
    maps = np.load(tmp_path / "hex_maps.npz")
    assert maps["embedding"].shape == (n, 3) and maps["quaternion"].shape == (n, 4)
    for name in ("ipf", "phase", "confidence", "method", "iq", "fit", "kam"):
        assert (tmp_path / f"hex_{name}.png").stat().st_size > 100


def test_ipf_colours_follow_each_phases_laue_class():
    from liveindex.stream.orientation_map import ipf_colours

    q = _random_unit(200, 5)
    cubic, hexagonal = PHASES
    as_cubic = ipf_colours(q, np.zeros(200, np.int16), [cubic, hexagonal])
    as_hex = ipf_colours(q, np.ones(200, np.int16), [cubic, hexagonal])
    assert (np.abs(as_cubic.astype(int) - as_hex).sum(axis=1) > 30).mean() > 0.5
    # Symmetry-equivalent orientations get the same colour in their own class.
    sixfold = np.float32([np.cos(np.pi / 6), 0, 0, np.sin(np.pi / 6)])
    again = ipf_colours(quaternion_multiply(sixfold, q).astype(np.float32), np.ones(200, np.int16), [cubic, hexagonal])
    assert np.abs(again.astype(int) - as_hex).max() <= 2


@pytest.mark.parametrize("record", [
    {"name": "x", "space_group": 0, "lattice": [1, 1, 1, 90, 90, 90]},
    {"name": "x", "space_group": 1, "lattice": [1, -1, 1, 90, 90, 90]},
    {"name": "x", "space_group": 1, "lattice": [1, 1, 1, 90, 90, 190]},
    {"name": "x", "space_group": 1, "lattice": [1, 1, 1, 90, 90, 90], "atoms": [["Fe", 0, 0]]},
    {"name": "", "space_group": 1, "lattice": [1, 1, 1, 90, 90, 90]},
])
def test_a_malformed_phase_record_is_refused_with_a_named_error(record):
    from liveindex.models.errors import InputError

    with pytest.raises(InputError):
        PhaseRecord.from_wire(record)

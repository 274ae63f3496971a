import msgpack
import numpy as np
import pytest

from liveindex.models.errors import LiveIndexError, ProtocolError
from liveindex.stream.protocol import ScanStart, check_frames, check_results, decode, encode
from liveindex.stream.transport import Receiver

from ..conftest import results_message, scan_start_message
from ..fake_modality import FakeModality

SCAN_START = {"scan": "s1", "modality": "fake", "nav_shape": [2, 3], "step": [1.0, 1.0], "pattern_shape": [4, 5],
              "dtype": "uint16", "setup": {"gain": 1.0},
              "phases": [{"name": "ni", "space_group": 225, "lattice": [3.52, 3.52, 3.52, 90, 90, 90]}],
              "fields": [f.to_wire() for f in FakeModality.fields], "methods": [m.to_wire() for m in FakeModality.methods],
              "metadata": {"who": "test"}}


def _bytes(frames):
    return [bytes(f) for f in frames]


def test_frames_round_trip_keeps_values_dtype_and_shape():
    patterns = np.arange(3 * 4 * 5, dtype=np.uint16).reshape(3, 4, 5)
    msg = decode(_bytes(encode("frames", {"scan": "s1", "first": 2, "count": 3, "t_sent": 1.5}, {"patterns": patterns})))
    assert msg.kind == "frames" and msg.header["first"] == 2
    np.testing.assert_array_equal(msg.arrays["patterns"], patterns)
    assert msg.arrays["patterns"].dtype == np.uint16


def test_results_round_trip_and_match_the_declared_fields():
    msg = decode(_bytes(results_message(range(4), "s1")))
    for name in ("indices", "phase_id", "quaternion", "confidence", "method", "iq", "fit", "embedding"):
        assert msg.arrays[name].shape[0] == 4
    check_results(msg, ScanStart.from_header(decode(scan_start_message("s1", (2, 3))).header))


def test_uint32_frames_from_counting_detectors_travel():
    patterns = np.full((1, 4, 5), 2**31 + 7, np.uint32)
    msg = decode(_bytes(encode("frames", {"scan": "s1", "first": 0, "count": 1, "t_sent": 0.0}, {"patterns": patterns})))
    assert msg.arrays["patterns"].dtype == np.uint32 and msg.arrays["patterns"][0, 0, 0] == 2**31 + 7


def test_scan_start_and_end_round_trip():
    msg = decode(_bytes(encode("scan_start", SCAN_START)))
    assert msg.header["metadata"] == {"who": "test"} and msg.header["nav_shape"] == [2, 3]
    end = decode(_bytes(encode("scan_end", {"scan": "s1", "frames_sent": 6, "status": "success"})))
    assert end.header["frames_sent"] == 6


def _header(kind="frames", **fields):
    base = {"v": 2, "kind": kind, "scan": "s", "first": 0, "count": 1, "t_sent": 0.0,
            "buffers": [["patterns", "uint8", [1, 2, 2]]]}
    base.update(fields)
    return msgpack.packb(base)


@pytest.mark.parametrize(
    "frames, words",
    [
        ([], "empty message"),
        ([b"\xc1\xff"], "not valid msgpack"),
        ([msgpack.packb([1, 2])], "must be a msgpack map"),
        ([_header(v=99), bytes(4)], "unsupported schema version"),
        ([_header(kind="nonsense"), bytes(4)], "unknown message kind"),
        ([_header(kind=["frames"]), bytes(4)], "unknown message kind"),
        ([_header(first="zero"), bytes(4)], "'first' is missing or not int"),
        ([_header(), bytes(3)], "has 3 bytes, expected 4"),
        ([_header()], "lists 1 buffers but 0"),
        ([_header(buffers=[["patterns", "object", [1, 2, 2]]]), bytes(4)], "not one of"),
        ([_header(buffers=[["patterns", ["uint8"], [1, 2, 2]]]), bytes(4)], "not one of"),  # found by test_fuzz
        ([_header(buffers=[[["patterns"], "uint8", [1, 2, 2]]]), bytes(4)], "its name must be a string"),
        ([_header(count=2), bytes(4)], "expected (count=2"),
        ([_header(buffers=[["patterns", "int32", [1, 1, 1]]]), bytes(4)], "must be uint8 or uint16 or uint32 or float32"),
        ([_header(first=-1), bytes(4)], "negative first index"),
        ([_header(v=1), bytes(4)], "peer speaks protocol v1"),
        ([_header(scan="../escaped"), bytes(4)], "never a path"),
        ([_header(scan="/etc/passwd"), bytes(4)], "never a path"),
        ([_header(buffers=[["patterns", "uint8", [2**32, 2**32]]]), bytes(4)], "expected 18446744073709551616"),
    ],
)
def test_malformed_messages_raise_a_named_error(frames, words):
    with pytest.raises(ProtocolError) as info:
        decode(frames)
    assert words in str(info.value)
    assert isinstance(info.value, LiveIndexError) and isinstance(info.value, ValueError)


def test_error_carries_the_offending_header():
    with pytest.raises(ProtocolError) as info:
        decode([_header(), bytes(3)])
    assert info.value.header["kind"] == "frames" and "header:" in str(info.value)


def test_results_are_checked_against_the_declared_fields():
    start = ScanStart.from_header(decode(scan_start_message("s1", (2, 3))).header)
    with pytest.raises(ProtocolError, match="unknown method code"):
        check_results(decode(results_message([0], "s1", method=42)), start)
    with pytest.raises(ProtocolError, match="phase ids run outside"):
        check_results(decode(results_message([0], "s1", phase_id=2)), start)
    page = decode(results_message([0, 1], "s1"))
    missing = decode(encode("results", {k: v for k, v in page.header.items() if k not in ("v", "kind", "buffers")},
                            {k: v for k, v in page.arrays.items() if k != "embedding"}))
    with pytest.raises(ProtocolError, match="lack the declared field 'embedding'"):
        check_results(missing, start)
    arrays = {**page.arrays, "iq": page.arrays["iq"].astype(np.float64)}
    wrong = decode(encode("results", {k: v for k, v in page.header.items() if k not in ("v", "kind", "buffers")}, arrays))
    with pytest.raises(ProtocolError, match="declared float32"):
        check_results(wrong, start)


def test_frames_are_checked_against_their_scan():
    good = np.zeros((2, 4, 5), np.uint16)
    msg = decode(_bytes(encode("frames", {"scan": "s1", "first": 0, "count": 2, "t_sent": 0.0}, {"patterns": good})))
    start = ScanStart.from_header(decode(encode("scan_start", SCAN_START)).header)
    check_frames(msg, start)
    wrong_shape = decode(_bytes(encode("frames", {"scan": "s1", "first": 0, "count": 2, "t_sent": 0.0},
                                       {"patterns": np.zeros((2, 5, 4), np.uint16)})))
    with pytest.raises(ProtocolError, match="declared"):
        check_frames(wrong_shape, start)
    wrong_dtype = decode(_bytes(encode("frames", {"scan": "s1", "first": 0, "count": 2, "t_sent": 0.0},
                                       {"patterns": np.zeros((2, 4, 5), np.uint8)})))
    with pytest.raises(ProtocolError, match="declared uint16"):
        check_frames(wrong_dtype, start)
    past_end = decode(_bytes(encode("frames", {"scan": "s1", "first": 5, "count": 2, "t_sent": 0.0}, {"patterns": good})))
    with pytest.raises(ProtocolError, match="past the scan's 6 points"):
        check_frames(past_end, start)


@pytest.mark.parametrize("change, words", [
    ({"phases": []}, "at least one phase"),
    ({"phases": ["ni"]}, "must be a record"),
    ({"phases": [{"name": "x", "space_group": 231, "lattice": [1, 1, 1, 90, 90, 90]}]}, "1..230"),
    ({"phases": [{"name": "../x", "space_group": 1, "lattice": [1, 1, 1, 90, 90, 90]}]}, "phase name"),
    ({"nav_shape": [0, 3]}, "nav_shape"),
    ({"nav_shape": [10**6, 10**6]}, "split the scan"),
    ({"fields": [["indices", "int64", [], 0]]}, "not 'indices'"),
    ({"fields": [["q", "float32", [10**6], 0]]}, "at most"),
    ({"fields": [["quaternion", "float32", [3], 0]]}, "shape (4,)"),
    ({"methods": [["nn", [1, 2, 3], ""]]}, "include 'none'"),
    ({"modality": "../../etc"}, "plain name"),
    ({"dtype": "int8"}, "dtype must be one of"),
])
def test_scan_start_declarations_are_validated(change, words):
    with pytest.raises(ProtocolError) as info:
        encode("scan_start", {**SCAN_START, **change})
    assert words in str(info.value)


def test_a_v1_peer_is_told_to_upgrade():
    v1 = msgpack.packb({"v": 1, "kind": "scan_start", "scan": "s", "nav_shape": [1, 1], "step": [1, 1],
                        "pattern_shape": [4, 4], "dtype": "uint8", "detector": {}, "phases": ["ni"], "metadata": {},
                        "buffers": []})
    with pytest.raises(ProtocolError, match="upgrade every part"):
        decode([v1])


def test_receiver_counts_and_drops_bad_messages_and_logs_each_problem_once(caplog):
    receiver = Receiver(role="test")
    for _ in range(3):
        assert receiver.decode([b"\xc1"]) is None
    assert receiver.decode(encode("scan_end", {"scan": "s", "frames_sent": 0, "status": "abort"})) is not None
    assert receiver.bad_total == 3
    assert sum("dropped a bad message" in r.message for r in caplog.records) == 1

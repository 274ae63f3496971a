import msgpack
import numpy as np
import pytest

from liveindex.models.errors import LiveIndexError, ProtocolError
from liveindex.stream.protocol import METHOD_CODE, check_frames, decode, encode
from liveindex.stream.transport import Receiver

SCAN_START = {"scan": "s1", "nav_shape": [2, 3], "step": [1.0, 1.0], "pattern_shape": [4, 5], "dtype": "uint16",
              "detector": {"pc": [0.4, 0.2, 0.5]}, "phases": ["ni"], "metadata": {"who": "test"}}


def _bytes(frames):
    return [bytes(f) for f in frames]


def test_frames_round_trip_keeps_values_dtype_and_shape():
    patterns = np.arange(3 * 4 * 5, dtype=np.uint16).reshape(3, 4, 5)
    msg = decode(_bytes(encode("frames", {"scan": "s1", "first": 2, "count": 3, "t_sent": 1.5}, {"patterns": patterns})))
    assert msg.kind == "frames" and msg.header["first"] == 2
    np.testing.assert_array_equal(msg.arrays["patterns"], patterns)
    assert msg.arrays["patterns"].dtype == np.uint16


def test_results_round_trip():
    n = 4
    arrays = {"indices": np.arange(n, dtype=np.int64), "phase_id": np.zeros(n, np.int16),
              "quaternion": np.tile(np.float32([1, 0, 0, 0]), (n, 1)), "confidence": np.full(n, 0.5, np.float32),
              "method": np.full(n, METHOD_CODE["tm"], np.uint8)}
    msg = decode(_bytes(encode("results", {"scan": "s", "first": 0, "count": n, "worker": "w", "timings": {"t_sent": 1.0}}, arrays)))
    for name, value in arrays.items():
        np.testing.assert_array_equal(msg.arrays[name], value)


def test_scan_start_and_end_round_trip():
    msg = decode(_bytes(encode("scan_start", SCAN_START)))
    assert msg.header["metadata"] == {"who": "test"} and msg.header["nav_shape"] == [2, 3]
    end = decode(_bytes(encode("scan_end", {"scan": "s1", "frames_sent": 6, "status": "success"})))
    assert end.header["frames_sent"] == 6


def _header(kind="frames", **fields):
    base = {"v": 1, "kind": kind, "scan": "s", "first": 0, "count": 1, "t_sent": 0.0,
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
        ([_header(first="zero"), bytes(4)], "'first' is missing or not int"),
        ([_header(), bytes(3)], "has 3 bytes, expected 4"),
        ([_header()], "lists 1 buffers but 0"),
        ([_header(buffers=[["patterns", "object", [1, 2, 2]]]), bytes(4)], "not one of"),
        ([_header(count=2), bytes(4)], "expected (count=2"),
        ([_header(buffers=[["patterns", "int32", [1, 1, 1]]]), bytes(4)], "must be uint8 or uint16 or float32"),
        ([_header(first=-1), bytes(4)], "negative first index"),
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


def test_unknown_method_code_is_rejected():
    arrays = {"indices": np.zeros(1, np.int64), "phase_id": np.zeros(1, np.int16),
              "quaternion": np.zeros((1, 4), np.float32), "confidence": np.zeros(1, np.float32),
              "method": np.full(1, 42, np.uint8)}
    with pytest.raises(ProtocolError, match="unknown method code"):
        decode(_bytes(encode("results", {"scan": "s", "first": 0, "count": 1, "worker": "w", "timings": {}}, arrays)))


def test_frames_are_checked_against_their_scan():
    good = np.zeros((2, 4, 5), np.uint16)
    msg = decode(_bytes(encode("frames", {"scan": "s1", "first": 0, "count": 2, "t_sent": 0.0}, {"patterns": good})))
    check_frames(msg, SCAN_START)
    wrong_shape = decode(_bytes(encode("frames", {"scan": "s1", "first": 0, "count": 2, "t_sent": 0.0},
                                       {"patterns": np.zeros((2, 5, 4), np.uint16)})))
    with pytest.raises(ProtocolError, match="declared"):
        check_frames(wrong_shape, SCAN_START)
    wrong_dtype = decode(_bytes(encode("frames", {"scan": "s1", "first": 0, "count": 2, "t_sent": 0.0},
                                       {"patterns": np.zeros((2, 4, 5), np.uint8)})))
    with pytest.raises(ProtocolError, match="declared uint16"):
        check_frames(wrong_dtype, SCAN_START)
    past_end = decode(_bytes(encode("frames", {"scan": "s1", "first": 5, "count": 2, "t_sent": 0.0}, {"patterns": good})))
    with pytest.raises(ProtocolError, match="past the scan's 6 points"):
        check_frames(past_end, SCAN_START)


def test_scan_start_validation():
    with pytest.raises(ProtocolError, match="at least one expected phase"):
        encode("scan_start", {**SCAN_START, "phases": []})
    with pytest.raises(ProtocolError, match="nav_shape"):
        encode("scan_start", {**SCAN_START, "nav_shape": [0, 3]})


def test_receiver_counts_and_drops_bad_messages_and_logs_each_problem_once(caplog):
    receiver = Receiver(role="test")
    for _ in range(3):
        assert receiver.decode([b"\xc1"]) is None
    assert receiver.decode(encode("scan_end", {"scan": "s", "frames_sent": 0, "status": "abort"})) is not None
    assert receiver.bad_total == 3
    assert sum("dropped a bad message" in r.message for r in caplog.records) == 1

"""Fuzzing the protocol decoder, the sink and the file readers (bounded in count and time).

Whatever arrives, the only outcomes allowed are a valid message or a ProtocolError
(decoder), a counted rejection with the loop still running (sink), and a valid source or
an InputError (file readers).
"""

import threading

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from liveindex.models.ebsd.files import load_file
from liveindex.models.errors import InputError, LiveIndexError, ProtocolError
from liveindex.stream.protocol import HEADER_FIELDS, decode, encode
from liveindex.stream.sink import Sink

from ..conftest import results_message, scan_start_message

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NAV = (4, 5)


def _start(scan="s"):
    return scan_start_message(scan, NAV)


def _results(indices, scan="s", **options):
    return results_message(indices, scan, **options)


def _valid_messages():
    patterns = np.zeros((2, 16, 16), np.uint16)
    return [
        _start(),
        _results([0, 1, 2]),
        encode("frames", {"scan": "s", "first": 0, "count": 2, "t_sent": 1.0}, {"patterns": patterns}),
        encode("scan_end", {"scan": "s", "frames_sent": 20, "status": "success"}),
        encode("credit", {"worker": "w", "pages": 1, "done": [["s", 0]]}),
        encode("heartbeat", {"sender": "dispatcher", "workers": []}),
    ]


def _bytes(frames):
    return [bytes(f) for f in frames]


def _decode_or_protocol_error(frames):
    try:
        decode(frames)
    except ProtocolError:
        pass


@FUZZ
@given(st.lists(st.binary(max_size=200), max_size=6))
def test_decoder_survives_arbitrary_frames(frames):
    _decode_or_protocol_error(frames)


@FUZZ
@given(st.sampled_from(range(6)), st.integers(0, 10_000), st.binary(min_size=1, max_size=8), st.booleans(),
       st.integers(0, 7))
def test_decoder_survives_damaged_valid_messages(which, position, patch, truncate, frame_no):
    frames = _bytes(_valid_messages()[which])
    frame_no %= len(frames)
    data = bytearray(frames[frame_no])
    pos = position % max(len(data), 1)
    data[pos:pos + len(patch)] = patch
    frames[frame_no] = bytes(data[:pos]) if truncate else bytes(data)
    _decode_or_protocol_error(frames)


_values = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats() | st.text(max_size=8)
                       | st.binary(max_size=8), lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)


@FUZZ
@given(st.sampled_from([*HEADER_FIELDS, "bogus"]), st.sampled_from([1, 2, 0, "1", None]),
       st.dictionaries(st.sampled_from(["scan", "first", "count", "nav_shape", "pattern_shape", "dtype", "buffers",
                                        "phases", "status", "frames_sent", "pages", "done", "worker", "timings",
                                        "modality", "setup", "fields", "methods", "step", "metadata"]),
                       _values, max_size=8))
def test_decoder_survives_well_formed_msgpack_with_wrong_fields(kind, version, fields):
    header = {"v": version, "kind": kind, **fields}
    _decode_or_protocol_error([msgpack.packb(header, use_bin_type=True)])


@FUZZ
@given(st.sampled_from(["fields", "methods", "phases", "setup", "modality"]), _values)
def test_a_scan_start_with_fuzzed_declarations_decodes_or_is_refused(key, value):
    header = {k: v for k, v in decode(_start()).header.items() if k not in ("v", "kind")}
    header[key] = value
    _decode_or_protocol_error([msgpack.packb({"v": 2, "kind": "scan_start", **header}, use_bin_type=True)])


# -- the sink: the loop survives everything, and still finishes a good scan afterwards -------
_bad_results = st.one_of(
    st.lists(st.integers(-5, 40), min_size=1, max_size=6).map(lambda idx: ("indices", idx)),
    st.sampled_from([np.nan, np.inf, 0.0, 2.0]).map(lambda v: ("quaternion", v)),
    st.integers(-3, 3).map(lambda p: ("phase_id", p)),
    st.sampled_from([np.nan, -1.0, 5.0]).map(lambda c: ("confidence", c)),
    st.just(("scan_end_early", None)),
    st.just(("unknown_scan", None)),
    st.binary(max_size=40).map(lambda b: ("garbage", b)),
)


def _bad_message(item, scan):
    what, value = item
    if what == "indices":
        return _results(value, scan=scan)
    if what == "quaternion":
        return _results([0, 1], scan=scan, quaternion=np.full((2, 4), value, np.float32))
    if what == "phase_id":
        return _results([2], scan=scan, phase_id=value)
    if what == "confidence":
        return _results([3], scan=scan, confidence=value)
    if what == "scan_end_early":
        return encode("scan_end", {"scan": scan, "frames_sent": 20, "status": "success"})
    if what == "unknown_scan":
        return _results([0], scan="never-started")
    return [value]


@pytest.fixture(scope="module")
def running_sink(tmp_path_factory):
    sink = Sink(out_dir=tmp_path_factory.mktemp("fuzz-sink"), http_port=None, finish_timeout=0.5)
    thread = threading.Thread(target=sink.run, daemon=True)
    thread.start()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(sink.endpoint)
    yield sink, sock, thread
    sink.stop_event.set()
    thread.join(10)
    sock.close(linger=0)


_heartbeats = st.dictionaries(st.sampled_from(["queue_depth", "workers", "backlog_frames", "spilled_frames", "scan"]),
                              _values, max_size=4).map(lambda f: ("heartbeat", f))
_examples = iter(range(10**9))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_bad_results | _heartbeats, min_size=1, max_size=25))
def test_sink_loop_survives_a_stream_of_bad_and_odd_messages(running_sink, items):
    sink, sock, thread = running_sink
    scan = f"fuzz-{next(_examples)}"  # a scan of its own, so every example reaches ScanState's checks
    messages = [_start(scan)] + [
        # Heartbeats as raw msgpack: encode() itself refuses some of them (an unsafe scan id).
        [msgpack.packb({"v": 2, "kind": "heartbeat", "sender": "dispatcher", **item[1], "buffers": []},
                       use_bin_type=True)] if item[0] == "heartbeat" else _bad_message(item, scan)
        for item in items]
    seen = sink.messages_seen
    for m in messages:
        sock.send_multipart(m)
    pause = threading.Event()
    for _ in range(400):  # until the sink has taken every message (polling its state)
        if sink.messages_seen >= seen + len(messages) or not thread.is_alive():
            break
        pause.wait(0.01)
    assert thread.is_alive() and sink.messages_seen >= seen + len(messages)


def test_sink_after_fuzzing_still_completes_a_good_scan(running_sink):
    sink, sock, thread = running_sink
    n_finished = len(sink.finished)
    sock.send_multipart(_start("good"))
    sock.send_multipart(_results(range(20), scan="good"))
    pause = threading.Event()
    for _ in range(200):  # polling the sink's state, not synchronising on time
        if len(sink.finished) > n_finished and any(s["scan"] == "good" for s in sink.finished):
            break
        pause.wait(0.05)
    good = next(s for s in sink.finished if s["scan"] == "good")
    assert good["missing"] == 0 and good["indexed"] == 20
    assert sink.receiver.bad_total > 0, "the fuzzing reached the sink and was counted"
    assert thread.is_alive()


def test_sink_refuses_nan_and_non_unit_quaternions_and_keeps_the_points_open(tmp_path):
    from liveindex.stream.protocol import decode as dec
    from liveindex.stream.scan_state import ScanState

    state = ScanState(dec(_start()))
    q = np.float32([[np.nan, 0, 0, 0], [1, 0, 0, 0], [0.2, 0.2, 0, 0]])
    state.add(dec(_results([0, 1, 2], quaternion=q)))
    assert state.received[:3].tolist() == [False, True, False] and state.rejected_points == 2
    assert state.maps["phase_id"][:3].tolist() == [-1, 0, -1]
    state.add(dec(_results([0, 2])))  # valid answers for them, later
    assert state.received[:3].all() and state.maps["phase_id"][:3].tolist() == [0, 0, 0]
    with pytest.raises(ProtocolError, match="phase ids"):
        state.add(dec(_results([3], phase_id=4)))
    with pytest.raises(ProtocolError, match="unknown method code"):
        state.add(dec(_results([3], method=7)))


# -- file readers ------------------------------------------------------------------------------
def _valid_npy(tmp_path):
    path = tmp_path / "ok.npy"
    np.save(path, np.zeros((2, 3, 8, 8), np.uint8))
    return path.read_bytes()


@FUZZ
@given(st.integers(0, 10_000), st.binary(min_size=1, max_size=16), st.booleans(),
       st.sampled_from([".npy", ".h5", ".up1", ".dat"]))
def test_file_readers_raise_input_errors_only(tmp_path_factory, position, patch, truncate, suffix):
    tmp = tmp_path_factory.mktemp("files")
    data = bytearray(_valid_npy(tmp))
    pos = position % len(data)
    data[pos:pos + len(patch)] = patch
    path = tmp / f"damaged{suffix}"
    path.write_bytes(bytes(data[:pos]) if truncate else bytes(data))
    try:
        source = load_file(path)
    except LiveIndexError as exc:
        assert isinstance(exc, InputError) or "PC" in str(exc)
        return
    assert source.patterns.ndim == 3  # the damage left a readable array


# -- the dispatcher: a rogue peer on the workers' socket cannot stop a scan ------------------------
_ROGUE_BASES = [
    ("credit", {"worker": "rogue", "pages": 1, "done": [["fuzz", 0]]}),
    ("heartbeat", {"sender": "rogue", "state": "indexing", "prefetch": 2}),
    ("scan_end", {"scan": "fuzz", "frames_sent": 1, "status": "success"}),
    ("stored", {"scan": "fuzz", "pages": [0], "complete": True}),
]
_rogue_messages = st.one_of(
    st.tuples(st.sampled_from(range(len(_ROGUE_BASES))), st.sampled_from(["pages", "done", "prefetch", "state",
                                                                          "worker", "scan", "frames_sent"]),
              _values).map(lambda t: ("field", t)),
    st.tuples(st.sampled_from(range(len(_ROGUE_BASES))), st.integers(0, 200), st.binary(min_size=1, max_size=6))
    .map(lambda t: ("bytes", t)),
    st.binary(max_size=30).map(lambda b: ("garbage", b)),
)


def _rogue_frames(item):
    what, value = item
    if what == "garbage":
        return [value]
    which, *rest = value
    kind, header = _ROGUE_BASES[which]
    if what == "field":
        name, new = rest
        return [msgpack.packb({"v": 2, "kind": kind, **header, name: new, "buffers": []}, use_bin_type=True)]
    position, patch = rest
    data = bytearray(msgpack.packb({"v": 2, "kind": kind, **header, "buffers": []}, use_bin_type=True))
    pos = position % len(data)
    data[pos:pos + len(patch)] = patch
    return [bytes(data)]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_rogue_messages, min_size=1, max_size=30))
@example([("field", (1, "worker", 1.0))])  # found by this test: a heartbeat's stray field became a worker's name
@example([("field", (1, "prefetch", 1.8446744073709556e+19))])  # found by this test: a credit too large to send
def test_dispatcher_loop_survives_a_rogue_peer_and_the_scan_completes(running_sink, items):
    from liveindex.stream.publisher import Publisher
    from liveindex.stream.worker import Worker

    from ..fake_modality import FakeModality, FakeSource

    sink, _, _ = running_sink
    scan = f"fuzz-d{next(_examples)}"
    publisher = Publisher(sink=sink.endpoint, page_size=8, worker_timeout=1.0, store_timeout=3.0)
    stop = threading.Event()
    worker = Worker(dispatcher=publisher.endpoint, sink=sink.endpoint, name="good", stop_event=stop)
    worker_thread = threading.Thread(target=worker.run, daemon=True)
    worker_thread.start()
    rogue = zmq.Context.instance().socket(zmq.DEALER)
    rogue.connect(publisher.endpoint)
    for item in items:
        rogue.send_multipart(_rogue_frames(item))
    try:
        report = publisher.run(FakeSource(FakeModality(), (4, 6)), scan_id=scan)
    finally:
        rogue.close(linger=0)
        stop.set()
        worker_thread.join(10)
        publisher.close()
    assert report.status == "complete"
    pause = threading.Event()
    for _ in range(200):
        if any(s["scan"] == scan for s in sink.finished):
            break
        pause.wait(0.05)
    summary = next(s for s in sink.finished if s["scan"] == scan)
    assert summary["status"] == "complete" and summary["received"] == 24

"""Live sources: per-frame latency from acquisition to the map, and an acquisition that ends short.

The publisher reads a live source (a file being written, a detector stream) on the
acquisition's clock and stamps each frame with its acquisition time; the sink measures every
frame's latency from it (`liveindex_frame_latency_seconds`, the live page). A source that
ends with frames missing ends the scan "partial" with its reason, written at once."""

import threading
import time
import urllib.request

import numpy as np
import pytest
import zmq

from liveindex.models.growing_file import FollowedSource, GrowingFile, RecordLayout
from liveindex.stream.protocol import ProtocolError, decode, encode
from liveindex.stream.publisher import Publisher
from liveindex.stream.sink import Sink
from liveindex.stream.worker import Worker

from ..conftest import results_message, scan_start_message
from ..fake_modality import FakeModality, FakeSource


@pytest.fixture
def sink(tmp_path):
    sink = Sink(out_dir=tmp_path, http_port=0, max_scans=1, finish_timeout=30.0)
    thread = threading.Thread(target=sink.run, daemon=True)
    thread.start()
    push = zmq.Context.instance().socket(zmq.DEALER)
    push.connect(sink.endpoint)
    yield sink, push, thread
    sink.stop_event.set()
    thread.join(5)
    push.close(linger=0)
    sink.close()


def _timed_results(indices, times):
    frames = results_message(indices, "s1")
    message = decode(frames)
    header = {k: v for k, v in message.header.items() if k not in ("v", "kind", "buffers")}
    return encode("results", header, {**message.arrays, "t_acquired": np.asarray(times, np.float64)})


def test_each_frame_s_latency_runs_from_its_own_acquisition_time(sink):
    sink, push, thread = sink
    push.send_multipart(scan_start_message("s1", (3, 4)))
    now = time.time()
    push.send_multipart(_timed_results(range(6), [now - 2.0] * 3 + [now - 0.2] * 3))
    push.send_multipart(_timed_results(range(6, 12), [now - 0.2] * 6))
    thread.join(20)
    summary = sink.finished[0]
    assert summary["status"] == "complete"
    assert summary["latency_p50_s"] == pytest.approx(0.2, abs=0.5) and summary["latency_p99_s"] > 1.5
    text = urllib.request.urlopen(f"{sink.http.url}metrics", timeout=5).read().decode()
    buckets = {line.split('le="')[1].split('"')[0]: float(line.split()[-1])
               for line in text.splitlines() if line.startswith("liveindex_frame_latency_seconds_bucket")}
    assert buckets["+Inf"] == 12  # one observation per frame, not per page
    assert buckets["1.0"] == 9 and buckets["2.5"] == 12  # three frames acquired 2 s before the map


def test_a_t_acquired_buffer_of_the_wrong_kind_is_refused():
    frames = results_message(range(3), "s1")
    message = decode(frames)
    header = {k: v for k, v in message.header.items() if k not in ("v", "kind", "buffers")}
    with pytest.raises(ProtocolError, match="t_acquired"):
        decode(encode("results", header, {**message.arrays, "t_acquired": np.zeros(2)}))
    with pytest.raises(ProtocolError, match="t_acquired"):
        decode(encode("results", header, {**message.arrays, "t_acquired": np.zeros(3, np.float32)}))


def test_a_partial_end_with_every_sent_frame_in_is_written_at_once_with_its_reason(sink):
    sink, push, thread = sink
    push.send_multipart(scan_start_message("s1", (3, 4)))
    push.send_multipart(results_message(range(7), "s1"))
    t0 = time.monotonic()
    push.send_multipart(encode("scan_end", {"scan": "s1", "frames_sent": 7, "status": "partial",
                                            "reason": "Pattern.dat stopped growing for 5 s"}))
    thread.join(20)
    assert time.monotonic() - t0 < 10  # not after --finish-timeout (30 s here)
    summary = sink.finished[0]
    assert summary["status"] == "partial" and summary["missing"] == 5
    assert "the acquisition ended after 7 frames: Pattern.dat stopped growing for 5 s" in summary["reason"]


def _fake_file(path, frames: np.ndarray, upto: int) -> None:
    path.write_bytes(np.ascontiguousarray(frames[:upto]).tobytes())


def test_publisher_follows_a_growing_file_of_any_modality_to_a_complete_map(tmp_path):
    """The runtime's part of --follow on the test modality: a file of raw uint16 frames growing
    in a thread while the real publisher, a worker and the sink run on loopback."""
    modality = FakeModality()
    truth_source = FakeSource(modality, (6, 8))
    frames = truth_source.read(0, truth_source.size)
    path = tmp_path / "frames.raw"
    _fake_file(path, frames, 0)
    layout = RecordLayout("raw", 0, frames[0].nbytes, (16, 16), "uint16", truth_source.size)
    source = FollowedSource(GrowingFile(path, layout, follow_timeout=20), modality=modality, nav_shape=(6, 8),
                            setup={"gain": 1.0}, phases=truth_source.phases)
    sink = Sink(out_dir=tmp_path / "out", http_port=0, max_scans=1)
    publisher = Publisher(sink=sink.endpoint, page_size=8)
    worker = Worker(dispatcher=publisher.endpoint, sink=sink.endpoint, name="w0")
    threads = [threading.Thread(target=sink.run, daemon=True), threading.Thread(target=worker.run, daemon=True)]
    for t in threads:
        t.start()

    def write():
        with open(path, "ab") as f:
            for i in range(len(frames)):
                f.write(frames[i].tobytes())
                f.flush()
                time.sleep(0.005)

    writer = threading.Thread(target=write)
    try:
        writer.start()
        report = publisher.run(source, scan_id="grow")
        threads[0].join(30)
    finally:
        writer.join()
        worker.stop_event.set()
        sink.stop_event.set()
        publisher.close()
        threads[1].join(10)
        sink.close()
    assert report.status == "complete" and report.frames == 48
    summary = sink.finished[0]
    assert summary["status"] == "complete" and summary["received"] == 48
    maps = np.load(tmp_path / "out" / "grow_maps.npz")
    np.testing.assert_allclose(maps["quaternion"], truth_source.truth["quaternion"], atol=1e-4)
    assert 0 <= summary["latency_p99_s"] < 5

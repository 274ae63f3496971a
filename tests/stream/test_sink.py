"""The sink on a real loopback socket: out-of-order, duplicate, early and bad results."""

import json
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
import zmq
from orix import io as orix_io

from liveindex.stream.protocol import decode, encode
from liveindex.stream.sink import Sink

from ..conftest import results_message, scan_start_message

NAV = (3, 4)


def _start(scan="s1", run=None):
    return scan_start_message(scan, NAV, run=run)


def _results(indices, scan="s1", run=None):
    return results_message(indices, scan, confidence=0.7, run=run)


@pytest.fixture
def sink(tmp_path):
    sink = Sink(out_dir=tmp_path, http_port=0, max_scans=1, finish_timeout=1.0)
    thread = threading.Thread(target=sink.run, daemon=True)
    thread.start()
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.DEALER)
    push.connect(sink.endpoint)
    yield sink, push, thread
    sink.stop_event.set()
    thread.join(5)
    push.close(linger=0)
    sink.close()


def test_results_early_out_of_order_duplicated_and_bad_still_fill_the_map_once(sink, tmp_path):
    sink, push, thread = sink
    push.send_multipart(_results([5, 4]))  # before the scan_start
    push.send_multipart(_start())
    push.send_multipart([b"garbage"])
    push.send_multipart(_results([11, 0, 1]))
    push.send_multipart(_results([4, 5, 6]))  # 4 and 5 again
    push.send_multipart(_results([99]))  # outside the scan
    push.send_multipart(_results([2, 3, 7, 8, 9, 10, 3]))  # 3 twice within the page
    thread.join(20)
    assert not thread.is_alive(), "sink did not finish the complete scan"
    summary = sink.finished[0]
    assert summary["missing"] == 0 and summary["received"] == 12
    assert summary["duplicates"] == 3
    assert sink.receiver.bad_total == 2
    xmap = orix_io.load(tmp_path / "s1.h5")
    assert xmap.shape == NAV and np.allclose(xmap.prop["confidence"], 0.7)


def test_scan_end_with_missing_points_writes_them_as_not_indexed_and_says_partial(sink, tmp_path):
    sink, push, thread = sink
    push.send_multipart(_start())
    push.send_multipart(_results(range(10)))
    push.send_multipart(encode("scan_end", {"scan": "s1", "frames_sent": 12, "status": "success"}))
    thread.join(20)
    summary = sink.finished[0]
    assert summary["missing"] == 2 and summary["status"] == "partial"
    assert "2 of 12 points missing" in summary["reason"] and "--finish-timeout" in summary["reason"]
    assert json.loads((tmp_path / "s1.json").read_text())["status"] == "partial"
    xmap = orix_io.load(tmp_path / "s1.h5")
    assert (xmap.get_map_data("phase_id").ravel()[10:] == -1).all()


def test_http_is_read_only_and_serves_status_metrics_and_maps(sink):
    sink, push, thread = sink
    push.send_multipart(_start())
    push.send_multipart(_results(range(12)))
    thread.join(20)
    base = sink.http.url
    status = json.loads(urllib.request.urlopen(base + "status.json").read())
    assert status["received"] == 12 and status["scan"] == "s1"
    # The chart's history is the sink's (a page opened after the scan ends draws it too): all
    # 12 points came within one time bin, which is therefore the whole of it.
    assert status["timeline"]["bin_s"] == 0.25 and status["timeline"]["frames_per_s"] == [48.0]
    metrics = urllib.request.urlopen(base + "metrics").read().decode()
    for name in ("liveindex_frames_received_total 12.0", "liveindex_frame_latency_seconds_bucket",
                 "liveindex_bad_messages_total", "liveindex_queue_depth_frames", "liveindex_workers_up"):
        assert name in metrics
    png = urllib.request.urlopen(base + "maps/ipf.png").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert urllib.request.urlopen(base + "files/s1.ang").read().startswith(b"#")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(urllib.request.Request(base + "status.json", data=b"x", method="POST"))
    assert info.value.code == 405
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(base + "files/..%2F..%2Fetc%2Fpasswd")


def test_a_restarted_sink_resumes_from_its_journal_and_a_new_run_under_the_same_id_is_refused(tmp_path):
    def start(run):
        return _start(run=run)

    def run_sink(messages, max_scans):
        sink = Sink(out_dir=tmp_path, http_port=None, max_scans=max_scans, finish_timeout=30)
        push = zmq.Context.instance().socket(zmq.DEALER)
        push.connect(sink.endpoint)
        for m in messages:
            push.send_multipart(m)
        thread = threading.Thread(target=sink.run, daemon=True)
        thread.start()
        return sink, push, thread

    sink, push, thread = run_sink([start("a"), _results(range(6), run="a")], max_scans=None)
    for _ in range(100):  # until the sink has journaled the page
        if sink.scans.get("s1") is not None and sink.scans["s1"].n_received == 6:
            break
        threading.Event().wait(0.05)
    sink.stop_event.set()
    thread.join(10)
    push.close(linger=0)
    # A new sink process on the same folder: resumes run "a" and finishes it; then run "b" under
    # the same id is refused (told to its publisher), and run "a"'s files stay as they are.
    sink, push, thread = run_sink([_results(range(6, 12), run="a")], max_scans=None)
    for _ in range(200):
        if sink.finished:
            break
        threading.Event().wait(0.05)
    assert [(s["run"], s["received"], s["status"]) for s in sink.finished] == [("a", 12, "complete")]
    written = (tmp_path / "s1.json").read_text()
    push.send_multipart(start("b"))
    assert push.poll(10_000)
    refused = decode(push.recv_multipart()).header
    assert refused["run"] == "b" and "already has results" in refused["refused"] and "--scan-id" in refused["refused"]
    push.send_multipart(_results(range(12)))
    sink.stop_event.set()
    thread.join(10)
    assert (tmp_path / "s1.json").read_text() == written and len(sink.finished) == 1
    assert sink.receiver.bad_total >= 1
    push.close(linger=0)


def test_a_scan_whose_publisher_died_is_finished_after_the_idle_timeout(tmp_path):
    sink = Sink(out_dir=tmp_path, http_port=None, max_scans=1, idle_timeout=1.0)
    push = zmq.Context.instance().socket(zmq.DEALER)
    push.connect(sink.endpoint)
    push.send_multipart(_start())
    push.send_multipart(_results(range(5)))  # and then nothing, not even a scan_end
    thread = threading.Thread(target=sink.run, daemon=True)
    thread.start()
    thread.join(30)
    push.close(linger=0)
    assert not thread.is_alive()
    summary = sink.finished[0]
    assert summary["received"] == 5 and summary["missing"] == 7
    assert summary["status"] == "partial" and "the publisher was lost" in summary["reason"]
    import h5py

    with h5py.File(tmp_path / "s1.h5") as f:
        assert f.attrs["liveindex_status"] == "partial" and f.attrs["liveindex_missing"] == 7


def test_a_finished_scan_tells_its_dispatcher_every_page_is_stored(tmp_path):
    """One 'stored' lost at the end of a scan must not keep the publisher waiting on a sink
    that has finished (and, with --once, exited): the sink says the scan is complete."""
    sink = Sink(out_dir=tmp_path, http_port=None, finish_timeout=1.0)
    thread = threading.Thread(target=sink.run, daemon=True)
    thread.start()
    dispatcher = zmq.Context.instance().socket(zmq.DEALER)
    dispatcher.connect(sink.endpoint)
    try:
        dispatcher.send_multipart(_start())
        dispatcher.send_multipart(encode("heartbeat", {"sender": "dispatcher", "scan": "s1", "workers": [
            {"name": "w0", "state": "indexing", "credit": 2}]}))
        dispatcher.send_multipart(_results(range(0, 6)))
        dispatcher.send_multipart(_results(range(6, 12)))
        told = []
        while not any(h.get("complete") for h in told):
            assert dispatcher.poll(10_000), f"no word from the sink after {told}"
            told.append(decode(dispatcher.recv_multipart()).header)
        assert sorted(p for h in told for p in h["pages"]) == [0, 6]
        dispatcher.send_multipart(_results(range(0, 6)))  # a page re-sent after the scan finished
        assert dispatcher.poll(10_000)
        again = decode(dispatcher.recv_multipart()).header
        assert again["pages"] == [0] and again["complete"] is True
        # A heartbeat from the dispatcher of a finished scan is answered "complete" too (the first
        # answer may have gone astray, and the dispatcher waits on every page).
        dispatcher.send_multipart(encode("heartbeat", {"sender": "dispatcher", "scan": "s1", "workers": [
            {"name": "w0", "state": "indexing", "credit": 2}]}))
        assert dispatcher.poll(10_000)
        assert decode(dispatcher.recv_multipart()).header.get("complete") is True
        # The page no longer shows the dispatcher's last word ("indexing") for a finished scan.
        assert [w["state"] for w in sink.view.status()["workers"]] == ["done"]
    finally:
        sink.stop_event.set()
        thread.join(5)
        dispatcher.close(linger=0)
        sink.close()


def test_the_missing_phase_line_counts_a_few_and_asks_about_many():
    from liveindex.stream.scan_state import missing_phase_warning

    assert missing_phase_warning({"unexplained": 5, "received": 100}) is None  # fewer than 10
    assert missing_phase_warning({"unexplained": 9, "received": 10_000}) is None  # under 1%
    few = missing_phase_warning({"unexplained": 300, "received": 10_000})
    assert few.startswith("300 points (3%)") and "surely" in few and "missing" not in few
    many = missing_phase_warning({"unexplained": 1840, "received": 10_000})
    assert many.startswith("1 840 points (18%) fit no listed phase: is a phase missing?")
    # With latent maps: a population no listed phase explains asks; unsure answers throughout do not.
    novel = missing_phase_warning({"unexplained": 1840, "received": 10_000, "novel_points": 1500})
    assert novel.startswith("1 840 points (18%) fit no listed phase: is a phase missing?")
    unsure = missing_phase_warning({"unexplained": 8900, "received": 10_000, "novel_points": 12})
    assert unsure.startswith("8 900 points (89%) fit no listed phase surely") and "no population" in unsure
    assert "is a phase missing" not in unsure

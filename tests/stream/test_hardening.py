"""Bad peers and unlucky operators: nothing a peer sends crashes the sink or writes outside
--out, and no point is lost behind a "complete" (each case was found failing on an earlier
main; real sockets on loopback, the test modality)."""

import json
import socket
import threading
import time
import urllib.request

import msgpack
import numpy as np
import pytest
import zmq

from liveindex.models.errors import InputError
from liveindex.stream.protocol import decode, encode
from liveindex.stream.publisher import Publisher, ScanRefused
from liveindex.stream.sink import Sink

from ..conftest import results_message, run_cli, scan_start_message
from ..fake_modality import FakeModality, FakeSource

NAV = (3, 4)  # 12 points


class Peer:
    """A sink running in a thread and one DEALER talking to it, as a dispatcher or worker would."""

    def __init__(self, out_dir, **options):
        options = {"http_port": None, "finish_timeout": 1.0, **options}
        self.sink = Sink(out_dir=out_dir, **options)
        self.thread = threading.Thread(target=self.sink.run, daemon=True)
        self.thread.start()
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.connect(self.sink.endpoint)

    def send(self, *messages):
        for m in messages:
            self.sock.send_multipart(m)

    def raw(self, header: dict, *buffers):
        self.sock.send_multipart([msgpack.packb({"v": 2, "buffers": [], **header}, use_bin_type=True), *buffers])

    def until(self, predicate, timeout=20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # polling the sink's state, not synchronising on time
            if predicate():
                return True
            threading.Event().wait(0.02)
        return False

    def replies(self, timeout_ms=5000):
        out = []
        while self.sock.poll(timeout_ms):
            out.append(decode(self.sock.recv_multipart()).header)
            timeout_ms = 200
        return out

    def close(self):
        self.sink.stop_event.set()
        self.thread.join(10)
        self.sock.close(linger=0)
        self.sink.close()


@pytest.fixture
def peer(tmp_path):
    p = Peer(tmp_path / "out")
    yield p
    p.close()


def _finished(peer, scan="s1"):
    assert peer.until(lambda: any(s["scan"] == scan for s in peer.sink.finished)), f"scan {scan} never finished"
    return next(s for s in peer.sink.finished if s["scan"] == scan)


# -- the sink survives and counts ------------------------------------------------------------
def test_overflowing_shapes_and_huge_scans_are_counted_and_the_sink_goes_on(peer):
    peer.raw({"kind": "heartbeat", "sender": "w", "buffers": [["x", "uint8", [2**32, 2**32]]]}, b"\0" * 4)
    start = decode(scan_start_message("huge", NAV)).header
    peer.raw({**{k: v for k, v in start.items() if k not in ("v", "buffers")}, "nav_shape": [10**6, 10**6]})
    peer.send(scan_start_message("s1", NAV), results_message(range(12), "s1"))
    summary = _finished(peer)
    assert summary["status"] == "complete" and peer.sink.receiver.bad_total == 2


def test_a_bad_dispatcher_heartbeat_never_breaks_the_status_view(tmp_path):
    peer = Peer(tmp_path, http_port=0)
    try:
        peer.send(scan_start_message("s1", NAV), encode("heartbeat", {"sender": "dispatcher", "scan": "s1", "workers": [
            {"name": "w0", "state": "indexing", "credit": 2}]}))
        peer.raw({"kind": "heartbeat", "sender": "dispatcher", "scan": "s1", "workers": [1, "x", None]})
        peer.raw({"kind": "heartbeat", "sender": "dispatcher", "scan": "s1", "queue_depth": [], "workers": []})
        assert peer.until(lambda: peer.sink.receiver.bad_total == 2)
        status = json.loads(urllib.request.urlopen(peer.sink.http.url + "status.json", timeout=5).read())
        assert [w["name"] for w in status["workers"]] == ["w0"]
        events = urllib.request.urlopen(peer.sink.http.url + "events", timeout=5)
        assert events.readline().startswith(b"event:")
        events.close()
    finally:
        peer.close()


def test_an_idle_http_connection_is_closed(tmp_path, monkeypatch):
    from liveindex.stream import http

    monkeypatch.setattr(http._Handler, "timeout", 1.0)
    peer = Peer(tmp_path, http_port=0)
    try:
        host, port = peer.sink.http.server.server_address[:2]
        with socket.create_connection((host, port), timeout=10) as idle:
            idle.settimeout(10)
            assert idle.recv(1024) == b""  # the server hung up on a client that said nothing
    finally:
        peer.close()


# -- nothing outside --out ------------------------------------------------------------------------
@pytest.mark.parametrize("scan", ["../escaped", "/tmp/absolute", "a/b", ".hidden", "x" * 200])
def test_a_scan_id_that_is_a_path_is_refused_and_nothing_is_written_outside(tmp_path, scan):
    peer = Peer(tmp_path / "out")
    try:
        start = decode(scan_start_message("s1", NAV)).header
        peer.raw({**{k: v for k, v in start.items() if k not in ("v", "buffers")}, "scan": scan})
        assert peer.until(lambda: peer.sink.receiver.bad_total == 1)
    finally:
        peer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert not any(p.suffix in (".h5", ".json", ".journal") for p in (tmp_path / "out").iterdir())


def test_the_publisher_refuses_a_scan_id_that_is_a_path():
    publisher = Publisher(sink="tcp://127.0.0.1:9", sink_timeout=1)
    try:
        with pytest.raises(InputError, match="never a path"):
            publisher.run(FakeSource(FakeModality(), NAV), scan_id="../escaped")
    finally:
        publisher.close()


def test_the_page_server_serves_only_the_scans_own_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "secret.txt").write_text("not the sink's")
    peer = Peer(out, http_port=0)
    try:
        peer.send(scan_start_message("s1", NAV), results_message(range(12), "s1"))
        _finished(peer)
        base = peer.sink.http.url
        assert urllib.request.urlopen(base + "files/s1.json").status == 200
        for name in ("secret.txt", "..%2Fout%2Fs1.json", "%2Fetc%2Fpasswd"):
            with pytest.raises(urllib.error.HTTPError):
                urllib.request.urlopen(base + "files/" + name)
    finally:
        peer.close()


def test_an_out_folder_that_is_a_file_is_refused_before_ready(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(InputError, match="is a file"):
        Sink(out_dir=path, http_port=None)
    proc = run_cli("sink", "--out", path, "--http-port", "0", "--once", timeout=60)
    assert proc.returncode == 2 and "is a file" in proc.stderr and "Traceback" not in proc.stderr


def test_a_spill_dir_that_is_a_file_is_named(tmp_path):
    path = tmp_path / "spill"
    path.write_text("x")
    proc = run_cli("publish", "--spill-dir", path, "--sink", "tcp://127.0.0.1:9", "--sink-timeout", "1", timeout=60)
    assert proc.returncode == 2 and "--spill-dir" in proc.stderr and "is a file" in proc.stderr
    assert "free space" not in proc.stderr


def test_indexing_an_empty_array_is_one_clear_line(tmp_path):
    np.save(tmp_path / "empty.npy", np.zeros((0, 60, 60), np.uint8))
    proc = run_cli("index", tmp_path / "empty.npy", timeout=60)
    assert proc.returncode == 2 and "holds no patterns" in proc.stderr and "Traceback" not in proc.stderr


# -- no point lost behind "complete" -------------------------------------------------------------
def test_invalid_results_are_refused_counted_and_the_genuine_ones_fill_the_points(peer):
    q = np.tile(np.float32([1, 0, 0, 0]), (12, 1))
    q[:4] = np.nan
    q[4:6] = [0.5, 0.1, 0, 0]  # not a unit quaternion
    peer.send(scan_start_message("s1", NAV), results_message(range(12), "s1", quaternion=q))
    assert peer.until(lambda: "s1" in peer.sink.scans and peer.sink.scans["s1"].rejected_points == 6)
    state = peer.sink.scans["s1"]
    assert state.n_received == 6 and not state.received[:6].any()
    peer.send(results_message(range(12), "s1"))  # the page indexed again, by a good worker
    summary = _finished(peer)
    assert summary["status"] == "complete" and summary["missing"] == 0 and summary["rejected_points"] == 6
    assert (state.maps["phase_id"] == 0).all()


def test_an_early_scan_end_claiming_success_is_refused_and_the_scan_completes(peer):
    peer.send(scan_start_message("s1", NAV), results_message(range(6), "s1"),
              encode("scan_end", {"scan": "s1", "frames_sent": 6, "status": "success"}))
    assert peer.until(lambda: peer.sink.receiver.bad_total == 1)
    assert not peer.sink.finished
    peer.send(results_message(range(6, 12), "s1"))
    assert _finished(peer)["status"] == "complete"


def test_a_stopped_publisher_leaves_a_partial_scan_that_says_why(peer):
    peer.send(scan_start_message("s1", NAV), results_message(range(5), "s1"),
              encode("scan_end", {"scan": "s1", "frames_sent": 5, "status": "abort"}))
    summary = _finished(peer)
    assert summary["status"] == "partial" and "stopped the scan after sending 5 frames" in summary["reason"]


def test_a_second_run_cannot_discard_a_running_scan_but_a_restart_resumes_it(peer):
    peer.send(scan_start_message("s1", NAV, run="a"), results_message(range(6), "s1", run="a"))
    assert peer.until(lambda: peer.sink.scans.get("s1") is not None and peer.sink.scans["s1"].n_received == 6)
    peer.send(scan_start_message("s1", NAV, run="b"))
    refused = [h for h in peer.replies() if h.get("refused")]
    assert refused and refused[0]["run"] == "b" and "--restart" in refused[0]["refused"]
    assert peer.sink.scans["s1"].n_received == 6  # nothing thrown away
    restart = decode(scan_start_message("s1", NAV, run="c")).header
    peer.send(encode("scan_start", {**{k: v for k, v in restart.items() if k not in ("v", "kind", "buffers")},
                                    "restart": True}))
    peer.send(results_message(range(6, 9), "s1", run="c"), results_message(range(9, 12), "s1", run="a"))
    summary = _finished(peer)
    assert summary["status"] == "complete" and summary["received"] == 12
    assert peer.sink.receiver.bad_total == 1  # the refused start; no result of a run the scan has was refused


def test_results_and_a_scan_end_without_the_scans_run_are_refused(peer):
    peer.send(scan_start_message("s1", NAV, run="a"), results_message(range(12), "s1", run="rogue"),
              results_message(range(12), "s1"), encode("scan_end", {"scan": "s1", "frames_sent": 0, "status": "abort"}))
    assert peer.until(lambda: peer.sink.receiver.bad_total == 3)
    assert peer.sink.scans["s1"].n_received == 0 and not peer.sink.finished


def test_a_refused_scan_ends_the_publisher_with_the_sinks_reason(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "s1.json").write_text("{}")  # results of an earlier run of scan s1
    peer = Peer(out)
    publisher = Publisher(sink=peer.sink.endpoint, page_size=4, wait_for_workers=5)
    try:
        with pytest.raises(ScanRefused, match="already has results"):
            publisher.run(FakeSource(FakeModality(), NAV), scan_id="s1")
    finally:
        publisher.close()
        peer.close()
    assert (out / "s1.json").read_text() == "{}"


def test_after_a_sink_restart_the_scans_rate_counts_from_its_first_start(tmp_path):
    start = decode(scan_start_message("s1", NAV)).header
    t0 = time.time() - 10.0  # the scan started ten seconds ago; half its points came in since
    header = {k: v for k, v in start.items() if k not in ("v", "kind", "buffers")}
    first = Peer(tmp_path)
    first.send(encode("scan_start", {**header, "t_start": t0}))
    page = decode(results_message(range(6), "s1"))
    first.send(encode("results", {**{k: v for k, v in page.header.items() if k not in ("v", "kind", "buffers")},
                                  "timings": {"t_done": t0 + 5.0}}, dict(page.arrays)))
    assert first.until(lambda: first.sink.scans.get("s1") is not None and first.sink.scans["s1"].n_received == 6)
    first.close()
    again = Peer(tmp_path)  # replays the journal
    try:
        again.send(results_message(range(6, 12), "s1"))
        summary = _finished(again)
        assert summary["seconds"] >= 9.5 and summary["frames_per_second"] < 2.0, summary
    finally:
        again.close()


def test_a_stopped_publisher_exits_non_zero_and_says_partial(tmp_path):
    from ..conftest import FAKE, start_cli

    out = tmp_path / "out"
    sink = start_cli("sink", "--bind", "tcp://127.0.0.1:0", "--out", out, "--http-port", "0", "--idle-timeout", "1")
    try:
        disp = f"ipc://{tmp_path}/d.sock"
        sink_addr = None
        for _ in range(200):  # the sink logs its bound address when ready
            line = sink.stderr.readline()
            if "sink listening on" in line:
                sink_addr = line.split("sink listening on ")[1].split(",")[0]
                break
        assert sink_addr
        worker = start_cli("worker", "--dispatcher", disp, "--sink", sink_addr, *FAKE, "--frame-seconds", "0.01")
        proc = start_cli("publish", "--bind", disp, "--sink", sink_addr, "--simulate", "40x40", "--page-size", "16",
                         "--rate", "100", *FAKE)
        while "started (fake)" not in sink.stderr.readline():  # the scan under way: stop it as an operator would
            pass
        proc.send_signal(2)
        out_text, err = proc.communicate(timeout=60)
        assert proc.returncode == 3, err
        assert "; partial (stopped after" in out_text
        worker.terminate()
        worker.wait(20)
    finally:
        sink.terminate()
        sink.wait(20)


def test_a_symlink_planted_in_out_never_takes_the_journal_outside(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "s1.journal").symlink_to(tmp_path / "outside.journal")  # dangling: exists() is False
    peer = Peer(out)
    try:
        peer.send(scan_start_message("s1", NAV), results_message(range(6), "s1"))
        assert peer.until(lambda: "s1" in peer.sink.scans and peer.sink.scans["s1"].n_received == 6)
        assert not peer.replies(timeout_ms=1000)  # nothing journaled, so nothing acknowledged
    finally:
        peer.close()
    assert not (tmp_path / "outside.journal").exists()


def test_a_heartbeat_of_another_run_gets_no_acknowledgements_and_does_not_show(peer):
    real = zmq.Context.instance().socket(zmq.DEALER)
    real.connect(peer.sink.endpoint)
    try:
        real.send_multipart(scan_start_message("s1", NAV, run="a"))
        assert peer.until(lambda: "s1" in peer.sink.scans)
        peer.send(encode("heartbeat", {"sender": "dispatcher", "scan": "s1", "run": "rogue", "workers": [
            {"name": "fake", "state": "indexing", "credit": 9}]}))
        real.send_multipart(results_message(range(6), "s1", run="a"))
        assert real.poll(10_000)  # the acknowledgement goes to the scan's own publisher
        assert decode(real.recv_multipart()).header["pages"] == [0]
        assert not peer.replies(timeout_ms=500)
        assert peer.sink.dispatcher_status.get("run") != "rogue"
    finally:
        real.close(linger=0)

"""Never lose a frame: real processes on loopback, killed and throttled mid-scan.

Each test runs on the test modality (tests/fake_modality.py: what is tested is the runtime's,
on a 40x40 scan, every point's answer checked against the truth the simulated scan carries)
and on the TEM spot modality (``--modality spots``: its real indexer in the workers, a smaller
scan at a slower detector rate, since each frame costs milliseconds to index).
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass

import numpy as np
import pytest
import zmq
from orix import io as orix_io

from liveindex.models import modality as modalities

from ..conftest import FAKE, results_message, run_cli, start_cli
from ..fake_modality import FakeModality, FakeSource

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Scan:
    """One modality's scan for these tests: its options, size, page and detector rate."""

    name: str
    options: tuple  # on every worker and publisher
    nx: int
    ny: int
    page: int
    rate: int  # frames/s of the simulated detector, a few times what the workers index
    median_error_deg: float  # the sink's median error against the truth, where every frame arrived
    slow_worker: tuple = ()  # a worker slower than the detector, for the spill test

    @property
    def size(self) -> int:
        return self.nx * self.ny

    def simulate(self, rate=None) -> tuple:
        return ("--simulate", f"{self.nx}x{self.ny}", "--page-size", str(self.page), "--rate", str(rate or self.rate))

    def frames(self) -> np.ndarray:
        """The simulated scan's frames (ny, nx, H, W), to publish from a file."""
        if self.name == "fake":
            source = FakeSource(FakeModality(), (self.ny, self.nx), seed=5)
        else:
            mod = modalities.load(self.name)
            parser = argparse.ArgumentParser()
            mod.add_arguments(parser, role="publish")
            args = parser.parse_args(["--seed", "5"])
            args.simulate = f"{self.nx}x{self.ny}"
            source = mod.open_source(args, role="publish")
        return source.read(0, self.size).reshape(self.ny, self.nx, *source.pattern_shape)


SCANS = [
    Scan("fake", FAKE, 40, 40, page=32, rate=400, median_error_deg=2.5,
         slow_worker=("--frame-seconds", "0.0014")),  # about 700 frames/s against 20000 frames/s
    # A worker indexes about 100-200 spot frames/s here (2 cores shared); the spill test's one
    # worker is slower than the file's 20000 frames/s as it is. File frames carry no
    # calibration: the publisher is given the simulator's.
    Scan("spots", ("--modality", "spots"), 16, 12, page=16, rate=60, median_error_deg=2.0),
]


@pytest.fixture(params=SCANS, ids=lambda scan: scan.name)
def scan(request):
    return request.param

STATUS_POLL = 0.05


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(http_port: int) -> dict:
    try:
        return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{http_port}/status.json", timeout=2).read())
    except OSError:
        return {}


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(STATUS_POLL)  # polling a real process's state, not synchronising on time
    raise AssertionError(f"timed out waiting for {what}")


class Cluster:
    """Sink, workers and publisher as separate `liveindex` processes on loopback."""

    def __init__(self, tmp_path, scan: Scan):
        self.tmp = tmp_path
        self.options = scan.options
        self.sink_addr = f"tcp://127.0.0.1:{_free_port()}"
        self.disp_addr = f"tcp://127.0.0.1:{_free_port()}"
        self.http_port = _free_port()
        self.out = tmp_path / "out"
        self.procs: list[subprocess.Popen] = []

    def sink(self, *extra):
        return self._keep(start_cli("sink", "--bind", self.sink_addr, "--out", self.out, "--http-port", self.http_port,
                                 "--once", "--finish-timeout", "20", *extra))

    def worker(self, name, *extra):
        return self._keep(start_cli("worker", "--dispatcher", self.disp_addr, "--sink", self.sink_addr, "--name", name,
                                    *self.options, *extra))

    def publish(self, *extra):
        return self._keep(start_cli("publish", "--bind", self.disp_addr, "--sink", self.sink_addr, "--scan-id", "scan",
                                    "--worker-timeout", "2", "--store-timeout", "10", *self.options, *extra))

    def _keep(self, proc):
        self.procs.append(proc)
        return proc

    def received(self) -> int:
        return _status(self.http_port).get("received", 0)

    def close(self):
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                _, err = p.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                _, err = p.communicate()
            except ValueError:  # its output was read already (a finished publisher)
                continue
            # Shown by pytest only when the test fails: what every process said, to diagnose it.
            print(f"--- {' '.join(map(str, p.args[3:5]))} (exit {p.returncode}), last of its log:\n{(err or '')[-4000:]}")


@pytest.fixture
def cluster(tmp_path, scan):
    c = Cluster(tmp_path, scan)
    yield c
    c.close()


def _finish(sink, publisher, timeout=180):
    try:
        out, err = publisher.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        publisher.kill()
        out, err = publisher.communicate()
        raise AssertionError(f"the publisher did not finish within {timeout} s; its log:\n{err[-6000:]}") from exc
    assert publisher.returncode == 0, err
    sink_out, sink_err = sink.communicate(timeout=timeout)
    assert sink.returncode == 0, sink_err
    return out, json.loads(sink_out.strip().splitlines()[-1]), sink_err


def _check_map(out_dir, scan: Scan):
    xmap = orix_io.load(out_dir / "scan.h5")
    assert xmap.shape == (scan.ny, scan.nx) and xmap.size == scan.size  # one entry per point
    if scan.name == "fake":
        assert (xmap.phase_id >= 0).all(), "every point indexed exactly once into the map"
    else:  # amorphous points are rightly not indexed; the summary's missing counts the rest
        assert (xmap.phase_id >= 0).mean() > 0.5
        mapped = set(xmap.phases.names) - {"not_indexed"}  # the phases present in the map
        assert mapped and mapped <= {"austenite", "cementite", "ferrite"}
    return xmap


def test_kill_9_one_of_two_workers_mid_scan_completes_with_nothing_missing(cluster, scan):
    sink = cluster.sink()
    workers = [cluster.worker("w0"), cluster.worker("w1")]
    publisher = cluster.publish(*scan.simulate())
    _wait_for(lambda: cluster.received() >= scan.size * 3 // 16, 120, "a fifth of the scan at the sink")
    os.kill(workers[0].pid, signal.SIGKILL)
    out, summary, _ = _finish(sink, publisher)
    assert summary["missing"] == 0 and summary["received"] == scan.size
    assert summary["frames_by_worker"]["w1"] > 0
    assert summary["median_error_deg"] < scan.median_error_deg
    _check_map(cluster.out, scan)  # nothing missing, nothing doubled


def test_sink_killed_mid_scan_restarts_from_its_journal_and_completes(cluster, scan):
    sink = cluster.sink()
    cluster.worker("w0")
    cluster.worker("w1")
    publisher = cluster.publish(*scan.simulate(rate=scan.rate * 3 // 4))
    _wait_for(lambda: cluster.received() >= scan.size // 4, 120, "a quarter of the scan at the sink")
    os.kill(sink.pid, signal.SIGKILL)
    sink.wait(10)
    assert (cluster.out / "scan.journal").stat().st_size > 0
    sink = cluster.sink()
    out, summary, sink_err = _finish(sink, publisher)
    assert "recovered scan scan from its journal" in sink_err
    assert summary["missing"] == 0 and summary["received"] == scan.size
    assert summary["median_error_deg"] < scan.median_error_deg
    _check_map(cluster.out, scan)


def test_workers_slower_than_the_detector_spill_to_disk_and_every_frame_is_indexed(cluster, scan, tmp_path):
    frames = scan.frames()
    np.save(tmp_path / "scan.npy", frames)
    page_bytes = scan.page * frames[0, 0].nbytes
    spill = tmp_path / "spill"
    sink = cluster.sink()
    cluster.worker("w0", *scan.slow_worker)
    file_setup = ("--calibration", "0.03", "--precession", "1") if scan.name == "spots" else ()
    publisher = cluster.publish("--file", tmp_path / "scan.npy", *file_setup, "--rate", "20000", "--page-size",
                                str(scan.page), "--memory-limit", "0.1", "--spill-dir", spill)
    out, summary, _ = _finish(sink, publisher)
    assert summary["missing"] == 0 and summary["received"] == scan.size  # (_check_map: the fake's all indexed)
    line = out.strip().splitlines()[-1]
    spilled = int(line.split(" frames spilled")[0].rsplit(" ", 1)[1])
    peak_mb = float(line.split("peak page memory ")[1].split(" MB")[0])
    assert spilled > scan.size // 2, line  # most of the scan waited on disk
    assert peak_mb * 1e6 <= 0.1e6 + page_bytes + 1e5, line  # the memory bound held (MB printed to 0.1)
    _check_map(cluster.out, scan)


def _keys(cluster, name):
    folder = cluster.tmp / name
    proc = run_cli("keys", folder, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return folder


def test_curve_keys_keep_out_a_worker_and_a_sender_without_the_right_key(cluster, scan):
    good = _keys(cluster, "keys")
    other = _keys(cluster, "other")
    # The intruder knows the servers' public key but holds a client key nobody accepted.
    os.remove(other / "server.key_secret")
    shutil.copy(good / "server.key", other / "server.key")
    sink = cluster.sink("--keys", good)
    cluster.worker("w0", "--keys", good)
    publisher = cluster.publish("--simulate", "20x20", "--page-size", "16", "--rate", "40", "--keys", good)
    # The intruder tries while the dispatcher is up and serving (10 s of scan at 40 frames/s).
    _wait_for(lambda: cluster.received() > 0, 120, "the scan under way")
    intruder = cluster.worker("intruder", "--keys", other, "--connect-timeout", "3")
    # A plain socket without CURVE tries to push a forged result page straight to the sink.
    forger = zmq.Context.instance().socket(zmq.DEALER)
    forger.setsockopt(zmq.IMMEDIATE, 1)
    forger.setsockopt(zmq.SNDTIMEO, 3000)
    forger.connect(cluster.sink_addr)
    q = np.tile(np.float32([0, 1, 0, 0]), (4, 1))
    with pytest.raises(zmq.Again):  # no handshake completes, so there is no peer to queue to
        forger.send_multipart(results_message(range(4), "scan", quaternion=q, confidence=1.0))
    forger.close(linger=0)
    _, err = intruder.communicate(timeout=60)
    assert publisher.poll() is None, "the dispatcher was still serving while the intruder was refused"
    assert intruder.returncode == 2 and "cannot reach the dispatcher" in err and "--keys" in err
    out, summary, _ = _finish(sink, publisher)
    assert summary["missing"] == 0 and set(summary["frames_by_worker"]) == {"w0"}


def test_losing_the_last_worker_fails_the_scan_after_the_wait_and_says_so(cluster, scan):
    sink = cluster.sink()
    worker = cluster.worker("only")
    publisher = cluster.publish(*scan.simulate(rate=scan.rate * 3 // 4), "--wait-for-workers", "4")
    _wait_for(lambda: cluster.received() >= scan.size // 8, 120, "the scan under way")
    os.kill(worker.pid, signal.SIGKILL)
    _, err = publisher.communicate(timeout=120)
    assert publisher.returncode == 2 and "no worker connected" in err and "liveindex worker" in err
    out, err = sink.communicate(timeout=120)
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["status"] == "failed" and "the publisher failed" in summary["reason"]
    assert 0 < summary["missing"] < scan.size  # what arrived is kept and written

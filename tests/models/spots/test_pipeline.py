"""The spot modality through the real pipeline (sink, two workers, publisher as processes on
loopback): a worker killed mid-scan loses no frame, and the finished map loads in orix."""

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

import pytest
from orix import io as orix_io

from ...conftest import start_cli

pytestmark = pytest.mark.slow
SPOTS = ("--modality", "spots")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _received(http_port: int) -> int:
    try:
        status = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{http_port}/status.json", timeout=2).read())
    except OSError:
        return 0
    return status.get("received", 0)


def test_kill_9_one_of_two_spot_workers_mid_scan_loses_nothing(tmp_path):
    sink_addr, disp_addr, http_port = f"tcp://127.0.0.1:{_free_port()}", f"tcp://127.0.0.1:{_free_port()}", _free_port()
    out = tmp_path / "out"
    procs = [start_cli("sink", "--bind", sink_addr, "--out", out, "--http-port", http_port, "--once",
                       "--finish-timeout", "20")]
    workers = [start_cli("worker", "--dispatcher", disp_addr, "--sink", sink_addr, "--name", name, *SPOTS)
               for name in ("w0", "w1")]
    procs += workers
    publisher = start_cli("publish", "--bind", disp_addr, "--sink", sink_addr, "--scan-id", "scan",
                          "--worker-timeout", "2", "--store-timeout", "10", *SPOTS, "--simulate", "16x12",
                          "--page-size", "16", "--rate", "60")
    procs.append(publisher)
    try:
        deadline = time.monotonic() + 120
        while _received(http_port) < 48:
            assert time.monotonic() < deadline, "a quarter of the scan never reached the sink"
            time.sleep(0.05)  # polling a real process's state, not synchronising on time
        os.kill(workers[0].pid, signal.SIGKILL)
        _, err = publisher.communicate(timeout=180)
        assert publisher.returncode == 0, err
        sink_out, sink_err = procs[0].communicate(timeout=60)
        assert procs[0].returncode == 0, sink_err
        summary = json.loads(sink_out.strip().splitlines()[-1])
        assert summary["missing"] == 0 and summary["received"] == 192
        assert summary["frames_by_worker"]["w1"] > 0
        xmap = orix_io.load(out / "scan.h5")
        assert xmap.shape == (12, 16) and xmap.size == 192  # one entry per point
        mapped = set(xmap.phases.names) - {"not_indexed"}  # the phases present in the map
        assert mapped and mapped <= {"austenite", "cementite", "ferrite"}
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.communicate(timeout=20)
            except (subprocess.TimeoutExpired, ValueError):
                p.kill()

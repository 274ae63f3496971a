"""Detector streams: `liveindex replay --as merlin` runs libertem-live's own Merlin simulator
(libertem-live-mib-sim) on a .mib written from a scan, and `liveindex publish --detector merlin`
receives it as the client; real workers and sink on loopback. EBSD frames for now (the
detector path is modality-neutral: --modality picks the indexer)."""

import json
import socket
import time

import numpy as np
import pytest

from liveindex.models.errors import InputError
from liveindex.stream.replay import load_frames, write_mib

from ..conftest import run_cli, start_cli

PC = ("0.425", "0.213", "0.501")


def test_the_mib_written_reads_back_in_libertem_as_the_frames(tmp_path):
    pytest.importorskip("libertem", reason="liveindex[detectors] (libertem-live) is not installed")
    from libertem.api import Context
    from libertem.executor.inline import InlineJobExecutor
    from libertem.io.dataset.mib import MIBDataSet

    frames = np.random.default_rng(0).integers(0, 4000, (3, 4, 8, 10)).astype(np.uint16)
    hdr = write_mib(frames, tmp_path / "scan.mib")
    ctx = Context(executor=InlineJobExecutor())
    ds = ctx.load("mib", path=str(hdr))
    assert isinstance(ds, MIBDataSet) and tuple(ds.shape) == (3, 4, 8, 10)
    from libertem.udf.raw import PickUDF

    roi = np.zeros((3, 4), bool)
    roi[1, 2] = True
    picked = ctx.run_udf(dataset=ds, udf=PickUDF(), roi=roi)["intensity"].data
    np.testing.assert_array_equal(np.asarray(picked).reshape(8, 10), frames[1, 2])


def test_replay_refuses_what_it_cannot_serve(tmp_path):
    np.save(tmp_path / "flat.npy", np.zeros((6, 4, 4), np.uint8))
    with pytest.raises(InputError, match="--scan-shape"):
        load_frames(tmp_path / "flat.npy")
    with pytest.raises(InputError, match="has 4 points but flat.npy holds 6"):
        load_frames(tmp_path / "flat.npy", (2, 2))
    with pytest.raises(InputError, match="uint8, uint16 or uint32"):
        write_mib(np.zeros((1, 1, 4, 4), np.float32), tmp_path / "f.mib")
    proc = run_cli("replay", tmp_path / "scan.h5", "--as", "merlin")
    assert proc.returncode == 2 and "replay serves .npy scans" in proc.stderr


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_every_frame_of_a_merlin_stream_at_the_simulator_s_full_rate_is_indexed(tmp_path):
    pytest.importorskip("libertem_qd_mpx", reason="liveindex[detectors] (libertem-live) is not installed")
    from liveindex.models.ebsd.simulator import SimulatedScan

    scan = SimulatedScan((12, 16), noise="moderate", seed=9)
    np.save(tmp_path / "scan.npy", scan.render(0, scan.size).reshape(12, 16, 60, 60))
    data, control, trigger = _free_ports(3)
    sink_addr, disp_addr = f"ipc://{tmp_path}/sink.sock", f"ipc://{tmp_path}/dispatch.sock"
    out = tmp_path / "out"
    sink = start_cli("sink", "--bind", sink_addr, "--out", out, "--http-port", "0", "--once")
    workers = [start_cli("worker", "--dispatcher", disp_addr, "--sink", sink_addr, "--name", f"w{i}") for i in range(2)]
    # No --rate: the simulator sends as fast as it can.
    sim = start_cli("replay", tmp_path / "scan.npy", "--as", "merlin", "--port", data, "--control-port", control,
                    "--trigger-port", trigger, "--folder", tmp_path / "mib")
    try:
        _wait_for_port(data)
        publish = run_cli("publish", "--detector", "merlin", "--port", data, "--pc", *PC, "--bind", disp_addr,
                          "--sink", sink_addr, "--scan-id", "merlin", "--page-size", 32, "--arm-timeout", 60,
                          timeout=300)
        assert publish.returncode == 0, publish.stderr
        assert "192 frames" in publish.stdout and "complete" in publish.stdout
        assert "Merlin acquisition: 192 frames of uint8 (60, 60), scan 16x12" in publish.stderr
        sink_out, _ = sink.communicate(timeout=120)
        summary = json.loads(sink_out.strip().splitlines()[-1])
        assert summary["status"] == "complete" and summary["received"] == 192 and summary["dropped_points"] == 0
        maps = np.load(out / "merlin_maps.npz")
        assert (maps["phase_id"] == 0).all() and tuple(maps["nav_shape"]) == (12, 16)
        from liveindex.models.ebsd.master_patterns import disorientation_degrees

        assert np.median(disorientation_degrees(maps["quaternion"], scan.truth)) < 2.5  # the frames, in order
    finally:
        for p in [sim, sink, *workers]:
            p.terminate()
        for p in [sim, sink, *workers]:
            p.wait(30)


def _wait_for_port(port: int, timeout: float = 60) -> None:
    """The simulator listens (its data port accepts): a probe connection would be served a scan,
    so wait for the .mib's listening socket via /proc instead of connecting."""
    t0 = time.monotonic()
    hex_port = f":{port:04X}"
    while time.monotonic() - t0 < timeout:
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                lines = open(table).read().splitlines()[1:]
            except OSError:
                continue
            if any(line.split()[1].endswith(hex_port) and line.split()[3] == "0A" for line in lines):
                return
        time.sleep(0.1)
    raise AssertionError(f"the simulator never listened on port {port}")

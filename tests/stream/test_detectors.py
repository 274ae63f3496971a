"""Detector streams: `liveindex replay --as merlin|dectris` runs libertem-live's own simulators
(libertem-live-mib-sim on a .mib, libertem-live-dectris-sim on a recorded SIMPLON stream with
bitshuffle/LZ4 frames, both written from a scan), and `liveindex publish --detector ...`
receives it as the client; real workers and sink on loopback. The end-to-end runs stream a
simulated 4D-STEM spot-pattern scan (--modality spots), as these detectors record; the path is
modality-neutral (--modality picks the indexer)."""

import json
import socket
import struct
import time

import numpy as np
import pytest

from liveindex.models.errors import InputError
from liveindex.stream.replay import load_frames, write_mib, write_simplon_dump

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
    with pytest.raises(InputError, match="uint8, uint16 or uint32"):
        write_simplon_dump(np.zeros((1, 1, 4, 4), np.float32), tmp_path / "f.simplon")
    proc = run_cli("replay", tmp_path / "scan.h5", "--as", "merlin")
    assert proc.returncode == 2 and "replay serves .npy scans" in proc.stderr


def test_a_detector_that_is_never_armed_is_named_after_arm_timeout():
    pytest.importorskip("libertem_dectris", reason="liveindex[detectors] (libertem-live) is not installed")
    (port,) = _free_ports(1)
    proc = run_cli("publish", "--detector", "dectris", "--port", port, "--arm-timeout", 1, "--pc", *PC,
                   "--sink-timeout", 1, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"no DECTRIS series was armed on tcp://127.0.0.1:{port} within 1 s (--arm-timeout)" in proc.stderr


SPOTS = ("--modality", "spots", "--calibration", "0.03", "--precession", "1")


def _spot_scan(path, ny=8, nx=12):
    """A simulated precession scan (grains of ferrite, austenite, cementite and an amorphous
    region) saved as (ny, nx, 128, 128) uint16 frames; returns its scan (truth)."""
    from liveindex.models.spots.phases import phases_from_spec
    from liveindex.models.spots.setup import check_setup
    from liveindex.models.spots.simulator import SimulatedSpotScan

    setup = check_setup({"kv": 200.0, "calibration": 0.03, "precession": 1.0, "scan_rotation": 0.0}, (128, 128))
    scan = SimulatedSpotScan((ny, nx), phases_from_spec("ferrite,austenite,cementite"), setup, noise="moderate",
                             seed=9)
    np.save(path, scan.render(0, scan.size).astype(np.uint16).reshape(ny, nx, 128, 128))
    return scan


def _check_spot_maps(maps, scan):
    """Every point in, in scan order: the crystalline points mostly of their own grain's phase."""
    crystal = scan.truth_phase >= 0
    assert (maps["phase_id"][crystal] == scan.truth_phase[crystal]).mean() > 0.8


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


# Issue 17's acceptance test: in the default run, though it takes about a minute.
def test_every_frame_of_a_merlin_stream_at_the_simulator_s_full_rate_is_indexed(tmp_path):
    pytest.importorskip("libertem_qd_mpx", reason="liveindex[detectors] (libertem-live) is not installed")
    scan = _spot_scan(tmp_path / "scan.npy")
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
        publish = run_cli("publish", "--detector", "merlin", "--port", data, *SPOTS, "--bind", disp_addr,
                          "--sink", sink_addr, "--scan-id", "merlin", "--page-size", 32, "--arm-timeout", 60,
                          timeout=300)
        assert publish.returncode == 0, publish.stderr
        assert "96 frames" in publish.stdout and "complete" in publish.stdout
        assert "Merlin acquisition: 96 frames of uint16 (128, 128), scan 12x8" in publish.stderr
        sink_out, _ = sink.communicate(timeout=120)
        summary = json.loads(sink_out.strip().splitlines()[-1])
        assert summary["status"] == "complete" and summary["received"] == 96 and summary["dropped_points"] == 0
        maps = np.load(out / "merlin_maps.npz")
        assert tuple(maps["nav_shape"]) == (8, 12)
        _check_spot_maps(maps, scan)
        # A live source's latent maps: the fixed basis (no frame to fit on before the scan_start).
        assert "a live source's embedding is the fixed basis" in publish.stderr
        embedding = np.load(out / "merlin_embedding.npy").astype(np.float32)
        assert summary["clusters"] and np.isfinite(embedding).all(axis=1).mean() > 0.9
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


def _records(path):
    data, at, out = path.read_bytes(), 0, []
    while at < len(data):
        (n,) = struct.unpack("<q", data[at:at + 8])
        out.append(data[at + 8:at + 8 + n])
        at += 8 + n
    return out


def test_the_simplon_dump_holds_the_frames_bitshuffle_lz4_compressed(tmp_path):
    """The recorded stream's messages in SIMPLON's order, and each frame's blob decompresses
    (through the bitshuffle filter, written back as a chunk) to the frame."""
    h5py = pytest.importorskip("h5py")
    hdf5plugin = pytest.importorskip("hdf5plugin", reason="liveindex[detectors] (libertem-live) is not installed")
    frames = np.random.default_rng(1).integers(0, 3000, (2, 3, 6, 5)).astype(np.uint16)
    records = _records(write_simplon_dump(frames, tmp_path / "scan.simplon", series=4))
    assert len(records) == 2 + 4 * 6 + 1
    assert json.loads(records[0]) == {"htype": "dheader-1.0", "header_detail": "basic", "series": 4}
    config = json.loads(records[1])
    assert (config["ntrigger"], config["x_pixels_in_detector"], config["y_pixels_in_detector"],
            config["bit_depth_image"]) == (6, 5, 6, 16)
    assert json.loads(records[-1])["htype"] == "dseries_end-1.0"
    with h5py.File(tmp_path / "check.h5", "w") as f:
        check = f.create_dataset("x", shape=(6, 6, 5), dtype=np.uint16, chunks=(1, 6, 5),
                                 **hdf5plugin.Bitshuffle(nelems=0, cname="lz4"))
        for i in range(6):
            image, image_d, blob, config_i = records[2 + 4 * i:6 + 4 * i]
            assert json.loads(image)["frame"] == i and json.loads(image_d)["encoding"] == "bs16-lz4<"
            assert json.loads(config_i)["htype"] == "dconfig-1.0"
            check.id.write_direct_chunk((i, 0, 0), blob)
        np.testing.assert_array_equal(check[...], frames.reshape(6, 6, 5))


# Issue 17's acceptance test: in the default run, though it takes about a minute.
def test_every_frame_of_a_dectris_stream_at_the_simulator_s_full_rate_is_indexed(tmp_path):
    pytest.importorskip("libertem_dectris", reason="liveindex[detectors] (libertem-live) is not installed")
    scan = _spot_scan(tmp_path / "scan.npy")
    (api,) = _free_ports(1)
    sink_addr, disp_addr = f"ipc://{tmp_path}/sink.sock", f"ipc://{tmp_path}/dispatch.sock"
    out = tmp_path / "out"
    sink = start_cli("sink", "--bind", sink_addr, "--out", out, "--http-port", "0", "--once")
    workers = [start_cli("worker", "--dispatcher", disp_addr, "--sink", sink_addr, "--name", f"w{i}") for i in range(2)]
    sim = start_cli("replay", tmp_path / "scan.npy", "--as", "dectris", "--control-port", api, "--folder",
                    tmp_path / "simplon")
    try:
        line = sim.stdout.readline()  # says where the stream is, once the simulator listens and is armed
        assert "DECTRIS stream of 96 frames on tcp://127.0.0.1:" in line, line + sim.stderr.read()
        port = int(line.split("tcp://127.0.0.1:")[1].split(",")[0])
        publish = run_cli("publish", "--detector", "dectris", "--port", port, "--scan-shape", "12x8", *SPOTS,
                          "--bind", disp_addr, "--sink", sink_addr, "--scan-id", "dectris", "--page-size", 32,
                          "--arm-timeout", 60, timeout=300)
        assert publish.returncode == 0, publish.stderr
        assert "96 frames" in publish.stdout and "complete" in publish.stdout
        assert "DECTRIS acquisition: 96 frames of uint16 (128, 128), scan 12x8" in publish.stderr
        sink_out, _ = sink.communicate(timeout=120)
        summary = json.loads(sink_out.strip().splitlines()[-1])
        assert summary["status"] == "complete" and summary["received"] == 96 and summary["dropped_points"] == 0
        _check_spot_maps(np.load(out / "dectris_maps.npz"), scan)
    finally:
        for p in [sim, sink, *workers]:
            p.terminate()
        for p in [sim, sink, *workers]:
            p.wait(30)


def test_a_timepix3_stream_s_sparse_frames_arrive_dense_and_whole(tmp_path):
    """libertem-live's own Timepix3 simulator (its mock acquisition: 4x5 points of 512x512,
    point i one event of value i at pixel i) received by the detector source the publisher uses."""
    pytest.importorskip("libertem_asi_tpx3", reason="liveindex[detectors] (libertem-live) is not installed")
    import argparse
    import subprocess
    import sys
    from pathlib import Path

    from liveindex.models import modality as modalities
    from liveindex.stream.detectors import open_detector

    (port,) = _free_ports(1)
    exe = Path(sys.executable).parent / "libertem-live-asi-tpx-sim"
    sim = subprocess.Popen([str(exe), "--mock-nav-shape", "4", "5", "--port", str(port)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(port)
        args = argparse.Namespace(pc=[0.425, 0.213, 0.501], pc_convention="bruker", tilt=None, phases="ni", step=None,
                                  scan_shape=None)
        source = open_detector("asi-tpx3", host="127.0.0.1", port=port, modality=modalities.load("ebsd"), args=args,
                               arm_timeout=30)
        try:
            assert source.nav_shape == (4, 5) and source.pattern_shape == (512, 512) and source.dtype == "uint32"
            while source.end_reason is None:
                source.arrived(1.0)
            assert source.end_reason == "" and source.arrived(0) == 20
            frames = source.read(0, 20)
            times = source.frame_times(0, 20)
        finally:
            source.close()
    finally:
        sim.terminate()
        sim.wait(30)
    flat = frames.reshape(20, -1)
    expected = np.zeros_like(flat)
    expected[np.arange(20), np.arange(20)] = np.arange(20)
    np.testing.assert_array_equal(flat, expected)
    assert np.isfinite(times).all()

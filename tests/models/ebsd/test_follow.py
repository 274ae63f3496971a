"""`liveindex publish --follow`: EBSD files read while the acquisition writes them.

The readers are checked on kikuchipy's own vendor files (NORDIF .dat, EDAX .up1/.up2, Oxford
.ebsp, the Oxford one with its records out of scan order) copied byte by byte as a writer
would: a frame counts only once its whole record is in the file, and reads back as kikuchipy
reads the finished file. The pipeline test runs the real commands: a NORDIF writer process
at 1000 frames/s, `liveindex publish --follow`, two workers and a sink on loopback ZeroMQ.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from liveindex.models.ebsd.growing_files import follow_file
from liveindex.models.errors import InputError
from tests.conftest import run_cli, start_cli

PC = (0.425, 0.213, 0.501)
SHIPPED = {"nordif/Pattern.dat": None, "edax_binary/edax_binary.up1": (1, 9), "edax_binary/edax_binary.up2": (1, 10),
           "oxford_binary/patterns.ebsp": None}


def kikuchipy_data() -> Path:
    import kikuchipy as kp

    return Path(kp.__file__).parent / "data"


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_a_vendor_file_followed_as_it_is_written_gives_only_whole_frames(name, tmp_path):
    import kikuchipy as kp

    original = kikuchipy_data() / name
    reference = np.asarray(kp.load(original).data)
    reference = reference.reshape(-1, *reference.shape[-2:])
    for extra in original.parent.iterdir():  # Setting.txt and the background beside a NORDIF file
        if extra.is_file() and extra != original:
            (tmp_path / extra.name).write_bytes(extra.read_bytes())
    data = original.read_bytes()
    finished = follow_file(original, pc=PC, scan_shape=SHIPPED[name], follow_timeout=30)
    layout = finished.growing.layout
    finished.close()
    # The header and the first record (an .ebsp header is read from its first record), then
    # the rest in pieces that cut records in the middle.
    start = layout.data_offset + layout.record_bytes
    growing = tmp_path / original.name
    growing.write_bytes(data[:start])
    source = follow_file(growing, pc=PC, scan_shape=SHIPPED[name], follow_timeout=30)
    scan_shape = source.nav_shape
    seen = 0
    with open(growing, "ab") as f:
        for cut in range(start, len(data), 1777):  # cuts fall inside frames
            f.write(data[cut:cut + 1777])
            f.flush()
            arrived = source.arrived(0.0)
            whole = (cut + len(data[cut:cut + 1777]) - layout.data_offset) // layout.record_bytes
            assert seen <= arrived <= whole  # never a frame whose record is not all there
            if arrived > seen:
                np.testing.assert_array_equal(source.read(seen, arrived - seen), reference[seen:arrived])
                seen = arrived
    assert source.arrived(0.0) == len(reference) and source.end_reason == ""
    assert int(np.prod(scan_shape)) == len(reference)
    source.close()


def test_a_file_that_stops_growing_ends_the_scan_with_the_reason(tmp_path):
    import kikuchipy as kp

    original = kikuchipy_data() / "nordif" / "Pattern.dat"
    for extra in original.parent.iterdir():
        (tmp_path / extra.name).write_bytes(extra.read_bytes())
    (tmp_path / "Pattern.dat").write_bytes(original.read_bytes()[:3600 * 4 + 1000])  # 4 frames and a torn one
    source = follow_file(tmp_path / "Pattern.dat", pc=PC, follow_timeout=0.3)
    t0 = time.monotonic()
    while source.end_reason is None and time.monotonic() - t0 < 5:
        source.arrived(0.1)
    assert source.arrived(0.0) == 4
    assert "stopped growing for 0.3 s" in source.end_reason and "at 4 of 9 frames" in source.end_reason
    reference = np.asarray(kp.load(original).data).reshape(-1, 60, 60)
    np.testing.assert_array_equal(source.read(0, 4), reference[:4])
    times = source.frame_times(0, 4)
    assert np.isfinite(times).all() and abs(times[0] - time.time()) < 10


def test_what_follow_cannot_read_is_named(tmp_path):
    (tmp_path / "scan.npy").write_bytes(b"")
    with pytest.raises(InputError, match="NORDIF .dat, EDAX .up1/.up2, Oxford .ebsp and h5ebsd written in SWMR mode"):
        follow_file(tmp_path / "scan.npy", pc=PC)
    with pytest.raises(InputError, match="does not exist"):
        follow_file(tmp_path / "Pattern.dat", pc=PC)
    (tmp_path / "Pattern.dat").write_bytes(b"")
    with pytest.raises(InputError, match="no Setting.txt"):
        follow_file(tmp_path / "Pattern.dat", pc=PC)
    (tmp_path / "v1.up1").write_bytes(np.array([1, 60, 60, 16], "<u4").tobytes())
    with pytest.raises(InputError, match="--scan-shape WxH"):
        follow_file(tmp_path / "v1.up1", pc=PC)
    (tmp_path / "empty.up1").write_bytes(b"")
    with pytest.raises(InputError, match="header .* is not written yet after --follow-timeout"):
        follow_file(tmp_path / "empty.up1", pc=PC, follow_timeout=0.2)


@pytest.fixture(scope="module")
def nordif_scan(tmp_path_factory):
    """A simulated 16x12 Ni scan as (ny, nx, 60, 60) uint8 frames, for the writer."""
    from liveindex.models.ebsd.simulator import SimulatedScan

    scan = SimulatedScan((12, 16), noise="moderate", seed=5)
    path = tmp_path_factory.mktemp("nordif") / "frames.npy"
    np.save(path, scan.render(0, scan.size).reshape(12, 16, 60, 60))
    return path


def start_writer(frames, folder, *options):
    return subprocess.Popen([sys.executable, "-m", "liveindex.models.ebsd.nordif_writer", str(frames), str(folder),
                             *map(str, options)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# Issue 17's acceptance test: in the default run, though it takes about a minute.
def test_publish_follow_indexes_every_frame_a_writer_appends_and_ends_partial_when_it_stops(tmp_path, nordif_scan):
    sink_addr, disp_addr = f"ipc://{tmp_path}/sink.sock", f"ipc://{tmp_path}/dispatch.sock"
    out = tmp_path / "out"
    sink = start_cli("sink", "--bind", sink_addr, "--out", out, "--http-port", "0")
    workers = [start_cli("worker", "--dispatcher", disp_addr, "--sink", sink_addr, "--name", f"w{i}") for i in range(2)]
    common = ("--pc", *PC, "--bind", disp_addr, "--sink", sink_addr, "--page-size", 32)
    try:
        # A whole scan written at 1000 frames/s, every tenth frame in two halves 20 ms apart (torn).
        subprocess.run([sys.executable, "-m", "liveindex.models.ebsd.nordif_writer", str(nordif_scan), str(tmp_path / "a"),
                        "--stop-after", "0"], check=True)  # Setting.txt and an empty Pattern.dat
        publish = start_cli("publish", "--follow", tmp_path / "a" / "Pattern.dat", "--follow-timeout", 60, *common,
                            "--scan-id", "whole")
        log = _wait_for_line(publish, "scan whole: 192 frames")  # following the file: now the writer starts
        writer = start_writer(nordif_scan, tmp_path / "a", "--rate", 1000, "--torn")
        assert writer.wait(60) == 0, writer.stderr.read()
        stdout, stderr = publish.communicate(timeout=300)
        publish.stdout, publish.stderr = stdout, log + stderr
        assert publish.returncode == 0, publish.stderr
        assert "192 frames" in publish.stdout and "complete" in publish.stdout
        summary = _summary(out / "whole.json")
        assert summary["status"] == "complete" and summary["received"] == 192 and summary["missing"] == 0
        maps = np.load(out / "whole_maps.npz")
        assert (maps["phase_id"] == 0).all()  # every frame indexed as the scan's Ni
        # An acquisition cut short: 100 of 192 frames, then nothing; ends partial, never "success".
        subprocess.run([sys.executable, "-m", "liveindex.models.ebsd.nordif_writer", str(nordif_scan), str(tmp_path / "b"),
                        "--stop-after", "0"], check=True)
        writer = start_writer(nordif_scan, tmp_path / "b", "--rate", 1000, "--stop-after", 100)
        publish = run_cli("publish", "--follow", tmp_path / "b" / "Pattern.dat", "--follow-timeout", 2, *common,
                          "--scan-id", "cut", timeout=300)
        assert writer.wait(60) == 0
        assert publish.returncode == 3, publish.stderr
        assert "partial (Pattern.dat stopped growing for 2 s (--follow-timeout) at 100 of 192 frames)" in publish.stdout
        summary = _summary(out / "cut.json")
        assert summary["status"] == "partial" and summary["received"] == 100
        assert "the acquisition ended after 100 frames: Pattern.dat stopped growing" in summary["reason"]
    finally:
        for p in [sink, *workers]:
            p.terminate()
        for p in [sink, *workers]:
            p.wait(20)


def _wait_for_line(process, text: str, timeout: float = 120) -> str:
    """Read ``process``'s stderr until a line holds ``text``; returns what was read."""
    lines, t0 = [], time.monotonic()
    while time.monotonic() - t0 < timeout:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return "".join(lines)
    raise AssertionError(f"no line with {text!r} from the process:\n{''.join(lines)}")


def _summary(path: Path, timeout: float = 60) -> dict:
    """The sink's summary of a finished scan (written when its files are)."""
    t0 = time.monotonic()
    while not path.exists() and time.monotonic() - t0 < timeout:
        time.sleep(0.2)
    return json.loads(path.read_text())

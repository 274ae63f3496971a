"""`liveindex publish --follow X.h5`: h5ebsd files appended in HDF5's SWMR mode.

A writer process (models/ebsd/h5ebsd_writer.py) appends frames to a kikuchipy, Bruker or EDAX
h5ebsd file in SWMR mode at a set rate while the source reads them; the finished file must
read back in kikuchipy as the same frames (the writer's layouts are the ones kikuchipy reads).
A file open for writing without SWMR is refused in one line that names the fix.
"""

import subprocess
import sys
import time

import numpy as np
import pytest

from liveindex.models.ebsd.growing_files import follow_file
from liveindex.models.errors import InputError
from tests.conftest import run_cli, start_cli
from tests.models.ebsd.test_follow import _summary, _wait_for_line

PC = (0.425, 0.213, 0.501)


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    """A (6, 8, 30, 40) uint8 scan whose every frame differs (its index in the first pixels)."""
    rng = np.random.default_rng(3)
    scan = rng.integers(0, 255, (6, 8, 30, 40), dtype=np.uint8)
    scan.reshape(48, -1)[:, 0] = np.arange(48)
    path = tmp_path_factory.mktemp("h5") / "frames.npy"
    np.save(path, scan)
    return path


def start_writer(frames, path, *options):
    return subprocess.Popen([sys.executable, "-m", "liveindex.models.ebsd.h5ebsd_writer", str(frames), str(path),
                             *map(str, options)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_file(path, writer, timeout=30):
    t0 = time.monotonic()
    while not path.exists() and time.monotonic() - t0 < timeout:
        assert writer.poll() is None, writer.stderr.read()
        time.sleep(0.01)


@pytest.mark.parametrize("layout", ["kikuchipy", "bruker", "edax"])
def test_an_h5ebsd_file_appended_in_swmr_mode_is_read_frame_by_frame_in_order(layout, frames, tmp_path):
    import kikuchipy as kp

    reference = np.load(frames).reshape(48, 30, 40)
    path = tmp_path / "scan.h5"
    writer = start_writer(frames, path, "--layout", layout, "--rate", 100, "--start-delay", 0.5)
    wait_for_file(path, writer)
    source = follow_file(path, pc=None, follow_timeout=30)  # the PC from the header
    assert source.nav_shape == (6, 8) and source.pattern_shape == (30, 40)
    assert np.allclose(source.geometry.pc, PC, atol=1e-4)
    assert source.file_setup.step == (1.5, 1.5) and source.file_setup.sample_tilt == 70.0
    seen, counts = 0, set()
    while source.end_reason is None:
        arrived = source.arrived(0.5)
        counts.add(arrived)
        if arrived > seen:
            np.testing.assert_array_equal(source.read(seen, arrived - seen), reference[seen:arrived])
            seen = arrived
    assert writer.wait(30) == 0, writer.stderr.read()
    assert source.end_reason == "" and seen == 48
    assert len(counts) > 5  # read while it grew, not once it was finished
    assert np.isfinite(source.frame_times(0, 48)).all()
    source.close()
    finished = kp.load(path)  # the writer's layout is one kikuchipy reads
    np.testing.assert_array_equal(np.asarray(finished.data).reshape(48, 30, 40), reference)
    assert np.allclose(finished.detector.pc_average, PC, atol=1e-4)


def test_an_acquisition_cut_short_ends_partial_with_the_reason(frames, tmp_path):
    path = tmp_path / "scan.h5"
    writer = start_writer(frames, path, "--rate", 500, "--stop-after", 20, "--hold", 3)
    wait_for_file(path, writer)
    source = follow_file(path, follow_timeout=0.5)
    t0 = time.monotonic()
    while source.end_reason is None and time.monotonic() - t0 < 10:
        source.arrived(0.1)
    assert source.arrived(0.0) == 20
    assert "scan.h5 stopped growing for 0.5 s (--follow-timeout) at 20 of 48 frames" in source.end_reason
    np.testing.assert_array_equal(source.read(0, 20), np.load(frames).reshape(48, 30, 40)[:20])
    source.close()
    assert writer.wait(30) == 0


def test_an_h5ebsd_file_written_without_swmr_is_refused_with_the_fix(frames, tmp_path):
    path = tmp_path / "scan.h5"
    writer = start_writer(frames, path, "--no-swmr", "--rate", 100, "--hold", 5)
    wait_for_file(path, writer)
    time.sleep(0.3)  # the header written
    with pytest.raises(InputError) as error:
        follow_file(path, pc=PC, follow_timeout=2)
    message = str(error.value)
    assert "without HDF5's SWMR mode" in message and f"liveindex publish --file {path}" in message
    assert "\n" not in message
    writer.kill()
    writer.wait(10)


@pytest.mark.slow
def test_publish_follow_indexes_an_h5ebsd_file_a_writer_appends(tmp_path):
    from liveindex.models.ebsd.simulator import SimulatedScan

    scan = SimulatedScan((12, 16), noise="moderate", seed=5)
    frames = tmp_path / "frames.npy"
    np.save(frames, scan.render(0, scan.size).reshape(12, 16, 60, 60))
    sink_addr, disp_addr = f"ipc://{tmp_path}/sink.sock", f"ipc://{tmp_path}/dispatch.sock"
    out = tmp_path / "out"
    sink = start_cli("sink", "--bind", sink_addr, "--out", out, "--http-port", "0")
    workers = [start_cli("worker", "--dispatcher", disp_addr, "--sink", sink_addr, "--name", f"w{i}") for i in range(2)]
    try:
        path = tmp_path / "scan.h5"
        writer = start_writer(frames, path, "--rate", 1000, "--start-delay", 3)
        wait_for_file(path, writer)
        publish = start_cli("publish", "--follow", path, "--follow-timeout", 60, "--bind", disp_addr,
                            "--sink", sink_addr, "--page-size", 32, "--scan-id", "h5")  # PC from the header
        log = _wait_for_line(publish, "scan h5: 192 frames")
        assert writer.wait(60) == 0, writer.stderr.read()
        stdout, stderr = publish.communicate(timeout=300)
        assert publish.returncode == 0, log + stderr
        assert "192 frames" in stdout and "complete" in stdout
        summary = _summary(out / "h5.json")
        assert summary["status"] == "complete" and summary["received"] == 192 and summary["missing"] == 0
        assert (np.load(out / "h5_maps.npz")["phase_id"] == 0).all()
        # The same file, finished and closed: followed to its end at once.
        again = run_cli("publish", "--follow", path, "--follow-timeout", 5, "--bind", disp_addr, "--sink", sink_addr,
                        "--scan-id", "h5again", timeout=300)
        assert again.returncode == 0, again.stderr
    finally:
        for p in [sink, *workers]:
            p.terminate()
        for p in [sink, *workers]:
            p.wait(20)


def test_a_bruker_region_of_interest_out_of_scan_order_is_refused_and_one_in_order_read(tmp_path):
    from liveindex.models.ebsd.h5ebsd_writer import create

    for order in ("rows", "columns"):
        path = tmp_path / f"{order}.h5"
        file, dataset = create(path, (3, 4), (20, 20), layout="bruker", swmr=False)
        iy, ix = np.divmod(np.arange(12), 4) if order == "rows" else np.divmod(np.arange(12), 3)[::-1]
        file.create_dataset("Scan 0/EBSD/SEM/IY", data=iy + 5)  # a region of interest away from the corner
        file.create_dataset("Scan 0/EBSD/SEM/IX", data=ix + 2)
        dataset.resize(12, axis=0)
        dataset[:] = np.arange(12, dtype=np.uint8)[:, None, None]
        file.close()
        if order == "columns":
            with pytest.raises(InputError, match=r"out of scan order.*liveindex publish --file"):
                follow_file(path, follow_timeout=1)
            continue
        source = follow_file(path, follow_timeout=1)  # a closed file: every frame at once, complete
        assert source.arrived(0.0) == 12 and source.end_reason == ""
        np.testing.assert_array_equal(source.read(0, 12)[:, 0, 0], np.arange(12))
        source.close()


WRITE_AHEAD = """
import sys, time, numpy as np
from liveindex.models.ebsd.h5ebsd_writer import create
file, dataset = create(sys.argv[1], (2, 4), (20, 20))
dataset.resize(5, axis=0)  # the extent of 5 frames on disk, only 3 written
dataset[:3] = np.arange(1, 4, dtype=np.uint8)[:, None, None]
file.flush()
print("flushed", flush=True)
sys.stdin.readline()
dataset[3:5] = np.arange(4, 6, dtype=np.uint8)[:, None, None]
dataset.resize(8, axis=0)
dataset[5:8] = np.arange(6, 9, dtype=np.uint8)[:, None, None]
file.flush()
file.close()
"""


def test_frames_inside_the_extent_whose_chunks_are_not_written_are_waited_for(tmp_path):
    path = tmp_path / "scan.h5"
    writer = subprocess.Popen([sys.executable, "-c", WRITE_AHEAD, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "flushed", writer.stderr.read()
    source = follow_file(path, pc=PC, follow_timeout=10)
    assert source.arrived(0.1) == 3  # frames 3 and 4 are inside the extent but not on disk: never fill values
    np.testing.assert_array_equal(source.read(0, 3)[:, 0, 0], [1, 2, 3])
    writer.stdin.write("\n")
    writer.stdin.flush()
    assert writer.wait(30) == 0, writer.stderr.read()
    assert source.arrived(1.0) == 8 and source.end_reason == ""
    np.testing.assert_array_equal(source.read(3, 5)[:, 0, 0], [4, 5, 6, 7, 8])
    source.close()

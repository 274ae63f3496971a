"""`liveindex index` on saved scans, and clear one-line errors for bad input."""

import time

import numpy as np
import pytest
from orix import io as orix_io

from ..conftest import disorientation, error_lines, run_cli


@pytest.mark.slow
def test_index_npy_file_is_accurate(tmp_path, moderate_scan):
    path = tmp_path / "scan.npy"
    np.save(path, moderate_scan.render(0, moderate_scan.size).reshape(20, 20, 60, 60))
    proc = run_cli("index", path, "--out", tmp_path / "result.h5", "--step", "0.5", "0.25")
    assert proc.returncode == 0, proc.stderr
    xmap = orix_io.load(tmp_path / "result.h5")
    assert xmap.shape == (20, 20)
    assert (xmap.dy, xmap.dx) == (0.25, 0.5)  # --step DX DY, micrometres
    assert np.median(disorientation(xmap.rotations.data, moderate_scan.truth)) < 2.5
    assert (tmp_path / "result.ang").exists() and (tmp_path / "result_ipf.png").exists()


@pytest.mark.slow
def test_index_kikuchipy_written_file(tmp_path):
    import kikuchipy as kp

    signal = kp.data.nickel_ebsd_small()
    path = tmp_path / "ni_small.h5"
    signal.save(path)
    proc = run_cli("index", path, "--out", tmp_path / "ni.ang")
    assert proc.returncode == 0, proc.stderr
    xmap = orix_io.load(tmp_path / "ni.ang")
    assert xmap.shape == (3, 3)
    assert (xmap.phase_id >= 0).all()
    # The file's own detector and working distance reach the .ang header (PC in the TSL
    # convention), the .ctf and kikuchipy's detector file.
    header = {w[1]: w[2:] for w in (line.split() for line in (tmp_path / "ni.ang").read_text().splitlines())
              if w[:1] == ["#"] and len(w) > 2}
    np.testing.assert_allclose([float(header[k][0]) for k in ("x-star", "y-star", "z-star")],
                               signal.detector.pc_tsl().reshape(-1, 3).mean(axis=0), atol=1e-6)  # liveindex: the mean PC
    assert float(header["WorkingDistance"][0]) == pytest.approx(24.7)
    assert (orix_io.load(tmp_path / "ni.ctf").phase_id >= 0).all()
    detector = kp.detectors.EBSDDetector.load(tmp_path / "ni_detector.txt")
    np.testing.assert_allclose(detector.pc_average, signal.detector.pc_average, atol=1e-6)
    assert (xmap.prop["iq"] > 0).all()
    # On real patterns, liveindex (matching at 30x30, then refining) must land where
    # kikuchipy's dictionary indexing at 60x60 followed by its own refinement lands.
    reference = _kikuchipy_refined_indexing(signal)
    assert np.median(disorientation(xmap.rotations.data, reference)) < 0.5


def _kikuchipy_refined_indexing(signal):
    import kikuchipy as kp
    from orix.sampling import get_sample_fundamental

    mp = kp.data.nickel_ebsd_master_pattern_small(projection="lambert", hemisphere="upper")
    rotations = get_sample_fundamental(resolution=3, point_group=mp.phase.point_group, method="cubochoric")
    detector = kp.detectors.EBSDDetector(shape=(60, 60), pc=signal.detector.pc_average, sample_tilt=70)
    simulated = mp.get_patterns(rotations, detector, energy=20)
    corrected = signal.deepcopy()
    corrected.remove_static_background(show_progressbar=False)
    corrected.remove_dynamic_background(show_progressbar=False)
    xmap = corrected.dictionary_indexing(simulated, keep_n=20)  # keep_n=1 trips refine_orientation (kikuchipy 0.11)
    refined = corrected.refine_orientation(xmap, detector, mp, energy=20)
    return refined.rotations.data.reshape(-1, 4)


def _assert_one_line_error(proc, *words):
    assert proc.returncode == 2, proc.stderr
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0]
    assert "Traceback" not in proc.stderr


def test_npy_of_wrong_rank(tmp_path):
    path = tmp_path / "flat.npy"
    np.save(path, np.zeros((10, 3600), np.uint8))
    _assert_one_line_error(run_cli("index", path), "rank 2", "(N, H, W) or (ny, nx, H, W)", "reshape")


def test_npy_with_nans(tmp_path):
    path = tmp_path / "nan.npy"
    a = np.ones((4, 60, 60), np.float32)
    a[1, 2, 3] = np.nan
    np.save(path, a)
    _assert_one_line_error(run_cli("index", path), "1 NaN or infinite", "nan_to_num")


def test_npy_of_complex_numbers(tmp_path):
    path = tmp_path / "complex.npy"
    np.save(path, np.ones((4, 60, 60), np.complex64))
    _assert_one_line_error(run_cli("index", path), "dtype complex64", "real numbers", "astype")


def test_pc_outside_unit_interval(tmp_path):
    path = tmp_path / "ok.npy"
    np.save(path, np.ones((4, 60, 60), np.uint8))
    _assert_one_line_error(run_cli("index", path, "--pc", "0.4", "1.3", "0.5"), "outside (0, 1)", "--pc-convention")


def test_missing_file(tmp_path):
    _assert_one_line_error(run_cli("index", tmp_path / "nope.npy"), "does not exist")


def test_unreadable_file(tmp_path):
    path = tmp_path / "junk.h5"
    path.write_bytes(b"not a pattern file")
    _assert_one_line_error(run_cli("index", path), "cannot read", "kikuchipy reads")


def test_publisher_with_unreachable_sink_says_so_and_exits():
    t0 = time.monotonic()
    proc = run_cli("publish", "--simulate", "4x4", "--bind", "tcp://127.0.0.1:0", "--sink", "tcp://127.0.0.1:9",
                   "--sink-timeout", "1", timeout=60)
    _assert_one_line_error(proc, "sink at tcp://127.0.0.1:9", "liveindex sink")
    assert time.monotonic() - t0 < 50


def test_worker_with_unreachable_dispatcher_says_so_and_exits():
    proc = run_cli("worker", "--dispatcher", "tcp://127.0.0.1:9", "--sink", "tcp://127.0.0.1:10",
                   "--connect-timeout", "1", timeout=60)
    _assert_one_line_error(proc, "cannot reach the dispatcher at tcp://127.0.0.1:9")


def test_malformed_address():
    proc = run_cli("worker", "--dispatcher", "tcp://no-port-here", "--connect-timeout", "1", timeout=60)
    _assert_one_line_error(proc, "tcp://no-port-here", "tcp://127.0.0.1:5555")


def test_unknown_phase():
    proc = run_cli("publish", "--simulate", "4x4", "--phases", "unobtainium", timeout=60)
    _assert_one_line_error(proc, "unknown phase 'unobtainium'", "neither built in", "CIF")


def test_keys_are_made_once_and_never_overwritten_and_a_missing_key_folder_is_named(tmp_path):
    first = run_cli("keys", tmp_path / "k", timeout=60)
    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == [
        "client.key", "client.key_secret", "server.key", "server.key_secret"]
    assert oct((tmp_path / "k" / "server.key_secret").stat().st_mode)[-3:] == "600"
    again = run_cli("keys", tmp_path / "k", timeout=60)
    _assert_one_line_error(again, "never overwritten")
    missing = run_cli("sink", "--keys", tmp_path / "nowhere", "--http-port", "0", "--once", timeout=60)
    _assert_one_line_error(missing, "does not exist", "liveindex keys")


def test_signal_mask_of_the_wrong_shape_or_kind(tmp_path):
    path = tmp_path / "scan.npy"
    np.save(path, np.ones((4, 60, 60), np.uint8))
    np.save(tmp_path / "small.npy", np.ones((30, 30), bool))
    _assert_one_line_error(run_cli("index", path, "--signal-mask", tmp_path / "small.npy"),
                           "signal mask is 30x30 but the patterns are 60x60", "binning")
    np.save(tmp_path / "grey.npy", np.full((60, 60), 0.5))
    _assert_one_line_error(run_cli("index", path, "--signal-mask", tmp_path / "grey.npy"),
                           "booleans", "True where the pattern is")


def test_an_unknown_modality_is_named_with_those_known():
    proc = run_cli("publish", "--modality", "xrd", "--simulate", "4x4", timeout=60)
    _assert_one_line_error(proc, "unknown modality 'xrd'", "ebsd")


def test_index_under_another_modality_writes_its_declared_fields(tmp_path):
    """`liveindex index --modality fake`: the test modality's own fields, hexagonal phase included."""
    from orix.quaternion import Orientation, symmetry

    from ..fake_modality import FakeModality, FakeSource

    source = FakeSource(FakeModality(), (5, 8), seed=2)
    np.save(tmp_path / "fake.npy", source.read(0, source.size).reshape(5, 8, 16, 16))
    proc = run_cli("index", tmp_path / "fake.npy", "--modality", "fake", "--out", tmp_path / "out.h5", timeout=120)
    assert proc.returncode == 0, proc.stderr
    xmap = orix_io.load(tmp_path / "out.h5")
    assert xmap.shape == (5, 8) and set(xmap.prop) >= {"confidence", "method", "iq", "fit", "kam"}
    np.testing.assert_array_equal(xmap.phase_id, source.truth["phase_id"])
    hexagonal = source.truth["phase_id"] == 1
    angle = Orientation(xmap.rotations.data[hexagonal], symmetry.D6h).angle_with(
        Orientation(source.truth["quaternion"][hexagonal], symmetry.D6h), degrees=True)
    assert angle.max() < 0.1
    assert np.load(tmp_path / "out_maps.npz")["embedding"].shape == (40, 3)


def test_a_bad_clusters_option_is_one_line_naming_the_fix(tmp_path):
    _assert_one_line_error(run_cli("sink", "--clusters", "1", "--out", tmp_path, "--http-port", "0", timeout=60),
                           "--clusters '1'", "auto or a number of clusters")

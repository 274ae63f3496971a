"""EBSD's part of the vendor files: the PC in the TSL, Oxford and EMsoft conventions (against
kikuchipy's EBSDDetector), the image quality (against kikuchipy's get_image_quality), the fit
field, and an EBSD scan written and read back: the .ang header's PC and working distance,
the lattices in angstrom, the detector in the HDF5 file and kikuchipy's detector file."""

import h5py
import kikuchipy as kp
import numpy as np
import pytest
from orix import io as orix_io

from liveindex.models import modality as modalities
from liveindex.models.ebsd.conventions import pc_in_convention
from liveindex.models.ebsd.files import array_source, load_file
from liveindex.models.ebsd.geometry import DetectorGeometry
from liveindex.models.ebsd.modality import fit_from_score
from liveindex.models.ebsd.quality import image_quality
from liveindex.models.ebsd.results import METHOD_CODE
from liveindex.models.modality import empty_results
from liveindex.stream.protocol import ScanStart
from liveindex.stream.writers import write_outputs


@pytest.mark.parametrize("shape, pc, binning", [((60, 60), (0.425, 0.213, 0.501), 1),
                                                ((48, 64), (0.52, 0.31, 0.62), 4),
                                                ((70, 50), (0.4, 0.25, 0.55), 2)])
def test_pc_conventions_match_kikuchipy(shape, pc, binning):
    detector = kp.detectors.EBSDDetector(shape=shape, pc=pc, binning=binning, px_size=70.0)
    expected = {"tsl": detector.pc_tsl(), "oxford": detector.pc_oxford(), "emsoft": detector.pc_emsoft(),
                "bruker": detector.pc}
    for convention, theirs in expected.items():
        ours = pc_in_convention(pc, shape, convention, binning=binning, px_size=70.0)
        np.testing.assert_allclose(ours, np.ravel(theirs), rtol=1e-9, atol=1e-12, err_msg=convention)
    # And back: a geometry made from the TSL PC has the Bruker one.
    back = DetectorGeometry.from_convention(pc_in_convention(pc, shape, "tsl"), "tsl", pattern_shape=shape)
    np.testing.assert_allclose(back.pc, pc, atol=1e-9)


def test_image_quality_is_kikuchipys():
    from kikuchipy.pattern import get_image_quality

    scan = kp.data.nickel_ebsd_small()
    rng = np.random.default_rng(2)
    frames = [np.asarray(scan.data).reshape(-1, 60, 60),
              rng.integers(0, 4000, (5, 61, 47)).astype(np.uint16),  # odd and even sides
              rng.normal(size=(3, 16, 16)).astype(np.float32)]
    for batch in frames:
        theirs = [get_image_quality(f.astype(np.float32)) for f in batch]
        np.testing.assert_allclose(image_quality(batch), theirs, atol=2e-6)
    assert image_quality(np.full((2, 8, 8), 7, np.uint8)).tolist() == [0.0, 0.0]  # a flat frame: no spectrum
    # Sharper patterns score higher: the real Ni patterns against the same with noise added.
    clean = np.asarray(scan.data, np.float32).reshape(-1, 60, 60)
    noisy = clean + rng.normal(0, clean.std(), clean.shape)
    assert (image_quality(clean) > image_quality(noisy)).all()


def test_fit_is_one_minus_the_ncc_where_the_method_has_one():
    fields = {"phase_id": np.array([0, 0, 0, -1, 0], np.int16),
              "method": np.array([METHOD_CODE[m] for m in ("tm+refined", "nn+refined", "nn", "none", "tm")], np.uint8),
              "score": np.array([0.8, 0.6, 0.97, 0.0, 0.3], np.float32)}
    np.testing.assert_allclose(fit_from_score(fields), [0.2, 0.4, np.nan, np.nan, 0.7], atol=1e-6)


def _ebsd_scan(tmp_path, geometry, phases=("ni", "fe"), nav=(3, 4)):
    """An EBSD scan_start and a map of answers (no indexing: the writers are under test)."""
    patterns = np.zeros((*nav, *geometry.pattern_shape), np.uint8)
    source = array_source(patterns, geometry=geometry, phases=phases, step=(0.5, 0.25), name="scan")
    start = ScanStart.from_header({"scan": "ebsd", **source.scan_start()})
    n = source.size
    maps = empty_results(start.fields, n)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((n, 4))
    maps["quaternion"][:] = q / np.linalg.norm(q, axis=1, keepdims=True)
    maps["phase_id"][:] = np.arange(n) % len(phases)
    maps["phase_id"][1] = -1
    maps["iq"][:] = rng.uniform(0.05, 0.3, n)
    maps["score"][:] = 0.7
    maps["method"][:] = METHOD_CODE["tm+refined"]
    maps["fit"][:] = fit_from_score(maps)
    write_outputs(tmp_path, "ebsd", maps=maps, start=start, summary={"status": "complete"})
    return start, maps


def test_an_ebsd_scan_writes_its_pc_working_distance_and_lattices(tmp_path):
    geometry = DetectorGeometry(pattern_shape=(48, 64), pc=(0.52, 0.31, 0.62), sample_tilt=69.5, tilt=2.0,
                                binning=2, working_distance_mm=17.3)
    start, maps = _ebsd_scan(tmp_path, geometry)
    detector = geometry.kikuchipy_detector()
    header = [line.split() for line in (tmp_path / "ebsd.ang").read_text().splitlines() if line.startswith("#")]
    values = {words[1]: words[2:] for words in header if len(words) > 2}
    np.testing.assert_allclose([float(values[k][0]) for k in ("x-star", "y-star", "z-star")],
                               np.ravel(detector.pc_tsl()), atol=1e-6)
    assert float(values["WorkingDistance"][0]) == pytest.approx(17.3)
    lattices = [[float(v) for v in words[2:]] for words in header if words[1:2] == ["LatticeConstants"]]
    assert sorted(lattice[0] for lattice in lattices) == pytest.approx([2.8665, 3.5236], abs=1e-3)  # angstrom, both
    assert sum(words[1:2] == ["hklFamilies"] for words in header) >= 8

    xmap = orix_io.load(tmp_path / "ebsd.ang")
    assert xmap.shape == (3, 4) and xmap.dx == pytest.approx(0.25) and xmap.dy == pytest.approx(0.5)
    np.testing.assert_allclose(xmap.prop["iq"], maps["iq"], atol=1e-5)
    indexed = maps["phase_id"] >= 0
    np.testing.assert_allclose(xmap.prop["fit"][indexed], 0.3, atol=1e-4)

    ctf = (tmp_path / "ebsd.ctf").read_text().splitlines()
    pairs = dict(zip(ctf[11].split("\t")[1::2], ctf[11].split("\t")[2::2]))
    assert float(pairs["TiltAngle"]) == pytest.approx(69.5) and float(pairs["KV"]) == 20.0
    assert float(pairs["WorkingDistance"]) == pytest.approx(17.3)
    assert orix_io.load(tmp_path / "ebsd.ctf").phases[1].space_group.number == 225

    with h5py.File(tmp_path / "ebsd.h5", "r") as f:
        attrs = dict(f["detector"].attrs)
    np.testing.assert_allclose(attrs["pc_bruker"], geometry.pc)
    np.testing.assert_allclose(attrs["pc_oxford"], np.ravel(detector.pc_oxford()), atol=1e-9)
    np.testing.assert_allclose(attrs["pattern_shape"], (48, 64))
    assert attrs["sample_tilt_deg"] == 69.5 and attrs["working_distance_mm"] == pytest.approx(17.3)
    # kikuchipy reads the detector back from its own text format.
    loaded = kp.detectors.EBSDDetector.load(tmp_path / "ebsd_detector.txt")
    np.testing.assert_allclose(loaded.pc_average, geometry.pc, atol=1e-7)
    assert loaded.shape == (48, 64) and loaded.sample_tilt == 69.5 and loaded.tilt == 2.0 and loaded.binning == 2


def test_without_a_known_working_distance_the_header_says_zero(tmp_path):
    _ebsd_scan(tmp_path, DetectorGeometry(), phases=("ni",))
    header = [line.split() for line in (tmp_path / "ebsd.ang").read_text().splitlines() if line.startswith("#")]
    assert [w[2] for w in header if w[1:2] == ["WorkingDistance"]] == ["0.000000"]
    with h5py.File(tmp_path / "ebsd.h5", "r") as f:
        assert "working_distance_mm" not in f["detector"].attrs


def test_a_kikuchipy_file_brings_its_working_distance(tmp_path):
    path = tmp_path / "ni_small.h5"
    kp.data.nickel_ebsd_small().save(path)
    source = load_file(path)
    assert source.setup["working_distance_mm"] == pytest.approx(24.7)
    rows = dict(modalities.load("ebsd").describe_setup(source.setup))
    assert rows["working distance"] == "24.7 mm"

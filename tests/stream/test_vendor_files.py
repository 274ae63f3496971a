"""The finished scan's vendor files, written through the sink on the test modality (a cubic and
a hexagonal phase), read back with orix and checked against the header and column layouts
of real OIM (.ang) and AZtec (.ctf) files as orix's readers and their tests document them;
the orix HDF5 with its detector group and the phases' structures; the IQ and KAM maps."""

import logging
import threading

import h5py
import numpy as np
import pytest
import zmq
from orix import io as orix_io
from orix.quaternion import Orientation, Rotation, symmetry

from liveindex.models.crystal import PhaseRecord, quaternion_conjugate, quaternion_multiply
from liveindex.stream.orientation_map import kernel_average_misorientation
from liveindex.stream.protocol import ScanStart, decode, encode
from liveindex.stream.sink import Sink
from liveindex.stream.vendor_files import orientations_from_ctf
from liveindex.stream.writers import write_outputs

from ..conftest import scan_start_message
from ..fake_modality import EXPORT_PC_TSL, PHASES, FakeModality, FakeSource

NAV = (5, 7)
NOT_INDEXED = (3, 11, 20)


def _rotation_angle_deg(a, b):
    """Angle of the rotation between two (N, 4) quaternion sets, without crystal symmetry
    (by atan2: arccos of a dot product near 1 loses the small angles to float32 rounding)."""
    d = quaternion_multiply(quaternion_conjugate(np.asarray(a, np.float64)), np.asarray(b, np.float64))
    return np.degrees(2 * np.arctan2(np.linalg.norm(d[:, 1:], axis=1), np.abs(d[:, 0])))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A two-phase scan through the sink; three points not indexed."""
    out = tmp_path_factory.mktemp("vendor")
    n = NAV[0] * NAV[1]
    truth = decode(scan_start_message("vend", NAV, truth=True)).arrays
    q, phase_id = truth["truth_quaternion"].copy(), truth["truth_phase_id"].copy()
    phase_id[list(NOT_INDEXED)] = -1
    rng = np.random.default_rng(4)
    iq = rng.uniform(0.2, 0.9, n).astype(np.float32)
    fit = np.where(phase_id >= 0, rng.uniform(0.05, 0.6, n), np.nan).astype(np.float32)
    confidence = np.where(phase_id >= 0, rng.uniform(0.5, 1.0, n), 0.0).astype(np.float32)
    sink = Sink(out_dir=out, http_port=0, max_scans=1, finish_timeout=1.0)
    thread = threading.Thread(target=sink.run, daemon=True)
    thread.start()
    push = zmq.Context.instance().socket(zmq.DEALER)
    push.connect(sink.endpoint)
    try:
        push.send_multipart(scan_start_message("vend", NAV, truth=True))
        push.send_multipart(encode("results", {"scan": "vend", "first": 0, "count": n, "worker": "w", "timings": {}},
                                   {"indices": np.arange(n, dtype=np.int64), "phase_id": phase_id,
                                    "quaternion": q, "confidence": confidence,
                                    "method": np.where(phase_id >= 0, 0, 1).astype(np.uint8), "iq": iq, "fit": fit,
                                    "embedding": np.ones((n, 3), np.float32)}))
        thread.join(30)
        assert not thread.is_alive()
        summary = sink.finished[0]
    finally:
        sink.close()
        push.close(linger=0)
    return {"out": out, "q": q, "phase_id": phase_id, "iq": iq, "fit": fit, "confidence": confidence,
            "summary": summary}


def _ang_header(path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.startswith("#")]


def test_the_ang_header_has_the_pc_working_distance_lattices_and_hkl_families(written):
    header = _ang_header(written["out"] / "vend.ang")
    values = {line.split()[1]: line.split()[2:] for line in header if len(line.split()) > 2}
    # The fake modality's export_header: PC in the TSL convention, working distance 10 * gain.
    np.testing.assert_allclose([float(values[k][0]) for k in ("x-star", "y-star", "z-star")], EXPORT_PC_TSL)
    assert float(values["WorkingDistance"][0]) == 10.0
    blocks = "\n".join(header).split("# Phase ")[1:]
    assert [b.split("\n")[0] for b in blocks] == ["2", "1"]  # OIM 7.2 reads them last first
    for block, record in zip(blocks, reversed(PHASES)):
        lines = block.split("\n")
        field = {line.split()[1]: line.split()[2:] for line in lines[1:] if len(line.split()) > 2}
        assert field["MaterialName"] == [record.name]
        np.testing.assert_allclose([float(v) for v in field["LatticeConstants"]], record.lattice, atol=1e-3)  # angstrom
        assert field["Symmetry"] == [{"m-3m": "43", "6/mmm": "62"}[record.laue.name]]
        families = [[int(v) for v in line.split()[2:5]] for line in lines if line.startswith("# hklFamilies")]
        assert int(field["NumberFamilies"][0]) == len(families) >= 4
        assert all(len(line.split()) == 8 for line in lines if line.startswith("# hklFamilies"))  # h k l use I show
        if record.laue.name == "m-3m":
            assert families[:4] == [[1, 1, 1], [2, 0, 0], [2, 2, 0], [3, 1, 1]]  # as OIM lists fcc
        else:
            assert [0, 0, 2] in families[:3] and [1, 0, 0] in families  # hcp: basal and prism bands
    grid = {line.split(":")[0][2:]: line.split(":")[1].strip() for line in header if ":" in line}
    assert grid["GRID"] == "SqrGrid" and int(grid["NCOLS_ODD"]) == NAV[1] and int(grid["NROWS"]) == NAV[0]


def test_the_ang_reads_back_in_orix_as_an_oim_file_with_every_column(written):
    path = written["out"] / "vend.ang"
    data = np.loadtxt(path)
    assert data.shape == (NAV[0] * NAV[1], 10)  # OIM v7: phi1 Phi phi2 x y IQ CI phase SEM fit
    xmap = orix_io.load(path)
    assert set(xmap.prop) == {"iq", "ci", "detector_signal", "fit"}  # orix took it for OIM's ("tsl") layout
    indexed = written["phase_id"] >= 0
    np.testing.assert_array_equal(xmap.is_indexed, indexed)
    names = {i: p.name for i, p in xmap.phases if i >= 0}
    assert [names[i] for i in xmap.phase_id[indexed]] == [PHASES[p].name for p in written["phase_id"][indexed]]
    for _, phase in xmap.phases:
        if phase.name in {p.name for p in PHASES}:
            record = next(p for p in PHASES if p.name == phase.name)
            np.testing.assert_allclose(phase.structure.lattice.abcABG(), record.lattice, atol=1e-3)
            assert phase.point_group.laue.name == record.laue.name
    # Orientations as written, to the file's rounding (1e-5 rad); the hexagonal ones too (OIM
    # and orix both put x || a).
    assert _rotation_angle_deg(xmap.rotations.data[indexed], written["q"][indexed]).max() < 0.01
    np.testing.assert_allclose(xmap.prop["iq"], written["iq"], atol=1e-5)
    np.testing.assert_allclose(xmap.prop["ci"][indexed], written["confidence"][indexed], atol=1e-4)
    assert (xmap.prop["ci"][~indexed] == -1).all() and (data[~indexed, 7] == 0).all()
    np.testing.assert_allclose(xmap.prop["fit"][indexed], written["fit"][indexed], atol=1e-4)
    assert (xmap.prop["fit"][~indexed] == 180).all()
    np.testing.assert_allclose(data[~indexed, :3], 4 * np.pi, atol=1e-4)


def test_the_ctf_has_aztecs_layout_and_reads_back_in_orix(written):
    path = written["out"] / "vend.ctf"
    lines = path.read_text().splitlines()
    assert lines[0] == "Channel Text File" and lines[3] == "JobMode\tGrid"
    keys = {line.split("\t")[0]: line.split("\t")[1:] for line in lines[:12]}
    assert keys["XCells"] == [str(NAV[1])] and keys["YCells"] == [str(NAV[0])]
    acquisition = lines[11].split("\t")
    assert acquisition[0] == "Euler angles refer to Sample Coordinate system (CS0)!"
    pairs = dict(zip(acquisition[1::2], acquisition[2::2]))
    assert float(pairs["KV"]) == 15.0 and float(pairs["TiltAngle"]) == 70.0 and float(pairs["WorkingDistance"]) == 10.0
    assert lines[12] == "Phases\t2"
    for line, record in zip(lines[13:15], PHASES):
        abc, angles, name, laue, sg = line.split("\t")[:5]
        np.testing.assert_allclose([float(v) for v in abc.split(";") + angles.split(";")], record.lattice, atol=1e-3)
        assert name == record.name and int(sg) == record.space_group
        assert int(laue) == {"m-3m": 11, "6/mmm": 9}[record.laue.name]
    assert lines[15] == "Phase\tX\tY\tBands\tError\tEuler1\tEuler2\tEuler3\tMAD\tBC\tBS"
    data = np.loadtxt(path, skiprows=16)
    assert data.shape == (NAV[0] * NAV[1], 11)

    xmap = orix_io.load(path)
    indexed = written["phase_id"] >= 0
    np.testing.assert_array_equal(xmap.is_indexed, indexed)
    assert list(xmap.prop) == ["bands", "error", "MAD", "BC", "BS"]
    assert (xmap.prop["error"][~indexed] == 3).all() and (xmap.prop["error"][indexed] == 0).all()
    np.testing.assert_allclose(xmap.prop["MAD"][indexed], written["fit"][indexed], atol=1e-4)
    np.testing.assert_array_equal(xmap.prop["BC"], np.clip(np.rint(255 * written["iq"]), 0, 255))
    by_name = {p.name: p for _, p in xmap.phases}
    for record in PHASES:
        assert by_name[record.name].space_group.number == record.space_group
    # Oxford's Euler convention: the sample frame turned 90 deg about the normal, and x || a*
    # for the hexagonal phase. Undone, the orientations are the map's to the file's rounding.
    laue = np.array([PHASES[p].laue.name if p >= 0 else "" for p in written["phase_id"]])
    back = orientations_from_ctf(np.degrees(xmap.rotations.to_euler()), laue)
    assert _rotation_angle_deg(back[indexed], written["q"][indexed]).max() < 0.01
    # As read, without undoing: cubic points differ by the 90 deg sample turn only...
    cubic, hexagonal = indexed & (written["phase_id"] == 0), indexed & (written["phase_id"] == 1)
    turned = Rotation(written["q"]) * Rotation.from_axes_angles([0, 0, 1], np.pi / 2)
    assert _rotation_angle_deg(xmap.rotations.data[cubic], turned.data[cubic]).max() < 0.01
    # ... and hexagonal ones by it and 30 deg about c, which is no symmetry of 6/mmm.
    as_read = Orientation(xmap.rotations.data[hexagonal], symmetry.D6h)
    assert (as_read.angle_with(Orientation(turned.data[hexagonal], symmetry.D6h), degrees=True) > 29).all()


def test_the_hdf5_keeps_the_detector_the_structures_and_the_kam_map(written):
    path = written["out"] / "vend.h5"
    xmap = orix_io.load(path)
    assert {"iq", "fit", "kam", "confidence", "method"} <= set(xmap.prop)
    np.testing.assert_allclose(xmap.prop["iq"], written["iq"])
    for record in PHASES:
        phase = next(p for _, p in xmap.phases if p.name == record.name)
        np.testing.assert_allclose(phase.structure.lattice.abcABG(), record.lattice, atol=1e-6)
        # The atoms where the record puts them (the hexagonal one moved before orix_phase aligned
        # its lattice first).
        got = sorted(tuple(np.round(a.xyz, 6)) for a in phase.structure)
        assert got == sorted(tuple(np.round(a[1:4], 6)) for a in record.atoms)
    with h5py.File(path, "r") as f:
        assert f.attrs["liveindex_status"] == "complete" and f.attrs["liveindex_modality"] == "fake"
        np.testing.assert_allclose(f["detector"].attrs["pc_tsl"], EXPORT_PC_TSL)
        assert f["detector"].attrs["gain"] == 1.0
    maps = np.load(written["out"] / "vend_maps.npz")
    np.testing.assert_allclose(maps["kam"], xmap.prop["kam"], equal_nan=True)
    for name in ("iq", "kam", "fit"):
        assert (written["out"] / f"vend_{name}.png").stat().st_size > 100
    assert (written["out"] / "vend_fake.txt").read_text() == "gain 1.0\n"  # a file export_header adds
    summary = written["summary"]
    assert {"vend.ctf", "vend_fake.txt", "vend_kam.png"} <= set(summary["files"])


def test_without_the_modality_the_files_are_written_and_the_log_says_what_is_missing(tmp_path, caplog):
    source = FakeSource(FakeModality(), (3, 4))
    header = {"scan": "orphan", **source.scan_start(), "modality": "unheard-of"}
    start = ScanStart.from_header(header)
    maps = FakeModality().prepare(source.scan_start()).index(source.read(0, source.size))
    with caplog.at_level(logging.WARNING):
        write_outputs(tmp_path, "orphan", maps=maps, start=start, summary={"status": "complete"})
    assert "without the projection centre" in caplog.text and "unheard-of" in caplog.text
    values = {line.split()[1]: line.split()[2] for line in _ang_header(tmp_path / "orphan.ang")
              if len(line.split()) == 3}
    assert float(values["x-star"]) == 0.0 and float(values["WorkingDistance"]) == 0.0
    assert orix_io.load(tmp_path / "orphan.ctf").size == 12
    with h5py.File(tmp_path / "orphan.h5", "r") as f:
        assert "detector" not in f


def _turn(q, degrees, axis=(0.0, 0.0, 1.0)):
    half = np.radians(degrees) / 2
    r = np.array([np.cos(half), *(np.sin(half) * np.asarray(axis))])
    return quaternion_multiply(np.broadcast_to(r, np.shape(q)), q)


def test_kam_is_the_mean_disorientation_to_neighbours_of_the_same_grain():
    cubic, hexagonal = PHASES
    # One row: orientations 1 deg apart (applied on the crystal side, as symmetry is), then a
    # 20 deg boundary, then a hexagonal point; one point not indexed.
    base = np.array([[1.0, 0, 0, 0]])
    q = np.concatenate([_turn(base, d, (1, 0, 0)) for d in (0, 1, 2, 22)] + [base, base])
    phase_id = np.array([0, 0, 0, 0, 1, -1])
    kam = kernel_average_misorientation(q, phase_id, (1, 6), [cubic, hexagonal])
    np.testing.assert_allclose(kam[:3], [1, 1, 1], atol=1e-6)
    assert np.isnan(kam[3]) and np.isnan(kam[4]) and np.isnan(kam[5])  # across a boundary, alone, not indexed
    # A 90 deg turn about a cube axis is a cubic symmetry: no misorientation at all.
    q2 = np.concatenate([base, _turn(base, 90.5, (0, 0, 1))])
    np.testing.assert_allclose(kernel_average_misorientation(q2, np.zeros(2, int), (1, 2), [cubic]), 0.5, atol=1e-6)


def test_kam_matches_orix_on_a_random_smooth_map():
    ny, nx = 6, 8
    rng = np.random.default_rng(1)
    axes = rng.standard_normal((ny * nx, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    q = np.concatenate([_turn(np.array([[1.0, 0, 0, 0]]), rng.uniform(0, 3), axes[i]) for i in range(ny * nx)])
    kam = kernel_average_misorientation(q, np.zeros(ny * nx, int), (ny, nx), [PHASES[0]], max_deg=5.0)
    index = np.arange(ny * nx).reshape(ny, nx)
    pairs = np.concatenate([np.stack([index[:-1].ravel(), index[1:].ravel()], 1),
                            np.stack([index[:, :-1].ravel(), index[:, 1:].ravel()], 1)])
    angles = Orientation(q[pairs[:, 0]], symmetry.Oh).angle_with(Orientation(q[pairs[:, 1]], symmetry.Oh),
                                                                  degrees=True)
    near = angles <= 5.0
    total, count = np.zeros(ny * nx), np.zeros(ny * nx)
    for side in (0, 1):
        np.add.at(total, pairs[near, side], angles[near])
        np.add.at(count, pairs[near, side], 1)
    assert 0 < near.sum() < len(near)  # some pairs across the 5 deg limit
    expected = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    np.testing.assert_allclose(kam, expected, atol=1e-4)


def test_hkl_families_are_the_strongest_bands_without_higher_orders():
    from liveindex.models.ebsd.master_patterns import phase_record

    ni = [hkl for hkl, _ in phase_record("ni").hkl_families()]
    assert ni[:4] == [(1, 1, 1), (2, 0, 0), (2, 2, 0), (3, 1, 1)]
    assert (2, 2, 2) not in ni and (4, 0, 0) not in ni  # higher orders of {111} and {200}
    fe = [hkl for hkl, _ in phase_record("fe").hkl_families()]
    assert fe[:3] == [(1, 1, 0), (2, 0, 0), (2, 1, 1)]
    intensities = [i for _, i in PHASES[1].hkl_families()]
    assert intensities[0] == 100 and intensities == sorted(intensities, reverse=True)
    bare = PhaseRecord("no-atoms", 229, (2.87, 2.87, 2.87, 90, 90, 90))  # no atoms: the centring's reflections
    assert [hkl for hkl, _ in bare.hkl_families()][:2] == [(1, 1, 0), (2, 0, 0)]


def test_a_lattice_in_nanometres_is_refused():
    from liveindex.models.errors import InputError

    with pytest.raises(InputError, match="angstrom"):
        PhaseRecord("ni-nm", 225, (0.35236, 0.35236, 0.35236, 90, 90, 90))

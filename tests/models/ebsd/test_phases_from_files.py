"""The user's own material: phases from CIFs and master-pattern files, hcp indexing, a missing
phase never confident, the Python API."""

from pathlib import Path

import msgpack
import numpy as np
import pytest

from liveindex.models.crystal import PhaseRecord
from liveindex.models.ebsd.master_patterns import (
    disorientation_degrees,
    master_pattern,
    phase_key,
    phases_from_spec,
    register,
)
from liveindex.models.ebsd.simulator import SimulatedScan
from liveindex.models.errors import InputError
from tests.conftest import error_lines, run_cli

DATA = Path(__file__).resolve().parents[2] / "data"
TI_CIF = DATA / "ti.cif"
PC = (0.425, 0.213, 0.501)  # the simulator's default geometry (Bruker)


@pytest.fixture(scope="module")
def ti_scan():
    key = register(phases_from_spec(str(TI_CIF))[0])
    return SimulatedScan((20, 20), noise="moderate", phase=key, seed=4, grain_size=2)


@pytest.fixture(scope="module")
def ti_file(ti_scan, tmp_path_factory):
    path = tmp_path_factory.mktemp("ti") / "ti.npy"
    np.save(path, ti_scan.render(0, ti_scan.size).reshape(20, 20, 60, 60))
    return path


def test_a_cif_gives_the_full_hexagonal_cell_and_orix_keeps_its_fractional_coordinates():
    record = phases_from_spec(str(TI_CIF))[0]
    assert (record.name, record.space_group, record.laue.name) == ("ti", 194, "6/mmm")
    assert sorted(tuple(round(v, 4) for v in a[1:4]) for a in record.atoms) == [(0.3333, 0.6667, 0.25),
                                                                                (0.6667, 0.3333, 0.75)]
    structure = record.orix_phase().structure  # orix re-bases hexagonal lattices: positions must stay
    assert sorted(tuple(np.round(a.xyz, 4)) for a in structure) == [(0.3333, 0.6667, 0.25), (0.6667, 0.3333, 0.75)]
    named = phases_from_spec(f"alpha={TI_CIF}")[0]
    assert named.name == "alpha" and phase_key(named).startswith("alpha-")
    assert phase_key(named).split("-")[1] == phase_key(record).split("-")[1]  # same content, same hash


def test_bad_phase_files_get_one_line_errors(tmp_path):
    bad = tmp_path / "bad.cif"
    bad.write_text("data_x\n_cell_length_a 3\n")
    for spec in (str(bad), str(tmp_path / "missing.cif"), "unobtainium", f"{DATA / 'ti.cif'},{DATA / 'ti.cif'}"):
        with pytest.raises(InputError) as err:
            phases_from_spec(spec)
        assert "\n" not in str(err.value)


def test_a_master_pattern_file_travels_in_the_record():
    import kikuchipy as kp

    path = Path(kp.__file__).parent / "data" / "emsoft_ebsd_master_pattern" / "ni_mc_mp_20kv_uint8_gzip_opts9.h5"
    record = phases_from_spec(f"nickel={path}")[0]
    assert record.space_group == 225 and abs(record.lattice[0] - 3.5236) < 1e-3 and len(record.atoms) == 4
    wire = msgpack.unpackb(msgpack.packb(record.to_wire()))  # a worker on another host gets only this
    assert "payload" not in record.to_wire(payload=False).get("extra", {})
    again = PhaseRecord.from_wire(wire)
    mp = np.asarray(master_pattern(register(again)).data, float)
    reference = np.asarray(kp.data.nickel_ebsd_master_pattern_small(projection="lambert", hemisphere="upper").data,
                           float)
    assert np.corrcoef(mp.reshape(-1), reference.reshape(-1))[0, 1] > 0.9999


def test_phases_show_prints_what_was_understood():
    proc = run_cli("phases", "show", TI_CIF)
    assert proc.returncode == 0, proc.stderr
    assert "space group 194" in proc.stdout and "6/mmm" in proc.stdout and "{0 0 2}" in proc.stdout
    proc = run_cli("phases", "show", "nothing.cif")
    assert proc.returncode == 2 and len(error_lines(proc)) == 1


def test_a_cif_the_parser_chokes_on_gives_one_line_and_no_parser_chatter(tmp_path):
    broken = tmp_path / "broken.cif"
    broken.write_text("data_x\n_cell_length_a 3.6\nloop_\n_atom_site_label\n")
    proc = run_cli("phases", "show", broken)
    assert proc.returncode == 2 and len(error_lines(proc)) == 1 and "as a CIF" in proc.stderr
    assert proc.stdout.strip() == ""  # PyCifRW printed its complaint here


def test_hcp_titanium_from_a_cif_indexes_within_3_degrees(ti_scan, ti_file, tmp_path):
    proc = run_cli("index", ti_file, "--phases", TI_CIF, "--pc", *PC, "--tilt", 70, "--out", tmp_path / "ti.h5")
    assert proc.returncode == 0, proc.stderr
    maps = np.load(tmp_path / "ti_maps.npz")
    error = disorientation_degrees(maps["quaternion"], ti_scan.truth, phase_key(phases_from_spec(str(TI_CIF))[0]))
    assert (error < 3).mean() >= 0.99 and np.median(error) <= 0.4
    sure = maps["confidence"] > 0.5
    assert sure.mean() >= 0.9 and (error[sure] < 3).all()


def test_a_phase_missing_from_the_list_is_never_confident(ti_file, tmp_path):
    proc = run_cli("index", ti_file, "--phases", "ni", "--pc", *PC, "--tilt", 70, "--out", tmp_path / "ni.h5")
    assert proc.returncode == 0, proc.stderr
    maps = np.load(tmp_path / "ni_maps.npz")
    assert (maps["confidence"] < 0.5).mean() >= 0.95
    assert "fit no listed phase: is a phase missing?" in proc.stdout


def test_the_python_api_returns_a_crystal_map(ti_scan, ti_file):
    import liveindex

    patterns = np.load(ti_file)
    xmap = liveindex.index(patterns, detector={"pc": PC, "sample_tilt": 70}, phases=[str(TI_CIF)], progress=False)
    assert xmap.shape == (20, 20) and xmap.phases[0].point_group.name == "6/mmm"
    assert {"confidence", "method", "score"} <= set(xmap.prop)
    error = disorientation_degrees(xmap.rotations.data, ti_scan.truth, phase_key(phases_from_spec(str(TI_CIF))[0]))
    assert np.median(error) <= 0.4
    with pytest.raises(InputError, match="detector geometry"):
        liveindex.index(patterns, phases="ni", progress=False)
    with pytest.raises(TypeError, match="unknown option"):
        liveindex.index(patterns, detector={"pc": PC}, colour="blue")


def test_the_python_api_takes_a_kikuchipy_signal_with_its_detector_and_background():
    import kikuchipy as kp

    import liveindex

    signal = kp.data.nickel_ebsd_small()
    xmap = liveindex.index(signal, phases=["ni"], progress=False, min_confidence=0.0)
    assert xmap.shape == (3, 3) and xmap.phases[0].name == "ni" and (xmap.phase_id == 0).all()
    # Real patterns fitted well: a wrong orientation of these patterns refines to an NCC near 0.1.
    assert (xmap.prop["score"] > 0.3).all()


@pytest.mark.slow
def test_austenite_and_ferrite_from_two_cifs_get_the_right_phase():
    from liveindex.models.crystal import disorientation_by_phase
    from liveindex.models.ebsd.indexer import ScanIndexer

    records = phases_from_spec(f"{DATA / 'austenite.cif'},{DATA / 'ferrite.cif'}")
    keys = [register(r) for r in records]
    scan = SimulatedScan((30, 30), noise="moderate", phase=keys, seed=5, grain_size=2)
    result = ScanIndexer(scan.geometry, keys, progress=False).index(scan.render(0, scan.size))
    assert (result.phase_id == scan.truth_phase).mean() >= 0.995
    error = disorientation_by_phase(result.quaternion, scan.truth, scan.truth_phase, records)
    assert (error < 3).mean() >= 0.99

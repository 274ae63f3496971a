"""Geometry from the file: kikuchipy's real 3x3 Ni scan in each vendor format it ships or
writes (file_setup.py, files.py). A real PC is used and the log says so; a file with no PC or
a placeholder one is refused in one line that names the fix; --pc, --tilt, --step win."""

import logging
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from liveindex.models.ebsd.files import load_file
from liveindex.models.errors import InputError

from ...conftest import error_lines, run_cli


@pytest.fixture(scope="module")
def ni():
    import kikuchipy as kp

    return kp.data.nickel_ebsd_small()


@pytest.fixture(scope="module")
def shipped():
    import kikuchipy as kp

    return Path(kp.data.__file__).parent


@pytest.fixture(scope="module")
def written(tmp_path_factory, ni, shipped):
    """The Ni scan as vendor h5ebsd files: kikuchipy's own writers of Bruker and Oxford files
    (which store placeholder PCs of ones), and copies of those and of the shipped EDAX file
    (zeros) with the scan's real PC written in each vendor's convention (per point, or the
    mean where the format keeps one)."""
    from kikuchipy.data._dummy_files.bruker_h5ebsd import create_dummy_bruker_h5ebsd_file
    from kikuchipy.data._dummy_files.oxford_h5ebsd import create_dummy_oxford_h5ebsd_file

    folder = tmp_path_factory.mktemp("vendor")
    files = {"bruker": folder / "bruker.h5", "oxford": folder / "oxford.h5oina"}
    create_dummy_bruker_h5ebsd_file(files["bruker"])
    create_dummy_oxford_h5ebsd_file(files["oxford"])
    detector = ni.detector
    files["bruker_pc"] = folder / "bruker_pc.h5"
    shutil.copy(files["bruker"], files["bruker_pc"])
    with h5py.File(files["bruker_pc"], "r+") as f:
        for name, value in zip(("PCX", "PCY", "DD"), detector.pc_bruker().reshape(-1, 3).T):
            f[f"Scan 0/EBSD/Data/{name}"][...] = value
    files["edax_pc"] = folder / "edax_pc.h5"
    shutil.copy(shipped / "edax_h5ebsd" / "patterns.h5", files["edax_pc"])
    with h5py.File(files["edax_pc"], "r+") as f:
        for name, value in zip(("x-star", "y-star", "z-star"), detector.pc_tsl().reshape(-1, 3).mean(axis=0)):
            f[f"Scan 1/EBSD/Header/Pattern Center Calibration/{name}"][...] = value
    files["oxford_pc"] = folder / "oxford_pc.h5oina"
    shutil.copy(files["oxford"], files["oxford_pc"])
    with h5py.File(files["oxford_pc"], "r+") as f:
        for name, value in zip(("Pattern Center X", "Pattern Center Y", "Detector Distance"),
                               detector.pc_oxford().reshape(-1, 3).T):
            f[f"1/EBSD/Data/{name}"][...] = value
    return files


WITH_PC = {  # file -> (format, sample tilt the file stores)
    "kikuchipy": ("kikuchipy h5ebsd", 70.0),
    "bruker_pc": ("Bruker h5ebsd", 70.0),  # kikuchipy itself reads 0 here (it looks for "Sample Tilt")
    "edax_pc": ("EDAX h5ebsd", 75.7),
    "oxford_pc": ("Oxford h5oina", 69.9),
}
WITHOUT_PC = {  # file -> (format, what the message says)
    "up1": ("EDAX .up1/.up2", "stores no projection centre"),
    "up2": ("EDAX .up1/.up2", "stores no projection centre"),
    "ebsp": ("Oxford .ebsp", "stores no projection centre"),
    "nordif": ("NORDIF .dat", "stores no projection centre"),
    "edax": ("EDAX h5ebsd", "holds the projection centre (0, 1, 0)"),  # zeros in the TSL convention
    "bruker": ("Bruker h5ebsd", "holds the projection centre (1, 1, 1)"),
    "oxford": ("Oxford h5oina", "holds the projection centre (1, 0, 1)"),
}
SHIPPED = {"kikuchipy": "kikuchipy_h5ebsd/patterns.h5", "up1": "edax_binary/edax_binary.up1",
           "up2": "edax_binary/edax_binary.up2", "ebsp": "oxford_binary/patterns.ebsp", "nordif": "nordif/Pattern.dat",
           "edax": "edax_h5ebsd/patterns.h5"}


def path_of(name, shipped, written) -> Path:
    return shipped / SHIPPED[name] if name in SHIPPED else written[name]


@pytest.mark.parametrize("name", sorted(WITH_PC))
def test_a_real_pc_in_the_file_is_used_and_the_log_says_so(name, shipped, written, ni, caplog):
    fmt, sample_tilt = WITH_PC[name]
    with caplog.at_level(logging.INFO, logger="liveindex"):
        source = load_file(path_of(name, shipped, written))
    assert source.geometry.pc == pytest.approx(tuple(ni.detector.pc_average), abs=2e-4)
    assert source.geometry.sample_tilt == pytest.approx(sample_tilt, abs=0.01)
    assert source.step == pytest.approx((1.5, 1.5))
    assert source.metadata["format"] == fmt
    assert any(f"({fmt}): from the file: projection centre (0.4251, 0.2134, 0.5007)" in r.getMessage()
               for r in caplog.records), caplog.text


@pytest.mark.parametrize("name", sorted(WITHOUT_PC))
def test_a_file_without_a_real_pc_is_refused_with_the_fix(name, shipped, written):
    fmt, says = WITHOUT_PC[name]
    path = path_of(name, shipped, written)
    with pytest.raises(InputError) as error:
        load_file(path)
    message = str(error.value)
    assert "\n" not in message
    for words in (f"({fmt})", says, "--pc X Y Z", f"liveindex calibrate {path}"):
        assert words in message, message
    # Given a PC, the same file is read, with the file's other real values.
    source = load_file(path, pc=(0.4251, 0.2134, 0.5007))
    assert source.geometry.pc == pytest.approx((0.4251, 0.2134, 0.5007))


def test_what_a_file_lacks_is_named_with_the_value_used(shipped, caplog):
    with caplog.at_level(logging.INFO, logger="liveindex"):
        source = load_file(shipped / SHIPPED["up1"], pc=(0.42, 0.21, 0.5))
    assert source.geometry.sample_tilt == 70.0 and source.step == (1.0, 1.0)
    text = caplog.text
    assert "stores no sample tilt: using 70 deg (--tilt to set it)" in text
    assert "stores no step size: using 1 um (--step DX [DY]" in text


def test_the_files_static_background_reaches_the_indexer(shipped, ni):
    from liveindex.models import modality as modalities
    from liveindex.stream.cli import build_parser

    argv = ["index", str(shipped / SHIPPED["nordif"]), "--pc", "0.4251", "0.2134", "0.5007"]
    args = build_parser(argv).parse_args(argv)
    ebsd = modalities.load("ebsd")
    ebsd.open_source(args, role="index")
    background = ebsd.indexing_options(args)["static_background"]
    assert background.shape == (60, 60) and np.array_equal(background, ni.static_background)


def test_step_for_arrays(tmp_path, moderate_scan):
    path = tmp_path / "scan.npy"
    np.save(path, moderate_scan.render(0, 4).reshape(2, 2, 60, 60))
    assert load_file(path).step == (1.0, 1.0)
    assert load_file(path, step=[0.5]).step == (0.5, 0.5)
    assert load_file(path, step=[0.5, 0.25]).step == (0.25, 0.5)  # DX DY -> (dy, dx)
    with pytest.raises(InputError, match="one positive number"):
        load_file(path, step=[0.0])


def test_index_refuses_a_vendor_file_without_a_pc_in_one_line(shipped):
    path = shipped / SHIPPED["ebsp"]
    proc = run_cli("index", path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = error_lines(proc)
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "stores no projection centre" in lines[0] and "--pc X Y Z" in lines[0]
    assert f"liveindex calibrate {path}" in lines[0]

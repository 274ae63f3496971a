"""4D-STEM files are read back as the frames written: .npy, .hspy, .zspy (HyperSpy/pyxem) and
NanoMegas .blo (written by rosettasciio), with the file's reciprocal-space calibration."""

import argparse
import warnings

import numpy as np
import pytest

from liveindex.models import modality as modalities
from liveindex.models.errors import InputError

CAL = 0.025


@pytest.fixture(scope="module")
def frames():
    rng = np.random.default_rng(3)
    return rng.integers(0, 250, (3, 4, 32, 32)).astype(np.uint8)


def _source(path, calibration=None):
    spots = modalities.load("spots")
    parser = argparse.ArgumentParser()
    spots.add_arguments(parser, role="index")
    args = parser.parse_args([] if calibration is None else ["--calibration", str(calibration)])
    args.file = str(path)
    return spots.open_source(args, role="index")


def _signal(frames):
    import hyperspy.api as hs

    s = hs.signals.Signal2D(frames)
    for axis in s.axes_manager.signal_axes:
        axis.scale, axis.units = CAL, "1/A"
    return s


def test_npy_needs_a_calibration(frames, tmp_path):
    path = tmp_path / "scan.npy"
    np.save(path, frames)
    with pytest.raises(InputError, match="--calibration"):
        _source(path)
    source = _source(path, calibration=0.02)
    assert source.nav_shape == (3, 4) and source.setup["calibration"] == 0.02
    np.testing.assert_array_equal(source.read(0, 12), frames.reshape(12, 32, 32))


@pytest.mark.parametrize("suffix, given", [(".hspy", None), (".zspy", None), (".blo", CAL)])
def test_rosettasciio_formats_read_back(frames, tmp_path, suffix, given):
    # .blo keeps the detector's scale in cm (camera units), not 1/A: its calibration is given.
    path = tmp_path / f"scan{suffix}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _signal(frames).save(path)
    source = _source(path, calibration=given)
    assert source.nav_shape == (3, 4) and source.pattern_shape == (32, 32)
    assert source.setup["calibration"] == pytest.approx(CAL, rel=1e-6)
    np.testing.assert_array_equal(source.read(0, 12), frames.reshape(12, 32, 32))
    np.testing.assert_array_equal(source.read(5, 3), frames.reshape(12, 32, 32)[5:8])


def test_a_foreign_file_is_refused_with_the_formats(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(InputError, match=".hspy"):
        _source(path, calibration=0.02)


# A Merlin (Quantum Detectors) frame header as the detector writes it: 384 ASCII bytes, the
# fields rosettasciio's reader uses being the header size (2), width and height (4, 5), pixel
# type (6), chip layout (7) and at the end the timestamp and exposure; padded with spaces.
MIB_HEADER = ("MQ1,{seq:06d},00384,01,{w:04d},{h:04d},U16,   1x1,01,2020-05-18 16:51:49.971626,0.000555,0,0,0,"
              "1.200000E+2,5.110000E+2,0.000000E+0,0.000000E+0,0.000000E+0,0.000000E+0,0.000000E+0,0.000000E+0,3RX,"
              "175,511,000,000,000,000,000,000,125,255,125,125,100,100,082,100,087,030,128,004,255,129,128,176,168,"
              "511,511,MQ1A,2020-05-18T14:51:{s:02d}.{us:06d}178Z,555000ns,12,")
# The acquisition's .hdr, tab-separated: "Frames per Trigger" is the scan line (nx).
MIB_HDR = ("HDR,\nTime and Date Stamp (day, mnth, yr, hr, min, s):\t18/05/2020 16:51:48\nChip ID:\tW529_F5,-,-,-\n"
           "Chip Type (Medipix 3.0, Medipix 3.1, Medipix 3RX):\tMedipix 3RX\nAssembly Size (NX1, 2X2):\t   1x1\n"
           "Chip Mode  (SPM, CSM, CM, CSCM):\tSPM\nCounter Depth (number):\t12\nGain:\tSLGM\n"
           "Acquisition Type (Normal, Th_scan, Config):\tNormal\nFrames in Acquisition (Number):\t{n}\n"
           "Frames per Trigger (Number):\t{nx}\nTrigger Start (Positive, Negative, Internal):\tRising Edge LVDS\n"
           "Software Version:\t0.67.0.9\nEnd\t")


def write_mib(path, frames):
    """A Merlin .mib and its .hdr: each frame its 384-byte header then big-endian uint16 counts,
    rows in the order LiberTEM and the live Merlin stream give them."""
    ny, nx, h, w = frames.shape
    with open(path, "wb") as f:
        for i, frame in enumerate(frames.reshape(-1, h, w)):
            line, pixel = divmod(i, nx)  # the first frame of each line comes later than a pixel's dwell
            header = MIB_HEADER.format(seq=i + 1, w=w, h=h, s=line, us=pixel * 1000)
            f.write(header.encode("ascii").ljust(384, b" "))
            f.write(np.ascontiguousarray(frame, ">u2").tobytes())
    path.with_suffix(".hdr").write_text(MIB_HDR.format(n=ny * nx, nx=nx))


def write_arina(folder, name, frames, per_file=5):
    """A DECTRIS Arina scan: ``name_master.h5`` whose entry/data/data_NNNNNN are external links to
    ``name_data_NNNNNN.h5`` files, each a bitshuffle/LZ4-compressed (n, H, W) stack at
    entry/data/data, as the detector's file writer lays them out."""
    import h5py
    import hdf5plugin

    flat = frames.reshape(-1, *frames.shape[-2:])
    master = folder / f"{name}_master.h5"
    with h5py.File(master, "w") as m:
        group = m.create_group("entry/data")
        for k, first in enumerate(range(0, len(flat), per_file), start=1):
            data_name = f"{name}_data_{k:06d}.h5"
            with h5py.File(folder / data_name, "w") as d:
                d.create_dataset("entry/data/data", data=flat[first:first + per_file],
                                 chunks=(1, *flat.shape[1:]), **hdf5plugin.Bitshuffle(cname="lz4"))
            group[f"data_{k:06d}"] = h5py.ExternalLink(data_name, "entry/data/data")
    return master


@pytest.fixture(scope="module")
def spot_scan():
    """A 3x4 scan of simulated precession patterns (128x128, the shipped bundle's setup) and its truth."""
    from liveindex.models.spots.evaluate import make_set
    from liveindex.models.spots.phases import phases_from_spec
    from liveindex.models.spots.setup import check_setup

    phases = phases_from_spec("ferrite,austenite,cementite")
    setup = check_setup({"kv": 200.0, "calibration": 0.03, "precession": 1.0}, (128, 128))
    ev = make_set(phases, setup, 12, noise="moderate", seed=14, near_zone=1.0)
    return ev.frames.reshape(3, 4, 128, 128), ev, phases


def test_merlin_mib_is_read_lazily_in_scan_lines(spot_scan, tmp_path):
    frames, _, _ = spot_scan
    path = tmp_path / "scan.mib"
    write_mib(path, frames)
    from rsciio.quantumdetector import file_reader

    by_rosettasciio = file_reader(str(path))[0]["data"]
    assert by_rosettasciio.shape == (3, 4, 128, 128)  # rosettasciio finds the scan lines in the .hdr
    np.testing.assert_array_equal(by_rosettasciio[..., ::-1, :], frames)  # and turns the rows over
    source = _source(path, calibration=0.03)
    assert not isinstance(source.patterns, np.ndarray)  # lazy: read a page at a time
    assert source.nav_shape == (3, 4) and source.pattern_shape == (128, 128) and source.dtype == "uint16"
    page = source.read(5, 4)
    assert page.dtype == np.uint16 and page.dtype.isnative  # sent as raw bytes: big-endian would garble them
    np.testing.assert_array_equal(page, frames.reshape(12, 128, 128)[5:9])
    with pytest.raises(InputError, match="--calibration"):  # a .mib carries no reciprocal calibration
        _source(path)
    # The .mib `liveindex replay --as merlin` writes for the live path (libertem-live's
    # simulator, LiberTEM's reader) reads back as the same frames: live and file agree.
    from liveindex.stream.replay import write_mib as replay_mib

    replay_mib(frames, tmp_path / "replayed.mib")
    np.testing.assert_array_equal(_source(tmp_path / "replayed.mib", calibration=0.03).read(0, 12),
                                  frames.reshape(12, 128, 128))


def test_dectris_arina_master_file_is_read_across_its_data_files(spot_scan, tmp_path):
    frames, _, _ = spot_scan
    big = np.concatenate([frames.reshape(12, 128, 128)] * 3).reshape(6, 6, 128, 128)  # 36 frames: a square scan
    master = write_arina(tmp_path, "scan", big, per_file=5)
    from rsciio.arina import file_reader

    np.testing.assert_array_equal(file_reader(str(master))[0]["data"], big)  # the layout rosettasciio reads
    source = _source(master, calibration=0.03)
    assert source.nav_shape == (6, 6) and source.pattern_shape == (128, 128) and source.dtype == "uint16"
    np.testing.assert_array_equal(source.read(3, 9), big.reshape(36, 128, 128)[3:12])  # across data files 1-3
    np.testing.assert_array_equal(source.read(30, 6), big.reshape(36, 128, 128)[30:])
    with pytest.raises(InputError, match="--calibration"):  # nor does an Arina master file
        _source(master)
    line = write_arina(tmp_path, "line", frames)  # 12 frames: not a square, one line
    assert _source(line, calibration=0.03).nav_shape == (1, 12)
    with pytest.raises(InputError, match="_master.h5"):
        _source(tmp_path / "scan_data_000001.h5", calibration=0.03)


def test_detector_files_are_indexed_back_to_their_truth(spot_scan, tmp_path):
    # The whole path a user takes: liveindex index FILE --modality spots, in a process of its own.
    from liveindex.models.spots.evaluate import score_answers

    from ...conftest import run_cli

    frames, ev, phases = spot_scan
    write_mib(tmp_path / "scan.mib", frames)
    write_arina(tmp_path, "scan", np.concatenate([frames.reshape(12, 128, 128)] * 3)[:16].reshape(4, 4, 128, 128))
    truth_q = np.concatenate([ev.quaternions] * 2)[:16]
    truth_phase = np.concatenate([ev.phase_id] * 2)[:16]
    for name, q, phase_id in [("scan.mib", ev.quaternions, ev.phase_id), ("scan_master.h5", truth_q, truth_phase)]:
        out = tmp_path / name.replace(".", "_")  # a folder: a name ending .h5 would be the output file
        proc = run_cli("index", tmp_path / name, "--modality", "spots", "--calibration", "0.03", "--precession",
                       "1", "--phases", "ferrite,austenite,cementite", "--latent", "off", "--out", out, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (maps,) = out.glob("*_maps.npz")
        with np.load(maps) as saved:
            fields = {k: saved[k] for k in saved.files}
        scores = score_answers(fields, q, phase_id, phases)
        assert scores["right_phase"] >= 0.8, name
        assert np.nanmedian(scores["errors_mod180"]) <= 3.0, name


def test_damaged_detector_files_are_refused_with_input_errors(tmp_path):
    import h5py

    (tmp_path / "noise.mib").write_bytes(np.random.default_rng(0).bytes(5000))
    (tmp_path / "text_master.h5").write_text("not HDF5")
    with h5py.File(tmp_path / "empty_master.h5", "w") as f:
        f.create_group("entry/data")  # a master file whose data files were never linked
    for name in ("noise.mib", "text_master.h5", "empty_master.h5"):
        with pytest.raises(InputError, match="cannot read"):
            _source(tmp_path / name, calibration=0.03)

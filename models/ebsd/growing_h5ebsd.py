"""h5ebsd files followed while the acquisition appends to them (``liveindex publish --follow X.h5``).

An HDF5 file can be read while another process writes it only in HDF5's SWMR mode (single
writer, multiple readers): the writer opens it with ``libver='latest'``, creates its datasets
(the pattern dataset chunked, its first axis unlimited), switches ``swmr_mode`` on and appends
by resize, write, flush. Its flush writes the frames' raw data before the metadata that
extends the dataset, so the extent a reader sees after ``refresh()`` covers written frames;
as HDF5 may write a dataset's header early too, a frame also counts only once its chunk is
allocated on disk (never a fill value read as a frame). A file written without SWMR has metadata that changes under a reader: read, it gives
garbage or crashes HDF5, so it is refused, with the fix (index it once it is closed).

Whether someone is writing, and how, is in the superblock's file consistency flags (bit 0:
open for writing, bit 2: SWMR writing; byte 11 in superblock versions 2-3, bytes 20-23 in
0-1), read before HDF5 opens the file, so the refusal does not depend on file locking (off
on many network shares).

The layouts are the ones kikuchipy 0.13 reads (``kikuchipy/io/plugins/*_h5ebsd/_api.py``):
the first top group with ``EBSD/Data`` and ``EBSD/Header``; patterns (N, sy, sx) in scan
order in ``EBSD/Data/patterns`` (kikuchipy), ``RawPatterns`` (Bruker), ``Pattern`` (EDAX);
the scan size in the header (``n_rows``/``n_columns``, ``NROWS``/``NCOLS``,
``nRows``/``nColumns``); the PC in the header (kikuchipy: ``pcx/pcy/pcz``, Bruker
convention; EDAX: ``Pattern Center Calibration`` x*, y*, z*, EDAX convention) or, Bruker,
per point in ``EBSD/Data/PCX, PCY, DD`` (the mean of the points written so far).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from liveindex.models.errors import InputError
from liveindex.models.growing_file import GrowingFile, NotWrittenYet, when_written
from liveindex.models.modality import FRAME_DTYPES

from .file_setup import FileSetup, pc_problem

log = logging.getLogger(__name__)

H5_SUFFIXES = (".h5", ".hdf5", ".h5ebsd")
_SIGNATURE = b"\x89HDF\r\n\x1a\n"
SWMR_GRACE = 2.0  # s a file open for writing may take to switch SWMR on (it creates its datasets first)

# manufacturer -> (format, patterns dataset, header keys: rows, columns, step y, step x, sample tilt, detector tilt)
_LAYOUTS = {
    "kikuchipy": ("kikuchipy h5ebsd", "patterns", ("n_rows", "n_columns", "step_y", "step_x", "sample_tilt",
                                                   "elevation_angle")),
    "bruker nano": ("Bruker h5ebsd", "RawPatterns", ("NROWS", "NCOLS", "YSTEP", "XSTEP", "SampleTilt", "CameraTilt")),
    "edax": ("EDAX h5ebsd", "Pattern", ("nRows", "nColumns", "Step Y", "Step X", "Sample Tilt",
                                        "Camera Elevation Angle")),
}


def writer_state(path) -> tuple[int, bool, bool]:
    """(superblock version, open for writing, SWMR writing) from the file's superblock."""
    with open(path, "rb") as f:
        for base in (0, 512, 1024, 2048, 4096, 8192):  # the superblock follows a user block of 2**n bytes
            f.seek(base)
            head = f.read(24)
            if head[:8] == _SIGNATURE:
                break
        else:
            raise _NotReady("no HDF5 superblock yet")
    version = head[8]
    if len(head) < 24:
        raise _NotReady("the HDF5 superblock is not written yet")
    flags = head[11] if version >= 2 else int.from_bytes(head[20:24], "little")
    return version, bool(flags & 1), bool(flags & 4)


class _NotReady(NotWrittenYet):
    """The file is not an h5ebsd file with its header and pattern dataset yet."""


def _without_swmr(path: Path, why: str) -> InputError:
    return InputError(f"{path} {why}, so it cannot be read while it grows; index it when the acquisition ends "
                      f"(liveindex publish --file {path}, or liveindex index {path}), or switch on SWMR writing "
                      "in the acquisition software to follow it (if nothing writes it any more, h5clear -s clears "
                      "the mark a crashed writer leaves)")


@dataclass(frozen=True)
class H5Layout:
    """What FollowedSource needs of a followed file: its frames' shape and type and their count."""

    format: str
    dataset: str
    pattern_shape: tuple[int, int]
    dtype: str
    expected: int
    order: None = None  # the dataset is in scan order (GrowingFile's record order: none)


class GrowingH5(GrowingFile):
    """The pattern dataset of an h5ebsd file appended in SWMR mode: frames counted by the
    dataset's extent after ``refresh()``, polled as GrowingFile polls a file's size."""

    def __init__(self, path, file, layout: H5Layout, *, follow_timeout: float, clock=time.monotonic,
                 wall_clock=time.time, sleep=time.sleep):
        self._file = file  # opened (SWMR) by the caller, which read the layout from it
        super().__init__(path, layout, follow_timeout=follow_timeout, clock=clock, wall_clock=wall_clock, sleep=sleep)

    def _open(self) -> None:
        self._dataset = self._file[self.layout.dataset]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _measure(self) -> tuple[int, int]:
        """(the pattern dataset's length, the frames in it whose chunks are on disk)."""
        self._dataset.refresh()
        size = int(self._dataset.shape[0])
        return size, self._written(min(size, self.layout.expected))

    def _written(self, extent: int) -> int:
        """Frames below ``extent`` whose chunks are on disk. A flush writes the frames before
        the extent, but HDF5 may also write a dirty dataset header early (its metadata cache
        evicts it): a frame whose chunk is not allocated yet would read as the fill value."""
        chunks = self._dataset.chunks
        if chunks is None:  # contiguous: a dataset that cannot grow, written whole
            return extent
        while extent > self.count:
            info = self._dataset.id.get_chunk_info_by_coord((extent - 1, 0, 0))  # about 10 us
            if info.byte_offset is not None:
                break
            extent = (extent - 1) // chunks[0] * chunks[0]
        return max(extent, self.count)

    def read(self, first: int, count: int) -> np.ndarray:
        if first < 0 or first + count > self.count:
            raise IndexError(f"frames {first}..{first + count - 1} of {self.path} are not complete yet "
                             f"({self.count} are)")
        return np.ascontiguousarray(self._dataset[first:first + count])


def open_h5ebsd(path: Path, *, follow_timeout: float, scan_shape=None):
    """(GrowingH5, (ny, nx), FileSetup) of an h5ebsd file being appended in SWMR mode (or a
    closed one); waits up to ``follow_timeout`` for its header and pattern dataset."""
    import h5py

    start = time.monotonic()

    def attempt():
        _version, writing, swmr = writer_state(path)
        if writing and not swmr:
            # A SWMR writer creates the file and its datasets before it switches SWMR on.
            if time.monotonic() - start < min(SWMR_GRACE, follow_timeout):
                raise _NotReady("the writer has not switched SWMR on yet")
            raise _without_swmr(path, "is being written without HDF5's SWMR mode")
        try:
            file = h5py.File(path, "r", libver="latest", swmr=True)
        except OSError as exc:
            if "lock" in str(exc) or "already open for write" in str(exc):
                raise _without_swmr(path, "is held open for writing without HDF5's SWMR mode") from None
            raise _NotReady(f"HDF5 cannot open it yet ({exc})") from None
        try:
            return file, writing, _describe(file, path, scan_shape)
        except BaseException:
            file.close()
            raise

    file, writing, found = when_written(attempt, path, follow_timeout, "an h5ebsd file here")
    layout, nav_shape, setup = found
    if writing:
        log.info("%s: written in SWMR mode; following %s (%d frames expected)", path.name, layout.dataset,
                 layout.expected)
    return GrowingH5(path, file, layout, follow_timeout=follow_timeout), nav_shape, setup


def _scalar(header, key, default=None):
    if key not in header:
        return default
    value = header[key][()]
    value = np.asarray(value).ravel()
    if value.size == 0:
        return default
    value = value[0]
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _describe(file, path: Path, scan_shape):
    top = {key.lower(): _scalar(file, key) for key in file.keys() if not hasattr(file[key], "keys")}
    manufacturer = str(top.get("manufacturer") or "").strip().lower()
    if not manufacturer:
        raise _NotReady("no 'manufacturer' in its top group yet")
    if manufacturer not in _LAYOUTS:
        raise InputError(f"{path} is an h5ebsd file from {manufacturer!r}; --follow reads kikuchipy, Bruker and EDAX "
                         "h5ebsd (Oxford writes .h5oina: index it with --file when the acquisition ends)")
    fmt, patterns_name, keys = _LAYOUTS[manufacturer]
    groups = [g for g in file.values() if hasattr(g, "keys") and "EBSD/Data" in g and "EBSD/Header" in g]
    if not groups:
        raise _NotReady("no scan group with EBSD/Data and EBSD/Header yet")
    group = groups[0]
    header = group["EBSD/Header"]
    if f"EBSD/Data/{patterns_name}" not in group:
        raise _NotReady(f"no pattern dataset EBSD/Data/{patterns_name} yet")
    dataset = group[f"EBSD/Data/{patterns_name}"]
    rows, cols, step_y, step_x, sample_tilt_key, tilt_key = keys
    if dataset.ndim != 3:
        raise InputError(f"{path}: {dataset.name} has shape {dataset.shape}; --follow reads (frames, height, width)")
    dtype = dataset.dtype.name
    if dtype not in FRAME_DTYPES:
        raise InputError(f"{path}: patterns of {dtype}; liveindex reads {', '.join(FRAME_DTYPES)}")
    ny, nx = _scalar(header, rows), _scalar(header, cols)
    if scan_shape is not None:
        ny, nx = scan_shape
    elif ny is None or nx is None:
        raise InputError(f"{path}: its header has no {rows}/{cols}; give the scan size with --scan-shape WxH")
    ny, nx = int(ny), int(nx)
    if ny * nx < 1:
        raise InputError(f"{path}: its header says a scan of {nx}x{ny} points; give it with --scan-shape WxH")
    if fmt == "Bruker h5ebsd" and "EBSD/SEM/IY" in group and "EBSD/SEM/IX" in group:
        _check_roi_order(path, group, ny, nx)
    sy, sx = (int(v) for v in dataset.shape[1:])
    layout = H5Layout(fmt, dataset.name, (sy, sx), dtype, ny * nx)
    setup = _setup(path, fmt, group, header, (sy, sx), step_y, step_x, sample_tilt_key, tilt_key)
    return layout, (ny, nx), setup


def _check_roi_order(path, group, ny, nx) -> None:
    """A Bruker region of interest lists each frame's map row and column (``EBSD/SEM/IY, IX``);
    frames are published in file order, so the points written so far must be in scan order."""
    iy, ix = (np.asarray(group[f"EBSD/SEM/{k}"][()], np.int64).ravel() for k in ("IY", "IX"))
    n = min(iy.size, ix.size, ny * nx)
    if n == 0:
        return
    rows, cols = iy[:n] - iy[0], ix[:n] - ix[0]
    if (rows < 0).any() or (cols < 0).any() or (cols >= nx).any() \
            or not np.array_equal(rows * nx + cols, np.arange(n)):
        raise InputError(f"{path}: its region of interest (EBSD/SEM/IY, IX) lists points out of scan order, which "
                         f"--follow cannot map as they arrive; index it when the acquisition ends (liveindex publish "
                         f"--file {path})")


def _setup(path, fmt, group, header, shape, step_y, step_x, sample_tilt_key, tilt_key) -> FileSetup:
    """The header's geometry, judged as file_setup.read_setup judges a finished file's."""
    setup = FileSetup(path, fmt)
    pc = None
    if fmt == "kikuchipy h5ebsd":
        values = [np.asarray(header[k][()], float).ravel() for k in ("pcx", "pcy", "pcz") if k in header]
        pc = tuple(float(v.mean()) for v in values) if len(values) == 3 and all(v.size for v in values) else None
    elif fmt == "Bruker h5ebsd":  # per point, written as the scan goes: the points written so far
        data = group["EBSD/Data"]
        if all(k in data for k in ("PCX", "PCY", "DD")):
            for k in ("PCX", "PCY", "DD"):
                data[k].refresh()
            values = [np.asarray(data[k][()], float).ravel() for k in ("PCX", "PCY", "DD")]
            n = min(v.size for v in values)
            pc = tuple(float(v[:n].mean()) for v in values) if n else None
    elif "Pattern Center Calibration" in header:  # EDAX: x*, y*, z* in its own convention
        calibration = header["Pattern Center Calibration"]
        star = [_scalar(calibration, k) for k in ("x-star", "y-star", "z-star")]
        if None not in star:
            from kikuchipy.detectors import EBSDDetector

            pc = tuple(float(v) for v in EBSDDetector(shape=shape, pc=star, convention="edax").pc_average)
    problem = pc_problem(pc) if pc is not None else None
    if pc is None:
        setup.missing["pc"] = "stores no projection centre"
    elif problem:
        setup.missing["pc"] = f"holds {problem}"
    else:
        setup.pc = pc
    tilt = _scalar(header, sample_tilt_key)
    if tilt is not None and np.isfinite(float(tilt)) and 0.0 < float(tilt) <= 90.0:
        setup.sample_tilt = float(tilt)
    else:
        setup.missing["sample_tilt"] = ("stores no sample tilt" if tilt is None else
                                        f"holds sample tilt {float(tilt):g} deg, no tilt of an EBSD sample")
    detector_tilt = _scalar(header, tilt_key)
    if detector_tilt is not None and np.isfinite(float(detector_tilt)) and -90.0 <= float(detector_tilt) <= 90.0:
        setup.tilt = float(detector_tilt)
    else:
        setup.missing["tilt"] = "stores no detector tilt"
    dy, dx = _scalar(header, step_y), _scalar(header, step_x)
    if dy is not None and dx is not None and float(dy) > 0 and float(dx) > 0:
        setup.step = (float(dy), float(dx))
    else:
        setup.missing["step"] = "stores no step size"
    background = None
    for key in ("static_background", "StaticBackground"):
        if key in header:
            background = np.asarray(header[key][()], np.float32)
    if background is not None and background.shape == tuple(shape) and np.ptp(background) > 0:
        setup.static_background = background
    else:
        setup.missing["background"] = "stores no static background"
    return setup

"""EBSD pattern files followed while the acquisition writes them (``liveindex publish --follow``).

Where each progressively written vendor format keeps its frames (the layouts kikuchipy 0.13
reads, ``kikuchipy/io/plugins/*/_api.py``):

- NORDIF ``.dat``: uint8 frames back to back from byte 0; scan and pattern size, tilts and
  step in the ``Setting.txt`` beside it, the static background in its ``.bmp`` (read by
  kikuchipy, lazily: a file still growing opens as well as a finished one).
- EDAX ``.up1`` (uint8) / ``.up2`` (uint16): a header (version, width, height, offset of the
  first frame; from version 3 the scan's columns, rows, a hexagonal-grid flag and the steps),
  then the frames back to back. Version 1 stores no scan size: give ``--scan-shape``.
- Oxford ``.ebsp``: a version, then a table of each scan point's record position (written
  before the records), then one record per point: a header, the frame, a footer (beam
  position). Records may be in another order than the scan's (within a row): a point is
  published once every record its prefix of the scan needs is complete. The scan shape is
  only known from the last record's beam position: give ``--scan-shape`` unless the table's
  count is a square.

None stores a projection centre: give ``--pc`` (as for ``liveindex index``).

h5ebsd files (kikuchipy, Bruker, EDAX) are HDF5: they are followed through HDF5 in its SWMR
mode, not by byte offsets (growing_h5ebsd.py), with the PC from their header where it is real.
"""

from __future__ import annotations

import math
import struct
import warnings
from pathlib import Path

import numpy as np

from liveindex.models import modality as modalities
from liveindex.models.errors import InputError
from liveindex.models.growing_file import (
    DEFAULT_FOLLOW_TIMEOUT,
    FollowedSource,
    GrowingFile,
    NotWrittenYet,
    RecordLayout,
    when_written,
)

from .file_setup import FileSetup
from .files import _geometry_of, step_of
from .growing_h5ebsd import H5_SUFFIXES, open_h5ebsd
from .master_patterns import phases_from_spec

FOLLOWED_FORMATS = {".dat": "NORDIF .dat", ".up1": "EDAX .up1/.up2", ".up2": "EDAX .up1/.up2", ".ebsp": "Oxford .ebsp"}
_NO_SETUP = {"pc": "stores no projection centre", "sample_tilt": "stores no sample tilt",
             "tilt": "stores no detector tilt", "step": "stores no step size",
             "background": "stores no static background"}


def follow_file(path, *, phases=("ni",), pc=None, pc_convention: str = "bruker", tilt=None, step=None,
                scan_shape=None, follow_timeout: float = DEFAULT_FOLLOW_TIMEOUT) -> FollowedSource:
    """A FollowedSource over an EBSD file being written; ``scan_shape`` (ny, nx) where the file
    does not say it. Waits up to ``follow_timeout`` for the file's header to be written."""
    path = Path(path)
    fmt = FOLLOWED_FORMATS.get(path.suffix.lower())
    if fmt is None and path.suffix.lower() not in H5_SUFFIXES:
        raise InputError(f"--follow reads files written during acquisition: NORDIF .dat, EDAX .up1/.up2, Oxford "
                         f".ebsp and h5ebsd written in SWMR mode, not {path.suffix or path.name!r}; index a finished "
                         "file with --file")
    if not path.exists():
        raise InputError(f"{path} does not exist; start --follow once the acquisition has created the file")
    if fmt is None:  # h5ebsd: HDF5 appended in SWMR mode, read through HDF5, not by byte offsets
        growing, nav_shape, setup = open_h5ebsd(path, follow_timeout=follow_timeout, scan_shape=scan_shape)
        try:
            geometry = _geometry_of(setup, growing.layout.pattern_shape, pc=pc, convention=pc_convention, tilt=tilt,
                                    need_pc=True)
            source = FollowedSource(growing, modality=modalities.load("ebsd"), nav_shape=nav_shape,
                                    setup=geometry.to_wire(), phases=phases_from_spec(phases),
                                    step=step_of(setup, step), metadata={"format": setup.format})
        except BaseException:
            growing.close()
            raise
        source.geometry, source.file_setup = geometry, setup
        return source
    reader = {".dat": _nordif, ".up1": _edax, ".up2": _edax, ".ebsp": _oxford}[path.suffix.lower()]
    layout, nav_shape, setup = when_written(lambda: reader(path, scan_shape), path, follow_timeout, "this file")
    geometry = _geometry_of(setup, layout.pattern_shape, pc=pc, convention=pc_convention, tilt=tilt, need_pc=True)
    growing = GrowingFile(path, layout, follow_timeout=follow_timeout)
    source = FollowedSource(growing, modality=modalities.load("ebsd"), nav_shape=nav_shape,
                            setup=geometry.to_wire(), phases=phases_from_spec(phases), step=step_of(setup, step),
                            metadata={"format": fmt})
    source.geometry, source.file_setup = geometry, setup
    return source


class _HeaderNotWritten(NotWrittenYet):
    """The file exists but its header is not complete yet."""


def _read(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) < size:
        raise _HeaderNotWritten(f"the header ({offset + size} bytes) is not written yet")
    return data


def _nav_shape(scan_shape, expected: int | None, what: str, known=None):
    """(ny, nx): the user's --scan-shape (checked against the file's count), else the file's own
    ``known`` shape, else a square of ``expected`` points."""
    if scan_shape is None and known is not None:
        return int(known[0]), int(known[1])
    if scan_shape is not None:
        ny, nx = scan_shape
        if expected is not None and ny * nx != expected:
            raise InputError(f"--scan-shape {nx}x{ny} has {ny * nx} points but {what} holds {expected}; give the "
                             "acquisition's scan size")
        return int(ny), int(nx)
    if expected is None:
        raise InputError(f"{what} does not store the scan size; give it with --scan-shape WxH")
    side = math.isqrt(expected)
    if side * side == expected:
        return side, side
    raise InputError(f"{what} holds {expected} points but not the scan's rows and columns; give them with "
                     "--scan-shape WxH")


def _nordif(path: Path, scan_shape):
    import kikuchipy as kp

    from .file_setup import read_setup

    if not (path.parent / "Setting.txt").exists():
        raise InputError(f"{path}: no Setting.txt beside it; NORDIF writes the scan and pattern size there")
    try:
        with warnings.catch_warnings():  # a missing background .bmp: read_setup says so in its own words
            warnings.filterwarnings("ignore", message="Could not read static background")
            signal = kp.load(path, lazy=True)  # reads Setting.txt and the background .bmp; no frame is read
    except Exception as exc:  # the reader raises many types for a damaged Setting.txt
        raise InputError(f"cannot read {path.parent / 'Setting.txt'} ({type(exc).__name__}: {exc})") from None
    shape = signal.data.shape
    sy, sx = shape[-2:]
    nav = shape[:-2] if len(shape) == 4 else (1, shape[0]) if len(shape) == 3 else (1, 1)
    ny, nx = _nav_shape(scan_shape, int(np.prod(nav)), "Setting.txt", known=nav)
    layout = RecordLayout("NORDIF .dat", 0, sy * sx, (sy, sx), "uint8", ny * nx)
    return layout, (ny, nx), read_setup(signal, path)


def _edax(path: Path, scan_shape):
    version, sx, sy, offset = struct.unpack("<4I", _read(path, 0, 16))
    dtype = "uint8" if path.suffix.lower() == ".up1" else "uint16"
    setup = FileSetup(path, "EDAX .up1/.up2", missing=dict(_NO_SETUP))
    if version == 2:
        raise InputError(f"{path} is an EDAX binary file of version 2, which has no published layout; "
                         "export version 1 or 3")
    expected = known = None
    if version >= 3:
        nx, ny = struct.unpack("<2I", _read(path, 17, 8))
        hexagonal = _read(path, 25, 1)[0]
        dx, dy = struct.unpack("<2d", _read(path, 26, 16))
        # A hexagonal grid's points are taken in file order, as kikuchipy reads it (one row):
        # its header's columns and rows do not give the count, so --scan-shape does.
        expected, known = (None, None) if hexagonal else (nx * ny, (ny, nx))
        if dx > 0 and dy > 0:
            setup.step = (float(dy), float(dx))
            del setup.missing["step"]
    ny, nx = _nav_shape(scan_shape, expected, f"{path.name} (EDAX version {version})", known=known)
    layout = RecordLayout("EDAX .up1/.up2", offset, sx * sy * np.dtype(dtype).itemsize, (sy, sx), dtype, ny * nx)
    return layout, (ny, nx), setup


_EBSP_HEADER = np.dtype([("is_compressed", "<i4"), ("nrows", "<i4"), ("ncols", "<i4"), ("n_bytes", "<i4")])


def _oxford(path: Path, scan_shape):
    (first,) = struct.unpack("<q", _read(path, 0, 8))
    version = -first if first < 0 else 0
    table = 0 if version == 0 else 9 if version > 3 else 8
    header_bytes = 16 + (8 if version >= 5 else 0)  # map x, y (int32) before the others from version 5
    (start0,) = struct.unpack("<q", _read(path, table, 8))
    if start0 <= table:
        raise _HeaderNotWritten("the table of pattern positions is not written yet")
    # The table ends where the first record starts: the smallest position it lists (read in
    # pieces: its first entry may point at the last record, far past what is written yet).
    end, at = start0, table
    while at < end:
        with open(path, "rb") as f:
            f.seek(at)
            data = f.read(min(end - at, 8192))
        if len(data) < 8:
            raise _HeaderNotWritten("the table of pattern positions is not written yet")
        piece = np.frombuffer(data[:len(data) // 8 * 8], "<i8")
        listed = piece[piece > table]
        end = min(end, int(listed.min())) if len(listed) else end
        at += 8 * len(piece)
    starts = np.frombuffer(_read(path, table, end - table), "<i8")
    if (starts <= 0).any():
        raise _HeaderNotWritten("the table of pattern positions is not complete yet")
    head = np.frombuffer(_read(path, end + header_bytes - 16, 16), _EBSP_HEADER)[0]
    if head["is_compressed"]:
        raise InputError(f"{path} holds compressed patterns, which liveindex cannot read; switch compression off")
    sy, sx, n_bytes = int(head["nrows"]), int(head["ncols"]), int(head["n_bytes"])
    dtype = "uint8" if n_bytes == sy * sx else "uint16"
    footer = 16 if version == 1 else 0
    if version > 1:
        flags_at = end + header_bytes + n_bytes
        has_x = _read(path, flags_at, 1)[0]
        has_y = _read(path, flags_at + 1 + 8 * bool(has_x), 1)[0]
        footer = 2 + 8 * bool(has_x) + 8 * bool(has_y)
    record = header_bytes + n_bytes + footer
    order = (starts - end) // record
    if ((starts - end) % record).any():
        raise InputError(f"{path}: its pattern positions are not whole records of {record} bytes; the file is damaged")
    ny, nx = _nav_shape(scan_shape, len(starts), f"{path.name} (Oxford .ebsp)")
    layout = RecordLayout("Oxford .ebsp", end, record, (sy, sx), dtype, ny * nx, frame_offset=header_bytes,
                          order=order.astype(np.int64))
    return layout, (ny, nx), FileSetup(path, "Oxford .ebsp", missing=dict(_NO_SETUP))

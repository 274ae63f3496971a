"""4D-STEM files for the spot modality, and the simulated scan as a publisher source.

Read: ``.npy`` (ny, nx, H, W) or (N, H, W) (memory-mapped); through rosettasciio (lazily,
dask): HyperSpy/pyxem ``.hspy`` and ``.zspy``, NanoMegas ``.blo``, Merlin ``.mib`` (with its
``.hdr``, which gives the scan's lines; rows as stored, as LiberTEM and the live stream give
them); DECTRIS Arina HDF5 master files (``*_master.h5`` and
the data files it links, bitshuffle/LZ4 via hdf5plugin) with h5py, a page at a time, in the
layout rosettasciio's arina reader reads (that reader has no lazy mode: it would load the whole
scan into memory). Frames uint8-uint32 and float32 pass through (in native byte order: a
``.mib`` holds big-endian counts); other dtypes are converted to float32. Where the file's signal axes are calibrated in 1/angstrom (or 1/nm) and the user gave
no ``--calibration``, the file's is used.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from liveindex.models.arrays import ArraySource
from liveindex.models.errors import InputError
from liveindex.models.modality import FRAME_DTYPES, ScanSource

log = logging.getLogger(__name__)

READERS = {  # suffix -> rosettasciio plugin module
    ".hspy": "rsciio.hspy", ".zspy": "rsciio.zspy", ".blo": "rsciio.blockfile", ".mib": "rsciio.quantumdetector",
}


class LazyFrames:
    """(N, H, W) frames of a lazy (dask) 3D or 4D array, computed a page at a time."""

    def __init__(self, data):
        self.data = data
        self.shape = (int(np.prod(data.shape[:-2])), *data.shape[-2:])
        self.dtype = np.dtype(data.dtype)

    def __getitem__(self, sl):
        flat = self.data.reshape(self.shape)
        part = flat[sl]
        return native_order(np.asarray(part.compute() if hasattr(part, "compute") else part))


def native_order(frames: np.ndarray) -> np.ndarray:
    """Frames in the machine's byte order: pages are sent as raw bytes under the dtype's name."""
    return frames if frames.dtype.isnative else frames.astype(frames.dtype.newbyteorder("="))


class ArinaFrames:
    """(N, H, W) frames of a DECTRIS Arina master file: its ``entry/data/data_NNNNNN`` datasets
    (links to the data files) in name order, as one sequence, read a page at a time."""

    def __init__(self, path):
        import h5py
        import hdf5plugin  # noqa: F401  (registers the bitshuffle/LZ4 filter the detector writes with)

        self.path = str(path)
        self.file = h5py.File(self.path, "r")
        group = self.file["entry/data"]
        self.datasets = [group[name] for name in sorted(group)]
        if not self.datasets:
            raise ValueError("its entry/data group holds no data sets")
        counts = [d.shape[0] for d in self.datasets]
        self.starts = np.cumsum([0, *counts])
        self.shape = (int(self.starts[-1]), *self.datasets[0].shape[1:])
        self.dtype = np.dtype(self.datasets[0].dtype)
        if len(self.shape) != 3 or any(d.shape[1:] != self.shape[1:] or d.dtype != self.dtype for d in self.datasets):
            raise ValueError(f"its data sets are not one stack of frames ({[d.shape for d in self.datasets]})")

    @property
    def ndim(self):
        return 3

    def __getitem__(self, sl):
        first, stop, step = sl.indices(self.shape[0])
        if step != 1:
            raise IndexError("Arina frames are read in runs of consecutive frames")
        parts = []
        for k, dataset in enumerate(self.datasets):
            a, b = max(first, self.starts[k]), min(stop, self.starts[k + 1])
            if a < b:
                parts.append(dataset[a - self.starts[k]:b - self.starts[k]])
        if not parts:
            return np.empty((0, *self.shape[1:]), self.dtype)
        return native_order(np.concatenate(parts) if len(parts) > 1 else parts[0])


def arina_nav_shape(count: int) -> tuple[int, int]:
    """The scan's (ny, nx): square where the count is a square (as rosettasciio's reader assumes;
    the master file does not say), else one line."""
    side = int(round(np.sqrt(count)))
    return (side, side) if side * side == count else (1, count)


def read_file(path) -> tuple[object, dict]:
    """A 4D-STEM file -> (array (ny, nx, H, W) or (N, H, W), numpy or dask; file facts)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not (path.is_file() or (suffix == ".zspy" and path.is_dir())):  # a .zspy is a zarr folder
        raise InputError(f"{path} does not exist; give a .npy, .hspy, .zspy, .blo, .mib or DECTRIS _master.h5 file")
    if suffix == ".npy":
        try:
            return np.load(path, mmap_mode="r"), {}
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read {path} as a .npy array ({exc}); save frames with np.save") from None
    if suffix == ".h5":
        if not path.name.endswith("_master.h5"):
            raise InputError(f"{path}: DECTRIS Arina scans are read from their *_master.h5 file")
        try:
            return ArinaFrames(path), {}
        except Exception as exc:  # h5py raises many types for foreign files
            raise InputError(f"cannot read {path} as a DECTRIS Arina master file ({type(exc).__name__}: "
                             f"{str(exc)[:200]})") from None
    if suffix not in READERS:
        raise InputError(f"{path}: spot patterns are read from .npy, .hspy, .zspy, .blo, .mib and DECTRIS _master.h5 "
                         f"files, not {suffix or 'files without a suffix'}")
    import importlib

    try:
        reader = importlib.import_module(READERS[suffix])
        signals = reader.file_reader(str(path), lazy=True)
    except Exception as exc:  # readers raise many types for foreign files
        raise InputError(f"cannot read {path} with rosettasciio ({type(exc).__name__}: {str(exc)[:200]}); is it a "
                         f"4D-STEM {suffix} file?") from None
    signal = max(signals, key=lambda s: np.prod(s["data"].shape))
    data = signal["data"]
    if suffix == ".mib":
        # rosettasciio turns a .mib's rows over (np.flip on the rows); LiberTEM, and so the
        # live Merlin stream through libertem-live and `liveindex replay --as merlin`, keep
        # them as stored. Turned back (lazily), a scan indexed from its file and live is the
        # same scan, not its mirror image.
        data = data[..., ::-1, :]
    facts = {}
    axes = signal.get("axes") or []
    if len(axes) >= 2:
        scale, units = axes[-1].get("scale"), str(axes[-1].get("units") or "")
        per_angstrom = {"1/a": 1.0, "a^-1": 1.0, "å^-1": 1.0, "1/å": 1.0, "1/nm": 0.1, "nm^-1": 0.1}
        factor = per_angstrom.get(units.lower().replace(" ", ""))
        if factor and scale:
            facts["calibration"] = float(scale) * factor
        nav = [a for a in axes[:-2]]
        if len(nav) == 2 and all(a.get("scale") for a in nav):
            facts["step"] = (float(nav[1]["scale"]), float(nav[0]["scale"]))
    return data, facts


def load_file(path, *, modality, setup: dict, phases) -> ScanSource:
    """A saved scan as a ScanSource (the setup completed by the file's calibration)."""
    data, facts = read_file(path)
    if data.ndim not in (3, 4):
        raise InputError(f"{path} holds an array of shape {data.shape}; spot patterns are (ny, nx, H, W) or (N, H, W)")
    setup = dict(setup)
    if setup.get("calibration") is None:
        if "calibration" not in facts:
            raise InputError(f"{path} carries no reciprocal-space calibration; give --calibration in 1/angstrom per "
                             "pixel (e.g. 0.02)")
        setup["calibration"] = facts["calibration"]
        log.info("calibration %.5f 1/A per pixel from %s", setup["calibration"], path)
    if isinstance(data, ArinaFrames) and np.dtype(data.dtype).name not in FRAME_DTYPES:
        raise InputError(f"{path} holds {data.dtype} frames; DECTRIS frames are uint8-uint32")
    # Other dtypes (float64, signed integers) travel as float32, converted a page at a time by
    # ArraySource.read: a memory-mapped scan is never copied whole.
    if isinstance(data, np.ndarray):
        return ArraySource(data, modality=modality, setup=setup, phases=phases, step=facts.get("step", (1.0, 1.0)),
                           name=Path(path).name)
    # An ArraySource over one frame checks the setup and dtype; the lazy frames then replace it
    # (ArraySource reshapes its array, which would compute a dask array whole).
    source = ArraySource(np.zeros((1, *data.shape[-2:]), data.dtype), modality=modality, setup=setup, phases=phases,
                         step=facts.get("step", (1.0, 1.0)), name=Path(path).name)
    if isinstance(data, ArinaFrames):
        source.patterns, source.nav_shape = data, arina_nav_shape(data.shape[0])
    else:
        source.patterns = LazyFrames(data)
        source.nav_shape = tuple(data.shape[:-2]) if data.ndim == 4 else (1, data.shape[0])
    return source


class SimulatedSpotSource(ScanSource):
    """The simulated polycrystal (simulator.py) for the publisher and the demo; truth included."""

    def __init__(self, modality, scan, setup: dict, phases):
        self.modality = modality
        self.scan = scan
        self.nav_shape = scan.nav_shape
        self.step = (1.0, 1.0)
        self.pattern_shape = scan.renderer.pattern_shape
        self.dtype = "uint16"
        self.setup = dict(setup)
        self.phases = list(phases)
        self.truth = {"quaternion": scan.truth_q, "phase_id": scan.truth_phase}
        self.metadata = {"source": "simulated 4D-STEM precession scan", "seed": scan.seed}

    def read(self, first: int, count: int) -> np.ndarray:
        return self.scan.render(first, count)

"""4D-STEM files for the spot modality, and the simulated scan as a publisher source.

Read: ``.npy`` (ny, nx, H, W) or (N, H, W) (memory-mapped), and through rosettasciio
(lazily, dask): HyperSpy/pyxem ``.hspy`` and ``.zspy``, NanoMegas ``.blo``, Merlin ``.mib``
(with its ``.hdr``) and DECTRIS Arina HDF5 master files (``*_master.h5``, bitshuffle/LZ4 via
hdf5plugin). Frames uint8-uint32 and float32 pass through; other dtypes are converted to
float32. Where the file's signal axes are calibrated in 1/angstrom (or 1/nm) and the user gave
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
    ".h5": "rsciio.arina",
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
        return np.asarray(part.compute() if hasattr(part, "compute") else part)


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
    if np.dtype(data.dtype).name not in FRAME_DTYPES:
        data = data.astype(np.float32)
    if isinstance(data, np.ndarray):
        return ArraySource(data, modality=modality, setup=setup, phases=phases, step=facts.get("step", (1.0, 1.0)),
                           name=Path(path).name)
    # An ArraySource over one frame checks the setup and dtype; the lazy frames then replace it
    # (ArraySource reshapes its array, which would compute a dask array whole).
    source = ArraySource(np.zeros((1, *data.shape[-2:]), data.dtype), modality=modality, setup=setup, phases=phases,
                         step=facts.get("step", (1.0, 1.0)), name=Path(path).name)
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

"""EBSD scan sources: the simulated detector and saved scans (.npy, every format kikuchipy reads).

A source describes its scan (what goes into ``scan_start``) and hands out pages of
frames by index range, so a page lost with a worker can be rendered or read again.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from liveindex.models import modality as modalities
from liveindex.models.arrays import ArraySource, check_pattern_array
from liveindex.models.errors import InputError
from liveindex.models.modality import FRAME_DTYPES, ScanSource

from .geometry import DetectorGeometry
from .master_patterns import phases_from_spec, record_of
from .simulator import SimulatedScan

log = logging.getLogger(__name__)


class SimulatedSource(ScanSource):
    """The simulated detector (simulator.py) as a publisher source; truth in ``truth``."""

    def __init__(self, scan: SimulatedScan):
        self.modality = modalities.load("ebsd")
        self.scan = scan
        self.nav_shape = scan.nav_shape
        self.step = (1.0, 1.0)
        self.geometry = scan.geometry
        self.pattern_shape = tuple(scan.geometry.pattern_shape)
        self.setup = scan.geometry.to_wire()
        self.phases = [record_of(key) for key in scan.phases]
        self.dtype = "uint8"
        self.truth = {"quaternion": scan.truth, "phase_id": scan.truth_phase.astype(np.int16)}
        self.metadata = {"source": "simulated", "noise": scan.noise, "seed": scan.seed,
                         "grains": int(len(scan.grain_rotations))}

    def read(self, first: int, count: int) -> np.ndarray:
        return self.scan.render(first, count)


def array_source(patterns, *, geometry: DetectorGeometry, phases=("ni",), step=(1.0, 1.0), name: str = "array",
                 metadata: dict | None = None) -> ArraySource:
    """An EBSD scan held in an array, with its detector geometry (its pattern shape is the array's)."""
    check_pattern_array(patterns, name)
    geometry = geometry.with_shape(patterns.shape[-2:])
    source = ArraySource(patterns, modality=modalities.load("ebsd"), setup=geometry.to_wire(),
                         phases=phase_records(phases), step=step, name=name, metadata=metadata)
    source.geometry = geometry
    return source


def phase_records(phases) -> list:
    """Records, built-in names, phase keys or files (as --phases takes them) -> records."""
    return phases_from_spec(phases)


def load_file(path, *, geometry: DetectorGeometry | None = None, phases=("ni",)) -> ArraySource:
    """A saved scan: ``.npy`` or any pattern file kikuchipy reads.

    The geometry given wins; otherwise the file's own detector (kikuchipy files carry
    one); otherwise the default geometry with the file's pattern shape.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist; give the path of a .npy array or a pattern file kikuchipy reads")
    if path.suffix.lower() == ".npy":
        try:
            patterns = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as exc:  # a damaged header raises ValueError, EOFError, SyntaxError, OSError...
            raise InputError(f"{path} is not a readable numpy array ({type(exc).__name__}: {exc}); "
                             "save patterns with np.save, or check the file was copied completely") from None
        return array_source(patterns, geometry=geometry or DetectorGeometry(), phases=phases, name=str(path))
    return _load_with_kikuchipy(path, geometry=geometry, phases=phases)


def _working_distance(signal) -> float | None:
    """The working distance (mm) kikuchipy read from the file, where it has one."""
    try:
        wd = float(signal.metadata.get_item("Acquisition_instrument.SEM.working_distance"))
    except (AttributeError, TypeError, ValueError):
        return None
    return wd if 0 < wd < 1000 else None


def _load_with_kikuchipy(path: Path, *, geometry, phases) -> ArraySource:
    import kikuchipy as kp

    try:
        signal = kp.load(path, lazy=True)
    except Exception as exc:  # readers raise many types for foreign files
        raise InputError(
            f"cannot read {path} ({type(exc).__name__}: {exc}); liveindex reads .npy arrays and the pattern "
            "formats kikuchipy reads (EDAX/Oxford/Bruker h5ebsd, .up1/.up2, .ebsp, NORDIF .dat, EMsoft, kikuchipy h5ebsd)"
        ) from None
    if isinstance(signal, list):
        signal = signal[0]
    if not hasattr(signal, "detector"):
        raise InputError(f"{path} holds {type(signal).__name__}, not EBSD patterns")
    try:
        patterns = np.asarray(signal.data)
    except Exception as exc:  # lazy readers fail here on truncated files
        raise InputError(f"cannot read the patterns in {path} ({type(exc).__name__}: {exc}); the file may be "
                         "truncated: copy it again") from None
    if patterns.ndim == 3 and signal.axes_manager.navigation_dimension == 1:
        patterns = patterns[None]
    if patterns.dtype.name not in FRAME_DTYPES:
        patterns = patterns.astype(np.float32)
    if geometry is None:
        det = signal.detector
        geometry = DetectorGeometry(pattern_shape=patterns.shape[-2:], pc=tuple(det.pc_average),
                                    sample_tilt=float(det.sample_tilt), tilt=float(det.tilt),
                                    binning=int(det.binning), px_size=float(det.px_size))
        log.info("using the detector geometry stored in %s: PC %s (Bruker), sample tilt %.1f deg",
                 path, tuple(round(v, 4) for v in geometry.pc), geometry.sample_tilt)
    wd = _working_distance(signal)
    if wd is not None and geometry.working_distance_mm is None:
        geometry = replace(geometry, working_distance_mm=wd)  # for the .ang and .ctf headers
    steps = [abs(a.scale) for a in signal.axes_manager.navigation_axes][::-1] or [1.0]
    step = tuple(steps) if len(steps) == 2 else (1.0, steps[0])
    return array_source(patterns, geometry=geometry, phases=phases, step=step, name=str(path),
                        metadata={"format": type(signal).__name__})


def python_source(patterns, *, detector=None, phases=("ni",), step=None) -> tuple[ArraySource, dict]:
    """``liveindex.index``'s source: a kikuchipy EBSD signal (its detector, static background and
    step), or a numpy/dask array of (N, H, W) or (ny, nx, H, W) patterns with ``detector`` (a
    kikuchipy EBSDDetector or a dict). Returns the source and the options the signal carries."""
    carried = {}
    name = "array"
    if hasattr(patterns, "axes_manager") and hasattr(patterns, "detector"):  # a kikuchipy EBSD signal
        signal = patterns
        detector = detector if detector is not None else signal.detector
        background = getattr(signal, "static_background", None)
        if isinstance(background, np.ndarray) and background.shape == tuple(signal.axes_manager.signal_shape[::-1]):
            carried["static_background"] = background
        if step is None:
            scales = [abs(a.scale) for a in signal.axes_manager.navigation_axes][::-1]
            step = tuple(scales) if len(scales) == 2 else (1.0, scales[0]) if scales else (1.0, 1.0)
        name = f"kikuchipy {type(signal).__name__}"
        patterns = signal.data
        if patterns.ndim == 3 and signal.axes_manager.navigation_dimension == 1:
            patterns = patterns[None]
    if detector is None:
        raise InputError("liveindex.index needs the detector geometry for an array: pass detector=EBSDDetector(...) "
                         "or detector={'pc': (x, y, z), 'convention': 'bruker', 'sample_tilt': 70}")
    if patterns.dtype.name not in FRAME_DTYPES:
        patterns = patterns.astype(np.float32)
    geometry = _geometry_of(detector, tuple(patterns.shape[-2:]))
    source = array_source(patterns, geometry=geometry, phases=phases, step=step or (1.0, 1.0), name=name)
    return source, carried


def _geometry_of(detector, pattern_shape) -> DetectorGeometry:
    """A kikuchipy EBSDDetector or a dict -> DetectorGeometry (PC in the Bruker convention)."""
    if isinstance(detector, DetectorGeometry):
        return detector.with_shape(pattern_shape)
    if hasattr(detector, "pc_average"):
        return DetectorGeometry(pattern_shape=pattern_shape, pc=tuple(float(v) for v in detector.pc_average),
                                sample_tilt=float(detector.sample_tilt), tilt=float(detector.tilt),
                                binning=int(detector.binning), px_size=float(detector.px_size))
    if isinstance(detector, dict):
        values = dict(detector)
        if "pc" not in values:
            raise InputError("the detector dict has no 'pc'; give {'pc': (x, y, z), 'convention': 'bruker'}")
        pc = tuple(float(v) for v in values.pop("pc"))
        convention = values.pop("convention", "bruker")
        known = {"sample_tilt", "tilt", "binning", "px_size", "energy_kv"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"detector keys {unknown} are not known; use pc, convention, {', '.join(sorted(known))}")
        return DetectorGeometry.from_convention(pc, convention, pattern_shape=pattern_shape, **values)
    raise InputError(f"detector must be a kikuchipy EBSDDetector or a dict, not {type(detector).__name__}")

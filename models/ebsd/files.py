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
from liveindex.models.modality import ScanSource

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


def load_file(path, *, geometry: DetectorGeometry | None = None, phases=("ni",), pc=None, pc_convention: str = "bruker",
              tilt: float | None = None, step=None, need_pc: bool = True) -> ArraySource:
    """A saved scan: ``.npy`` or any pattern file kikuchipy reads.

    ``geometry`` (a whole detector geometry) wins over everything. Otherwise what the user
    gave (``pc`` in ``pc_convention``, sample ``tilt``, ``step`` as DX [DY] micrometres) wins
    over what the file stores, and what the file stores is used where it is real
    (file_setup.py); the log says where each value came from. A vendor file with no real PC
    and no ``pc`` is refused with the fix, unless ``need_pc`` is False (``liveindex
    calibrate`` starts its search from the default PC); a .npy array stores nothing, so it
    gets the simulated detector's PC with a warning that says what to pass. The file's
    setup is ``source.file_setup`` (its static background for the indexer).
    """
    from .file_setup import FileSetup

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist; give the path of a .npy array or a pattern file kikuchipy reads")
    if path.suffix.lower() == ".npy":
        try:
            patterns = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as exc:  # a damaged header raises ValueError, EOFError, SyntaxError, OSError...
            raise InputError(f"{path} is not a readable numpy array ({type(exc).__name__}: {exc}); "
                             "save patterns with np.save, or check the file was copied completely") from None
        working_distance = None
        setup = FileSetup(path, "numpy array", missing={
            "pc": "stores no projection centre", "sample_tilt": "stores no sample tilt",
            "tilt": "stores no detector tilt", "step": "stores no step size", "background": "stores no static background"})
    else:
        patterns, setup, working_distance = _read_with_kikuchipy(path)
    check_pattern_array(patterns, str(path))
    if geometry is None:
        geometry = _geometry_of(setup, patterns.shape[-2:], pc=pc, convention=pc_convention, tilt=tilt,
                                need_pc=need_pc)
    if working_distance is not None and geometry.working_distance_mm is None:
        geometry = replace(geometry, working_distance_mm=working_distance)  # for the .ang and .ctf headers
    source = array_source(patterns, geometry=geometry, phases=phases, step=step_of(setup, step), name=str(path),
                          metadata={"format": setup.format})
    source.file_setup = setup
    return source


def _geometry_of(setup, shape, *, pc, convention: str, tilt, need_pc: bool) -> DetectorGeometry:
    """The scan's detector geometry from the user's values, else the file's real ones, else defaults (logged)."""
    from .file_setup import DEFAULT_SAMPLE_TILT
    from .geometry import DEFAULT_PC

    name = f"{setup.path.name} ({setup.format})"
    if setup.found():
        log.info("%s: from the file: %s", name, setup.found())
    if tilt is not None and setup.sample_tilt is not None and abs(tilt - setup.sample_tilt) > 1e-6:
        log.info("%s: sample tilt %g deg from --tilt, not the file's %g deg", name, tilt, setup.sample_tilt)
    elif tilt is None and setup.sample_tilt is None:
        log.warning("%s %s: using %g deg (--tilt to set it)", name, setup.missing["sample_tilt"], DEFAULT_SAMPLE_TILT)
    if setup.tilt is None:
        log.info("%s %s: using 0 deg", name, setup.missing["tilt"])
    extra = {"pattern_shape": tuple(shape), "binning": setup.binning, "px_size": setup.px_size,
             "sample_tilt": tilt if tilt is not None else (setup.sample_tilt or DEFAULT_SAMPLE_TILT),
             "tilt": setup.tilt or 0.0}
    if pc is not None:
        geometry = DetectorGeometry.from_convention(tuple(float(v) for v in pc), convention, **extra)
        if setup.pc is not None:
            log.info("%s: projection centre %s (Bruker) from --pc, not the file's %s", name, _pc_text(geometry.pc),
                     _pc_text(setup.pc))
        return geometry
    if setup.pc is not None:
        return DetectorGeometry(pc=setup.pc, **extra)
    fix = (f"pass it with --pc X Y Z (Bruker; --pc-convention tsl|oxford|emsoft for the others), or find it with "
           f"liveindex calibrate {setup.path} --pc X Y Z (a start within 0.05 of it)")
    if need_pc and setup.format != "numpy array":
        raise InputError(f"{setup.path} ({setup.format}) {setup.missing['pc']}; {fix}")
    if not need_pc:  # liveindex calibrate: the search starts somewhere
        log.warning("%s %s: the search starts from the simulated detector's %s (Bruker) and looks 0.05 around it; "
                    "give a start within 0.05 of the scan's PC with --pc X Y Z", name, setup.missing["pc"],
                    _pc_text(DEFAULT_PC))
        return DetectorGeometry(pc=DEFAULT_PC, **extra)
    log.warning("%s %s: using the simulated detector's %s (Bruker); %s", name, setup.missing["pc"],
                _pc_text(DEFAULT_PC), fix)
    return DetectorGeometry(pc=DEFAULT_PC, **extra)


def step_of(setup, step) -> tuple[float, float]:
    """(dy, dx) micrometres: ``step`` (DX [DY]) where given, else the file's (``setup``: a
    FileSetup, or None for a simulated scan), else 1 (logged)."""
    name = f"{setup.path.name} ({setup.format})" if setup is not None else "the scan"
    if step is not None:
        values = [float(v) for v in (step if np.ndim(step) else [step])]
        if not 1 <= len(values) <= 2 or not all(np.isfinite(v) and v > 0 for v in values):
            raise InputError(f"--step {' '.join(f'{v:g}' for v in values)}: give the step size in micrometres as "
                             "one positive number (a square grid) or two, DX DY")
        dx, dy = values[0], values[-1]
        if setup is not None and setup.step is not None and not np.allclose(setup.step, (dy, dx)):
            log.info("%s: step %g x %g um from --step, not the file's %g x %g um", name, dy, dx, *setup.step)
        return dy, dx
    if setup is None:
        return 1.0, 1.0
    if setup.step is not None:
        return setup.step
    log.warning("%s %s: using 1 um (--step DX [DY] in micrometres to set it)", name, setup.missing["step"])
    return 1.0, 1.0


def _pc_text(pc) -> str:
    return "(" + ", ".join(f"{v:.4f}" for v in pc) + ")"


def _working_distance(signal) -> float | None:
    """The working distance (mm) kikuchipy read from the file, where it has one."""
    try:
        wd = float(signal.metadata.get_item("Acquisition_instrument.SEM.working_distance"))
    except (AttributeError, TypeError, ValueError):
        return None
    return wd if 0 < wd < 1000 else None


def _read_with_kikuchipy(path: Path):
    """(patterns, FileSetup, working distance in mm or None) of a pattern file kikuchipy reads."""
    import kikuchipy as kp

    from .file_setup import read_setup

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
    try:
        setup = read_setup(signal, path)
    except Exception as exc:  # a damaged header: say so rather than guess the geometry
        raise InputError(f"cannot read the acquisition settings in {path} ({type(exc).__name__}: {exc}); pass "
                         "--pc X Y Z and --tilt, or check the file was copied completely") from None
    return patterns, setup, _working_distance(signal)


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
    geometry = _geometry_from_detector(detector, tuple(patterns.shape[-2:]))
    source = array_source(patterns, geometry=geometry, phases=phases, step=step or (1.0, 1.0), name=name)
    return source, carried


def _geometry_from_detector(detector, pattern_shape) -> DetectorGeometry:
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

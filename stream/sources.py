"""Scan sources for the publisher: the simulated detector and replay of saved scans.

A source describes its scan (what goes into ``scan_start``) and hands out pages of
frames by index range, so a page lost with a worker can be rendered or read again.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .errors import InputError
from .geometry import DetectorGeometry
from .simulator import SimulatedScan

log = logging.getLogger(__name__)

PATTERN_DTYPES = ("uint8", "uint16", "float32")


class ScanSource:
    """What the publisher needs from any source."""

    nav_shape: tuple[int, ...]
    step: tuple[float, ...]
    geometry: DetectorGeometry
    phases: list[str]
    dtype: str
    truth: np.ndarray | None = None
    metadata: dict

    @property
    def size(self) -> int:
        return int(np.prod(self.nav_shape))

    def read(self, first: int, count: int) -> np.ndarray:
        raise NotImplementedError

    def scan_start_fields(self) -> dict:
        return {
            "nav_shape": list(self.nav_shape),
            "step": list(self.step),
            "pattern_shape": list(self.geometry.pattern_shape),
            "dtype": self.dtype,
            "detector": self.geometry.to_wire(),
            "phases": list(self.phases),
            "metadata": dict(self.metadata),
        }


class SimulatedSource(ScanSource):
    def __init__(self, scan: SimulatedScan):
        self.scan = scan
        self.nav_shape = scan.nav_shape
        self.step = (1.0, 1.0)
        self.geometry = scan.geometry
        self.phases = [scan.phase]
        self.dtype = "uint8"
        self.truth = scan.truth
        self.metadata = {"source": "simulated", "noise": scan.noise, "seed": scan.seed,
                         "grains": int(len(scan.grain_rotations))}

    def read(self, first: int, count: int) -> np.ndarray:
        return self.scan.render(first, count)


class ArraySource(ScanSource):
    """Patterns already in an array (or a memory map): (N, H, W) or (ny, nx, H, W)."""

    def __init__(self, patterns, *, geometry: DetectorGeometry, phases=("ni",), step=(1.0, 1.0), name: str = "array",
                 metadata: dict | None = None):
        check_pattern_array(patterns, name)
        self.patterns = patterns.reshape(-1, *patterns.shape[-2:])
        self.nav_shape = tuple(patterns.shape[:-2]) if patterns.ndim == 4 else (1, patterns.shape[0])
        self.step = tuple(step)
        self.geometry = geometry.with_shape(patterns.shape[-2:])
        self.phases = list(phases)
        self.dtype = patterns.dtype.name
        self.metadata = {"source": name, **(metadata or {})}

    def read(self, first: int, count: int) -> np.ndarray:
        return np.ascontiguousarray(self.patterns[first:first + count])


def check_pattern_array(patterns, name: str) -> None:
    """Refuse arrays that cannot be patterns, with the fix in the message."""
    if patterns.ndim not in (3, 4):
        raise InputError(
            f"{name} holds an array of shape {patterns.shape} (rank {patterns.ndim}); liveindex needs patterns as "
            "(N, H, W) or (ny, nx, H, W): reshape it, e.g. np.save(path, a.reshape(-1, H, W))"
        )
    if patterns.dtype.name not in PATTERN_DTYPES:
        raise InputError(
            f"{name} has dtype {patterns.dtype}; patterns must be {', '.join(PATTERN_DTYPES)}: convert it, "
            "e.g. a.astype(np.float32)"
        )
    if min(patterns.shape[-2:]) < 2:
        raise InputError(f"{name} patterns are {patterns.shape[-2:]} pixels; a pattern needs at least 2x2")
    if patterns.dtype.kind == "f":
        bad = _count_nonfinite(patterns)
        if bad:
            raise InputError(
                f"{name} contains {bad} NaN or infinite pixel values; replace them before indexing, "
                "e.g. np.nan_to_num(a, nan=0.0), or mask the bad frames"
            )


def _count_nonfinite(patterns, chunk: int = 4096) -> int:
    flat = patterns.reshape(-1, *patterns.shape[-2:])
    return int(sum(np.count_nonzero(~np.isfinite(flat[i:i + chunk])) for i in range(0, len(flat), chunk)))


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
        return ArraySource(patterns, geometry=geometry or DetectorGeometry(), phases=phases, name=str(path))
    return _load_with_kikuchipy(path, geometry=geometry, phases=phases)


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
    if patterns.dtype.name not in PATTERN_DTYPES:
        patterns = patterns.astype(np.float32)
    if geometry is None:
        det = signal.detector
        geometry = DetectorGeometry(pattern_shape=patterns.shape[-2:], pc=tuple(det.pc_average),
                                    sample_tilt=float(det.sample_tilt), tilt=float(det.tilt),
                                    binning=int(det.binning), px_size=float(det.px_size))
        log.info("using the detector geometry stored in %s: PC %s (Bruker), sample tilt %.1f deg",
                 path, tuple(round(v, 4) for v in geometry.pc), geometry.sample_tilt)
    steps = [abs(a.scale) for a in signal.axes_manager.navigation_axes][::-1] or [1.0]
    step = tuple(steps) if len(steps) == 2 else (1.0, steps[0])
    return ArraySource(patterns, geometry=geometry, phases=phases, step=step, name=str(path),
                       metadata={"format": type(signal).__name__})

"""What a saved scan's file says about its acquisition: projection centre, tilts, step and
static background, each judged stored and real, a placeholder, or not stored at all.

kikuchipy reads every vendor format into one EBSD signal, but a reader fills what its format
lacks with defaults: PC (0.5, 0.5, 0.5), sample tilt 70 deg (0 deg for Bruker files, whose
``SampleTilt`` it looks for as ``Sample Tilt``), detector tilt 0, step 1. Taken at face value
those index a scan about 50 deg wrong while the log says the geometry came from the file. So
each format's table below says what it stores (from the formats as kikuchipy 0.13 reads
them), and stored values are checked for the placeholders vendors write (zeros, ones).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# format -> what its files store, of: pc, sample_tilt, tilt (detector), step, background
STORES = {
    "kikuchipy h5ebsd": {"pc", "sample_tilt", "tilt", "step", "background"},
    "Bruker h5ebsd": {"pc", "sample_tilt", "tilt", "step", "background"},
    "EDAX h5ebsd": {"pc", "sample_tilt", "tilt", "step"},
    "Oxford h5oina": {"pc", "sample_tilt", "tilt", "step", "background"},
    "EDAX .up1/.up2": {"step"},  # version 3 and later; version 1 files store only the patterns
    "Oxford .ebsp": {"step"},  # from the beam positions, where the file has them
    "NORDIF .dat": {"sample_tilt", "tilt", "step", "background"},  # Setting.txt and its background .bmp
    "EMsoft EBSD": {"pc", "tilt"},
}
PLACEHOLDER_PC = (0.5, 0.5, 0.5)  # kikuchipy's EBSDDetector default: what readers give for "no PC"
DEFAULT_SAMPLE_TILT = 70.0
PC_SPREAD_NOTE = 0.01  # a per-point PC varying more than this across the scan is mentioned


@dataclass
class FileSetup:
    """The acquisition a file describes; None where it stores nothing usable, with why in ``missing``."""

    path: Path
    format: str
    pc: tuple[float, float, float] | None = None  # Bruker convention
    sample_tilt: float | None = None
    tilt: float | None = None
    binning: int = 1
    px_size: float = 70.0
    step: tuple[float, float] | None = None  # (dy, dx) micrometres
    static_background: np.ndarray | None = None
    pc_spread: float = 0.0
    missing: dict[str, str] = field(default_factory=dict)  # what -> why it is not used

    def found(self) -> str:
        """One line: what the file gave that liveindex uses."""
        parts = []
        if self.pc is not None:
            spread = (f"; the mean of the file's per-point PCs, which vary by up to {self.pc_spread:.3f}"
                      if self.pc_spread > PC_SPREAD_NOTE else "")
            parts.append(f"projection centre ({', '.join(f'{v:.4f}' for v in self.pc)}) (Bruker{spread})")
        if self.sample_tilt is not None:
            parts.append(f"sample tilt {self.sample_tilt:g} deg")
        if self.tilt is not None:
            parts.append(f"detector tilt {self.tilt:g} deg")
        if self.step is not None:
            parts.append(f"step {self.step[0]:g} x {self.step[1]:g} um")
        if self.static_background is not None:
            parts.append(f"static background ({self.static_background.shape[0]}x{self.static_background.shape[1]})")
        return ", ".join(parts)


def read_setup(signal, path) -> FileSetup:
    """The setup ``signal`` (a kikuchipy EBSD signal read from ``path``) carries, judged."""
    path = Path(path)
    detector = signal.detector
    header = _header(signal)
    fmt = file_format(path, header)
    stores = STORES.get(fmt, {"pc", "sample_tilt", "tilt", "step", "background"})
    setup = FileSetup(path, fmt, binning=int(detector.binning), px_size=float(detector.px_size))
    if fmt == "EDAX .up1/.up2" and _edax_binary_version(path) < 3:
        stores = set()
    if fmt == "Oxford .ebsp" and "beam_x" not in header:  # no beam positions: kikuchipy sets a step of 1
        stores = set()

    if "pc" in stores:
        pc = np.asarray(detector.pc, float).reshape(-1, 3)
        setup.pc_spread = float(np.ptp(pc, axis=0).max()) if len(pc) > 1 else 0.0
        problem = pc_problem(tuple(float(v) for v in pc.mean(axis=0)))
        if problem:
            setup.missing["pc"] = f"holds {problem}"
        else:
            setup.pc = tuple(float(v) for v in pc.mean(axis=0))
    else:
        setup.missing["pc"] = "stores no projection centre"

    if "sample_tilt" in stores:
        tilt = float(detector.sample_tilt)
        if fmt == "Bruker h5ebsd":  # kikuchipy looks for "Sample Tilt"; Esprit writes "SampleTilt"
            tilt = float(header.get("SampleTilt", header.get("Sample Tilt", np.nan)))
        if np.isfinite(tilt) and 0.0 < tilt <= 90.0:
            setup.sample_tilt = tilt
        else:
            setup.missing["sample_tilt"] = f"holds sample tilt {tilt:g} deg, no tilt of an EBSD sample"
    else:
        setup.missing["sample_tilt"] = "stores no sample tilt"

    if "tilt" in stores and np.isfinite(detector.tilt) and -90.0 <= float(detector.tilt) <= 90.0:
        setup.tilt = float(detector.tilt)
    else:
        setup.missing["tilt"] = "stores no detector tilt"

    step = _step(signal) if "step" in stores else None
    if step is None:
        setup.missing["step"] = "stores no step size"
    setup.step = step

    background = getattr(signal, "static_background", None)
    if "background" in stores and background is not None:
        background = np.asarray(background, np.float32)
        if background.shape == tuple(signal.axes_manager.signal_shape[::-1]) and np.ptp(background) > 0:
            setup.static_background = background
        else:
            setup.missing["background"] = f"holds a static background of shape {background.shape} without contrast " \
                                          "or of another size than its patterns"
    else:
        setup.missing["background"] = "stores no static background"
    return setup


def pc_problem(pc) -> str | None:
    """Why ``pc`` (Bruker) is a placeholder rather than a calibrated PC, or None."""
    text = f"({', '.join(f'{v:g}' for v in pc)})"
    if not all(np.isfinite(pc)):
        return f"the projection centre {text}, which is not a number"
    if np.allclose(pc, PLACEHOLDER_PC, atol=1e-6):
        return f"the projection centre {text}, kikuchipy's placeholder for a file without one"
    if not all(0.0 < v < 1.0 for v in pc):
        return (f"the projection centre {text} (Bruker convention), which lies outside the detector: "
                "an empty (zero) or placeholder field")
    return None


def file_format(path: Path, header: dict) -> str:
    """The vendor format of a file kikuchipy read, from its h5ebsd manufacturer or its suffix."""
    manufacturer = str(header.get("manufacturer", "")).lower()
    by_manufacturer = {"kikuchipy": "kikuchipy h5ebsd", "bruker nano": "Bruker h5ebsd", "edax": "EDAX h5ebsd",
                       "oxford instruments": "Oxford h5oina"}
    if manufacturer in by_manufacturer:
        return by_manufacturer[manufacturer]
    if "EMheader" in header:
        return "EMsoft EBSD"
    by_suffix = {".up1": "EDAX .up1/.up2", ".up2": "EDAX .up1/.up2", ".ebsp": "Oxford .ebsp", ".dat": "NORDIF .dat"}
    return by_suffix.get(path.suffix.lower(), f"{path.suffix or 'this'} file")


def _header(signal) -> dict:
    try:
        return signal.original_metadata.as_dictionary()
    except Exception:  # a reader that leaves no original metadata
        return {}


def _edax_binary_version(path: Path) -> int:
    with open(path, "rb") as f:
        return int(np.frombuffer(f.read(4), "<u4")[0])


def _step(signal) -> tuple[float, float] | None:
    """(dy, dx) in micrometres from the navigation axes, or None where they carry no length."""
    to_um = {"um": 1.0, "µm": 1.0, "μm": 1.0, "nm": 1e-3, "mm": 1e3}
    axes = signal.axes_manager.navigation_axes
    if not axes:
        return None
    steps = []
    for axis in axes[::-1]:  # hyperspy lists x first
        scale = to_um.get(str(axis.units).strip())
        if scale is None or not np.isfinite(axis.scale) or axis.scale == 0:
            return None
        steps.append(abs(float(axis.scale)) * scale)
    return (steps[0], steps[1]) if len(steps) == 2 else (steps[0], steps[0])

"""EBSD's vendor conventions at the edge, for the files the sink writes.

The projection centre lives in kikuchipy's default (Bruker) convention everywhere else
(geometry.py); here it is converted to the EDAX/TSL, Oxford and EMsoft conventions with the
formulas kikuchipy's ``EBSDDetector`` uses (checked against it in the tests), without
importing kikuchipy: this runs in the sink when it writes a finished scan.

- TSL (the .ang header's x-star, y-star, z-star): x* = PCx, y* = 1 - PCy,
  z* = PCz * rows / min(rows, columns);
- Oxford: x = PCx, y = (1 - PCy) / (columns / rows), z = PCz / (columns / rows);
- EMsoft (v5): xpc = (0.5 - PCx) * columns * binning, ypc = (0.5 - PCy) * rows * binning,
  L = PCz * rows * binning * pixel size (microns).
"""

from __future__ import annotations

import logging

import numpy as np

from liveindex.models.modality import ExportHeader

log = logging.getLogger(__name__)


def pc_in_convention(pc, pattern_shape, convention: str, *, binning: int = 1, px_size: float = 70.0) -> tuple:
    """A Bruker-convention PC (PCx, PCy, PCz) for a detector of ``pattern_shape`` (rows,
    columns) in another vendor's convention: "bruker", "tsl" (or "edax"), "oxford", "emsoft"."""
    pcx, pcy, pcz = (float(v) for v in pc)
    rows, cols = (int(n) for n in pattern_shape)
    aspect = cols / rows
    convention = convention.lower()
    if convention == "bruker":
        out = (pcx, pcy, pcz)
    elif convention in ("tsl", "edax"):
        out = (pcx, 1.0 - pcy, pcz / (min(rows, cols) / rows))
    elif convention == "oxford":
        out = (pcx, (1.0 - pcy) / aspect, pcz / aspect)
    elif convention == "emsoft":
        out = ((0.5 - pcx) * cols * binning, (0.5 - pcy) * rows * binning, pcz * rows * binning * px_size)
    else:
        raise ValueError(f"unknown PC convention {convention!r}")
    return tuple(float(v) for v in out)


def export_header(setup: dict, pattern_shape) -> ExportHeader:
    """What the .ang, .ctf and HDF5 writers need to know of an EBSD setup (the scan_start's
    detector geometry, opaque to the sink)."""
    from .geometry import DetectorGeometry

    geometry = DetectorGeometry.from_wire(setup).with_shape(pattern_shape)
    shape = geometry.pattern_shape
    pcs = {name: pc_in_convention(geometry.pc, shape, name, binning=geometry.binning, px_size=geometry.px_size)
           for name in ("bruker", "tsl", "oxford", "emsoft")}
    detector = {
        "pattern_shape": list(shape),
        "pc_bruker": list(pcs["bruker"]),
        "pc_tsl": list(pcs["tsl"]),
        "pc_oxford": list(pcs["oxford"]),
        "pc_emsoft": list(pcs["emsoft"]),
        "sample_tilt_deg": geometry.sample_tilt,
        "detector_tilt_deg": geometry.tilt,
        "binning": geometry.binning,
        "px_size_um": geometry.px_size,
        "energy_kv": geometry.energy_kv,
        "convention_note": "pc_bruker is kikuchipy's default convention; the orientations are in orix's "
                           "(kikuchipy's) convention, sample frame as EDAX TSL's",
    }
    wd = getattr(geometry, "working_distance_mm", None)
    if wd is not None:
        detector["working_distance_mm"] = wd
    return ExportHeader(pc_tsl=pcs["tsl"], working_distance_mm=wd, energy_kv=geometry.energy_kv,
                        sample_tilt_deg=geometry.sample_tilt, detector_tilt_deg=geometry.tilt, detector=detector,
                        files={"_detector.txt": kikuchipy_detector_text(geometry)})


def kikuchipy_detector_text(geometry) -> str:
    """The detector as kikuchipy's ``EBSDDetector.save`` writes it (PC in the Bruker
    convention), so that ``EBSDDetector.load(path)`` reads it back."""
    rows, cols = geometry.pattern_shape
    header = (f"EBSDDetector\n  shape: ({rows}, {cols})\n  px_size: {float(geometry.px_size)}\n"
              f"  binning: {float(geometry.binning)}\n  tilt: {float(geometry.tilt)} deg\n"
              f"  azimuthal: 0.0 deg\n  twist: 0.0 deg\n  sample_tilt: {float(geometry.sample_tilt)} deg\n"
              "  convention: bruker\n  navigation_shape: (1,)\n\nwritten by liveindex\n\nColumn names: PCx, PCy, PCz")
    lines = ["# " + line if line else "#" for line in header.split("\n")]
    return "\n".join(lines) + "\n" + " ".join(f"{v:.7f}" for v in np.asarray(geometry.pc, float)) + "\n"

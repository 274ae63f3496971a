"""Detector geometry: projection centre, tilts, pattern shape, beam energy.

The projection centre (PC) is kept in kikuchipy's default (Bruker) convention; other
conventions are converted at the edge by kikuchipy's EBSDDetector.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace

import numpy as np

from liveindex.models.errors import GeometryError

PC_CONVENTIONS = ("bruker", "tsl", "edax", "oxford", "emsoft")

# The geometry of kikuchipy's shipped Ni scan (60x60 patterns, 8x8 binning); the
# simulated detector uses it and the dictionary for it is built once and cached.
DEFAULT_PC = (0.425, 0.213, 0.501)
DEFAULT_PATTERN_SHAPE = (60, 60)


@dataclass(frozen=True)
class DetectorGeometry:
    pattern_shape: tuple[int, int] = DEFAULT_PATTERN_SHAPE
    pc: tuple[float, float, float] = DEFAULT_PC
    sample_tilt: float = 70.0
    tilt: float = 0.0
    binning: int = 1
    px_size: float = 70.0
    energy_kv: float = 20.0
    working_distance_mm: float | None = None  # where the file says (the .ang and .ctf headers); simulation unaffected

    def __post_init__(self):
        object.__setattr__(self, "pattern_shape", tuple(int(n) for n in self.pattern_shape))
        object.__setattr__(self, "pc", tuple(float(v) for v in self.pc))
        validate_pc(self.pc)
        if not 0.0 <= self.sample_tilt <= 90.0:
            raise GeometryError(f"sample tilt {self.sample_tilt} deg is outside [0, 90]; EBSD uses about 70 (--tilt 70)")
        if not -90.0 <= self.tilt <= 90.0:
            raise GeometryError(f"detector tilt {self.tilt} deg is outside [-90, 90]")
        if len(self.pattern_shape) != 2 or min(self.pattern_shape) < 2:
            raise GeometryError(f"pattern shape {self.pattern_shape} must be two sizes of at least 2 pixels")
        wd = self.working_distance_mm
        if wd is not None and (isinstance(wd, bool) or not isinstance(wd, (int, float)) or not 0 < wd < 1000):
            raise GeometryError(f"working distance {wd!r} mm must be a number in (0, 1000)")

    @classmethod
    def from_convention(cls, pc, convention: str = "bruker", **kwargs) -> "DetectorGeometry":
        """Build a geometry from a PC given in another vendor's convention."""
        convention = convention.lower()
        if convention not in PC_CONVENTIONS:
            raise GeometryError(f"unknown PC convention {convention!r}; use one of {PC_CONVENTIONS}")
        if convention != "bruker":
            from kikuchipy.detectors import EBSDDetector

            shape = kwargs.get("pattern_shape", DEFAULT_PATTERN_SHAPE)
            detector = EBSDDetector(shape=shape, pc=pc, convention=convention, px_size=kwargs.get("px_size", 70.0),
                                    binning=kwargs.get("binning", 1))
            pc = tuple(np.asarray(detector.pc_average, dtype=float))
        return cls(pc=pc, **kwargs)

    def to_wire(self) -> dict:
        d = asdict(self)
        d["pattern_shape"] = list(self.pattern_shape)
        d["pc"] = list(self.pc)
        d["convention"] = "bruker"
        return d

    @classmethod
    def from_wire(cls, d: dict) -> "DetectorGeometry":
        known = {k: d[k] for k in ("pattern_shape", "pc", "sample_tilt", "tilt", "binning", "px_size", "energy_kv",
                                   "working_distance_mm") if k in d}
        try:
            return cls(**known)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, GeometryError):
                raise
            raise GeometryError(f"detector geometry {d} is malformed: {exc}") from None

    def with_shape(self, shape) -> "DetectorGeometry":
        return replace(self, pattern_shape=tuple(shape))

    def pc_in(self, convention: str) -> tuple[float, ...]:
        """The PC in another vendor's convention (kikuchipy's converters): TSL/EDAX and Oxford
        as fractions, EMsoft as (xpc, ypc) in unbinned detector pixels and L in micrometres
        for this geometry's pixel size and binning."""
        convention = convention.lower()
        if convention not in PC_CONVENTIONS:
            raise GeometryError(f"unknown PC convention {convention!r}; use one of {PC_CONVENTIONS}")
        detector = self.kikuchipy_detector()
        convert = {"bruker": detector.pc_bruker, "tsl": detector.pc_tsl, "edax": detector.pc_tsl,
                   "oxford": detector.pc_oxford, "emsoft": detector.pc_emsoft}[convention]
        return tuple(float(v) for v in np.asarray(convert()).reshape(-1, 3).mean(axis=0))

    def kikuchipy_detector(self):
        from kikuchipy.detectors import EBSDDetector

        return EBSDDetector(
            shape=self.pattern_shape,
            pc=self.pc,
            sample_tilt=self.sample_tilt,
            tilt=self.tilt,
            binning=self.binning,
            px_size=self.px_size,
        )

    def cache_key(self) -> str:
        """A short hash of everything that changes simulated patterns (PC to 1e-4)."""
        key = {
            "shape": list(self.pattern_shape),
            "pc": [round(v, 4) for v in self.pc],
            "sample_tilt": round(self.sample_tilt, 3),
            "tilt": round(self.tilt, 3),
            "energy_kv": round(self.energy_kv, 2),
        }
        return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def validate_pc(pc) -> None:
    if len(pc) != 3 or not all(np.isfinite(pc)):
        raise GeometryError(f"projection centre {pc} must be three finite numbers (PCx PCy PCz)")
    if not all(0.0 < v < 1.0 for v in pc):
        raise GeometryError(
            f"projection centre {tuple(pc)} lies outside (0, 1): liveindex expects the Bruker convention "
            "(fractions of the detector width/height); convert pixel values by dividing by the detector "
            "size, or name the convention with --pc-convention tsl|oxford|emsoft"
        )

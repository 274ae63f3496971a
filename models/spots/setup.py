"""The spot modality's setup: what ``scan_start`` says about the microscope, validated.

``kv`` beam energy; ``calibration`` reciprocal-space pixel size in 1/angstrom per pixel;
``precession`` angle in degrees (0: none); ``center`` the direct beam (x, y) in pixels, or
None to find it in each frame; ``ellipticity`` (ratio, angle in degrees) of the projector's
elliptical distortion, (1, 0) for none; ``scan_rotation`` in degrees: the scan's x axis
as seen in the diffraction image, from the image's x axis towards its y axis (orientations are
turned by it into the scan's frame, diffraction.scan_frame). Every key has a default but the
calibration, which a scan must give.
"""

from __future__ import annotations

import math

from liveindex.models.errors import InputError

DEFAULTS = {"kv": 200.0, "precession": 0.0, "center": None, "ellipticity": [1.0, 0.0], "scan_rotation": 0.0}
KEYS = ("kv", "calibration", *DEFAULTS)


def _number(setup, key, low, high, unit, hint):
    value = setup.get(key, DEFAULTS.get(key))
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
            or not low <= value <= high:
        raise InputError(f"spot setup {key} = {value!r} must be a number in {low}..{high} {unit}; {hint}")
    return float(value)


def check_setup(setup, pattern_shape) -> dict:
    """The setup normalised (floats, defaults filled); InputError names the first problem."""
    if not isinstance(setup, dict):
        raise InputError("the spot setup must be a map with kv, calibration, precession, center")
    unknown = sorted(set(setup) - set(KEYS))
    if unknown:
        raise InputError(f"spot setup has unknown keys {unknown}; it takes {', '.join(KEYS)}")
    h, w = (int(n) for n in pattern_shape)
    if min(h, w) < 16:
        raise InputError(f"spot patterns of {h}x{w} pixels are too small; give at least 16x16")
    if "calibration" not in setup:
        raise InputError("spot setup needs the calibration (--calibration, 1/angstrom per pixel, e.g. 0.02)")
    out = {
        "kv": _number(setup, "kv", 10.0, 1000.0, "kV", "give the beam energy with --kv (e.g. 200)"),
        "calibration": _number(setup, "calibration", 1e-4, 0.5, "1/angstrom per pixel",
                               "give --calibration in 1/angstrom per pixel (e.g. 0.02 for 128 px to 1.3/A)"),
        "precession": _number(setup, "precession", 0.0, 5.0, "degrees", "give --precession in degrees (0: none)"),
        "scan_rotation": _number(setup, "scan_rotation", -360.0, 360.0, "degrees", "give --scan-rotation in degrees"),
    }
    center = setup.get("center")
    if center is not None:
        if not (isinstance(center, (list, tuple)) and len(center) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in center)):
            raise InputError(f"spot setup center {center!r} must be two numbers X Y (pixels), or left out to find "
                             "the direct beam in each frame")
        if not (0 <= center[0] < w and 0 <= center[1] < h):
            raise InputError(f"spot setup center {list(center)} lies outside the {w}x{h} pattern; give --center X Y "
                             "inside it (pixels), or leave it out to find the direct beam")
        center = [float(center[0]), float(center[1])]
    out["center"] = center
    ellipticity = setup.get("ellipticity", DEFAULTS["ellipticity"])
    if not (isinstance(ellipticity, (list, tuple)) and len(ellipticity) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in ellipticity)
            and 0.8 <= ellipticity[0] <= 1.25):
        raise InputError(f"spot setup ellipticity {ellipticity!r} must be (ratio 0.8..1.25, angle in degrees); "
                         "(1, 0) for none")
    out["ellipticity"] = [float(ellipticity[0]), float(ellipticity[1])]
    return out


def describe(setup: dict) -> list[tuple[str, str]]:
    center = setup.get("center")
    return [("beam energy", f"{setup.get('kv')} kV"), ("calibration", f"{setup.get('calibration')} 1/Å per pixel"),
            ("precession", f"{setup.get('precession')}°"),
            ("beam centre", "found per frame" if center is None else f"{center[0]:.1f}, {center[1]:.1f} px"),
            ("ellipticity", f"{setup.get('ellipticity')}"), ("scan rotation", f"{setup.get('scan_rotation')}°")]

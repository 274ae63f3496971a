"""Finished-scan outputs: orix HDF5, EDAX .ang, and PNG maps (IPF-Z, confidence, phase).

Maps are flat arrays plus the in-data mask, as orix's CrystalMap keeps them, so the
files load straight into orix, kikuchipy and MTEX.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
from pathlib import Path

import numpy as np

from .errors import LiveIndexError
from .protocol import METHOD_RGB, METHODS

log = logging.getLogger(__name__)

PHASE_COLOURS = np.array([[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189]], np.uint8)


# Viridis through five stops (the live page's CONFIDENCE_STOPS): a sure map is yellow, doubt
# blue to purple.
CONFIDENCE_STOPS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], float)


def confidence_rgb(levels: np.ndarray) -> np.ndarray:
    """(N,) uint8 confidence levels (0..255) -> (N, 3) uint8 colours."""
    x = np.linspace(0, 255, len(CONFIDENCE_STOPS))
    return np.stack([np.interp(levels, x, CONFIDENCE_STOPS[:, c]) for c in range(3)], axis=1).round().astype(np.uint8)


def crystal_map(*, phase_id, quaternion, confidence, method, nav_shape, step, phases):
    from orix.crystal_map import CrystalMap, PhaseList
    from orix.quaternion import Rotation

    from liveindex.models.phases import orix_phase

    ny, nx = nav_shape
    dy, dx = (step if len(step) == 2 else (1.0, step[0]))
    yy, xx = np.mgrid[0:ny, 0:nx]
    phase_list = PhaseList([orix_phase(name) for name in phases], ids=list(range(len(phases))))
    return CrystalMap(
        rotations=Rotation(quaternion.astype(np.float64)),
        phase_id=phase_id.astype(np.int32),
        x=(xx.ravel() * dx).astype(np.float64),
        y=(yy.ravel() * dy).astype(np.float64),
        phase_list=phase_list,
        prop={"confidence": confidence.astype(np.float64), "method": method.astype(np.int32)},
        scan_unit="um",
    )


# orix compiles numba kernels on first use; two threads compiling at once (the sink's loop
# writing outputs, the live page colouring points) crashed the process once in a 1000x1000
# benchmark run (malloc: invalid size). The sink warms these up at start, and this lock
# keeps orix work (colouring, Euler angles, writing the outputs) to one thread at a time.
ORIX_LOCK = threading.RLock()


def ipf_colours(quaternion, phase_id, phases) -> np.ndarray:
    """(N, 3) uint8 IPF-Z colours from orix's TSL key; not-indexed points black."""
    with ORIX_LOCK:
        return _ipf_colours(quaternion, phase_id, phases)


def _ipf_colours(quaternion, phase_id, phases) -> np.ndarray:
    from orix.plot import IPFColorKeyTSL
    from orix.quaternion import Orientation
    from orix.vector import Vector3d

    from liveindex.models.phases import point_group

    rgb = np.zeros((len(quaternion), 3), np.uint8)
    for pid, name in enumerate(phases):
        sel = phase_id == pid
        if sel.any():
            key = IPFColorKeyTSL(point_group(name).laue, direction=Vector3d.zvector())
            rgb[sel] = (key.orientation2color(Orientation(quaternion[sel], point_group(name))) * 255).astype(np.uint8)
    return rgb


def map_images(state_arrays: dict, nav_shape, phases) -> dict[str, np.ndarray]:
    """RGB images (ny, nx, 3) of every live map."""
    ny, nx = nav_shape
    phase_id = state_arrays["phase_id"]
    indexed = phase_id >= 0
    conf = (np.clip(state_arrays["confidence"], 0, 1) * 255).astype(np.uint8)
    phase_rgb = np.zeros((len(phase_id), 3), np.uint8)
    phase_rgb[indexed] = PHASE_COLOURS[phase_id[indexed] % len(PHASE_COLOURS)]
    method_rgb = np.zeros((len(phase_id), 3), np.uint8)
    method_rgb[:] = np.array(METHOD_RGB, np.uint8)[np.minimum(state_arrays["method"], len(METHOD_RGB) - 1)]
    return {
        "ipf": ipf_colours(state_arrays["quaternion"], phase_id, phases).reshape(ny, nx, 3),
        "confidence": confidence_rgb(conf).reshape(ny, nx, 3),
        "phase": phase_rgb.reshape(ny, nx, 3),
        "method": method_rgb.reshape(ny, nx, 3),
    }


def png_bytes(rgb: np.ndarray, min_width: int = 400) -> bytes:
    from PIL import Image

    scale = max(1, min_width // max(rgb.shape[1], 1))
    image = Image.fromarray(rgb)
    if scale > 1:
        image = image.resize((rgb.shape[1] * scale, rgb.shape[0] * scale), Image.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_outputs(out_dir, name: str, *, arrays: dict, nav_shape, step, phases, summary: dict) -> list[Path]:
    """Write <name>.h5, <name>.ang, <name>_<map>.png and <name>.json; returns the paths.

    Each file is written under a temporary name and renamed, so a full disk leaves no
    half-written file behind that looks complete; the error says which file and why.
    """
    with ORIX_LOCK:
        return _write_outputs(out_dir, name, arrays=arrays, nav_shape=nav_shape, step=step, phases=phases,
                              summary=summary)


def _write_outputs(out_dir, name: str, *, arrays: dict, nav_shape, step, phases, summary: dict) -> list[Path]:
    from orix import io as orix_io

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    xmap = crystal_map(nav_shape=nav_shape, step=step, phases=phases, **arrays)
    written = []

    def _atomic(path: Path, write) -> None:
        tmp = path.with_name(f".{path.name}.partial{path.suffix}")
        try:
            write(tmp)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise LiveIndexError(f"cannot write {path}: {exc.strerror or exc}; free space or choose --out elsewhere") from None
        written.append(path)

    _atomic(out / f"{name}.h5", lambda p: orix_io.save(p, xmap, overwrite=True))
    _atomic(out / f"{name}.ang", lambda p: orix_io.save(p, xmap, overwrite=True, confidence_index_prop="confidence"))
    for map_name, rgb in map_images(arrays, nav_shape, phases).items():
        _atomic(out / f"{name}_{map_name}.png", lambda p, rgb=rgb: p.write_bytes(png_bytes(rgb)))
    summary = {**summary, "files": [p.name for p in written] + [f"{name}.json"], "methods": list(METHODS)}
    _atomic(out / f"{name}.json", lambda p: p.write_text(json.dumps(summary, indent=1)))
    log.info("wrote %s", ", ".join(str(p) for p in written))
    return written

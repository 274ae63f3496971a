"""Orientation maps, for any modality whose fields include ``phase_id`` and ``quaternion``.

IPF-Z colours with orix's TSL key for each phase's Laue class, disorientation against
ground truth (each point with its own phase's symmetry), the kernel average misorientation
(KAM) map, and the orix ``CrystalMap`` the HDF5 file is written from. Phases are ``PhaseRecord``s from the scan_start:
nothing here loads a master pattern or knows a modality.
"""

from __future__ import annotations

import functools
import io
import threading

import numpy as np

from liveindex.models.crystal import (
    PhaseRecord,
    disorientation_by_phase,
    disorientation_degrees,
    laue_of,
    point_group_of,
    proper_operators,
)

PHASE_COLOURS = np.array([[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189]], np.uint8)
# Fields that make the orientation itself; every other scalar field goes to the CrystalMap's prop.
ORIENTATION = ("phase_id", "quaternion")

# orix compiles numba kernels on first use; two threads compiling at once (the sink's loop
# writing outputs, the live page colouring points) crashed the process once in a 1000x1000
# benchmark run (malloc: invalid size). The sink warms these up at start, and this lock
# keeps orix work (colouring, Euler angles, writing the outputs) to one thread at a time.
ORIX_LOCK = threading.RLock()


def warm_up() -> None:
    """Import orix and compile its kernels now, not on the sink's first result page."""
    identity = np.array([[1.0, 0, 0, 0]], np.float32)
    cubic = PhaseRecord("warm-up", 225, (3.6, 3.6, 3.6, 90, 90, 90))
    ipf_colours(identity, np.zeros(1, np.int16), [cubic])
    disorientation_by_phase(identity, identity, np.zeros(1, np.int16), [cubic])


def ipf_colours(quaternion: np.ndarray, phase_id: np.ndarray, phases) -> np.ndarray:
    """(N, 3) uint8 IPF-Z colours from orix's TSL key; not-indexed points black."""
    with ORIX_LOCK:
        from orix.quaternion import Orientation

        rgb = np.zeros((len(quaternion), 3), np.uint8)
        for pid, phase in enumerate(phases):
            sel = phase_id == pid
            if sel.any():
                symmetry = point_group_of(phase.space_group)
                colours = _ipf_key(phase.space_group).orientation2color(Orientation(quaternion[sel], symmetry))
                rgb[sel] = (np.nan_to_num(colours) * 255).astype(np.uint8)
        return rgb


@functools.lru_cache(maxsize=64)
def _ipf_key(space_group: int):
    from orix.plot import IPFColorKeyTSL
    from orix.vector import Vector3d

    return IPFColorKeyTSL(laue_of(space_group), direction=Vector3d.zvector())


def phase_rgb(phase_id: np.ndarray) -> np.ndarray:
    rgb = np.zeros((len(phase_id), 3), np.uint8)
    indexed = phase_id >= 0
    rgb[indexed] = PHASE_COLOURS[phase_id[indexed] % len(PHASE_COLOURS)]
    return rgb


def error_to_truth(quaternion: np.ndarray, phase_id: np.ndarray, truth: dict[str, np.ndarray], phases) -> np.ndarray:
    """(N,) degrees between each point's orientation and its truth, with its own phase's
    symmetry; NaN where not indexed, and where the truth names another phase."""
    error = disorientation_by_phase(quaternion, truth["quaternion"], phase_id, phases)
    if "phase_id" in truth:
        error[phase_id != truth["phase_id"]] = np.nan
    return error


KAM_MAX_DEG = 5.0  # neighbours further apart are across a boundary, left out (OIM's default)
KAM_CHUNK = 65536  # pairs a time: (chunk, 24 operators, 4) float64 is 50 MB for cubic phases


def kernel_average_misorientation(quaternion: np.ndarray, phase_id: np.ndarray, nav_shape, phases,
                                  max_deg: float = KAM_MAX_DEG) -> np.ndarray:
    """(N,) float32 KAM in degrees: each point's mean disorientation to its first nearest
    neighbours (left, right, up, down) that are indexed, of its phase, and within ``max_deg``
    (with the phase's own symmetry, as OIM's and MTEX's KAM); NaN where it has none (not
    indexed, or every neighbour across a boundary)."""
    ny, nx = nav_shape
    q = np.asarray(quaternion, np.float64).reshape(ny, nx, 4)
    pid = np.asarray(phase_id).reshape(ny, nx)
    total = np.zeros((ny, nx))
    count = np.zeros((ny, nx))
    for axis in (0, 1):  # each pair once: (y, y+1) and (x, x+1)
        a = (slice(0, ny - 1), slice(None)) if axis == 0 else (slice(None), slice(0, nx - 1))
        b = (slice(1, ny), slice(None)) if axis == 0 else (slice(None), slice(1, nx))
        same = (pid[a] >= 0) & (pid[a] == pid[b])
        angles = np.full(same.shape, np.nan)
        for p, phase in enumerate(phases):
            rows = np.flatnonzero((same & (pid[a] == p)).ravel())
            ops = proper_operators(phase.space_group)
            qa, qb = q[a].reshape(-1, 4), q[b].reshape(-1, 4)
            flat = angles.reshape(-1)
            for start in range(0, len(rows), KAM_CHUNK):
                chunk = rows[start:start + KAM_CHUNK]
                flat[chunk] = disorientation_degrees(qa[chunk], qb[chunk], ops)
        near = np.isfinite(angles) & (angles <= max_deg)
        value = np.where(near, angles, 0.0)
        for side in (a, b):
            total[side] += value
            count[side] += near
    with np.errstate(invalid="ignore"):
        kam = total / count
    kam[count == 0] = np.nan
    return kam.ravel().astype(np.float32)


def euler_degrees(quaternion: np.ndarray) -> list[float]:
    """Bunge Euler angles (degrees) of one orientation."""
    from orix.quaternion import Rotation

    with ORIX_LOCK:
        return [float(v) for v in Rotation(np.asarray(quaternion, float)).to_euler(degrees=True)[0]]


def crystal_map(maps: dict[str, np.ndarray], *, nav_shape, step, phases, prop_fields):
    """orix CrystalMap of the maps: rotations and phases, the scalar ``prop_fields`` as properties."""
    from orix.crystal_map import CrystalMap, PhaseList
    from orix.quaternion import Rotation

    ny, nx = nav_shape
    dy, dx = step
    yy, xx = np.mgrid[0:ny, 0:nx]
    phase_list = PhaseList([p.orix_phase() for p in phases], ids=list(range(len(phases))))
    prop = {}
    for name in prop_fields:
        values = maps[name]
        prop[name] = values.astype(np.int32 if values.dtype.kind in "iu" else np.float64)
    return CrystalMap(
        rotations=Rotation(maps["quaternion"].astype(np.float64)),
        phase_id=maps["phase_id"].astype(np.int32),
        x=(xx.ravel() * dx).astype(np.float64),
        y=(yy.ravel() * dy).astype(np.float64),
        phase_list=phase_list,
        prop=prop,
        scan_unit="um",
    )


@functools.lru_cache(maxsize=32)
def ipf_key_png(space_group: int) -> bytes:
    """orix's IPF-Z colour key for the space group's Laue class, as a small PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with ORIX_LOCK:
        fig = _ipf_key(space_group).plot(return_figure=True)
        fig.set_size_inches(2.0, 1.7)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight", transparent=True)
        plt.close(fig)
    return buffer.getvalue()

"""The orientation code book of the network: cells over the fundamental zone, their
neighbours, and one code (the network's own embedding of a simulated pattern) per cell and
band geometry. No torch here: a worker builds it when it loads a bundle.

The code book is a few tens of MB, too large to ship, but it is a pure function of the
bundle (its embedding) and the master patterns, so it is built on first use (about 30 s on
one core) and cached under liveindex's cache_dir(), keyed by the bundle's hash.

Cells: a cubochoric sampling of the m-3m fundamental zone. Neighbours: the 27 nearest cells
(the cell first) by the cubic-invariant tensor T (below), each stored in the symmetric
equivalent nearest the cell and with the same sign, so a weighted mean of neighbours never
averages across a symmetry boundary.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import numpy as np

from liveindex.models.crystal import disorientation_degrees, quaternion_multiply

log = logging.getLogger(__name__)

N_NEIGHBOURS = 27
# One code book per band geometry, rendered at the nominal geometry of the bundle's range.
# Ni's kinematical one serves kinematical fcc patterns (Ni3Al's): its correlation with them is
# 0.99, against 0.6 for the dynamical one.
CODEBOOK_SOURCES = (("ni", "dynamical"), ("fe", "kinematical"), ("ni", "kinematical"))
# Which band geometries (indices into CODEBOOK_SOURCES) a scan of each phase is read from
# when the worker knows the scan's phases. Ni's kinematical code book is for training's
# kinematical Ni patterns (so that "kinematical look" does not tell phases apart) and for
# Ni3Al, whose patterns are kinematical fcc ones; real Ni patterns look dynamical.
CODEBOOK_SERVES = {"ni": (0,), "fe": (1,), "ni3al": (2,)}
T_WEIGHTS = (1, 1, 1, 4, 4, 4, 4, 4, 4, 6, 6, 6, 12, 12, 12)  # multinomial counts: |T1 - T2| is Frobenius
FORMAT = 2  # 2: codes stored (G, D, K), templates at the working size


def cubic_operators() -> np.ndarray:
    """The 24 proper rotations of m-3m (orix's O) as (24, 4) quaternions."""
    from orix.quaternion import symmetry

    return symmetry.O.data.astype(np.float32)


quat_multiply = quaternion_multiply  # the one product (models/crystal.py), under the name training uses


def t_features(q: np.ndarray) -> np.ndarray:
    """(..., 4) quaternions -> (..., 15): T = sum over the rows r of the rotation matrix of r^(x)4,
    invariant under q -> s q for the 24 cubic rotations s, continuous in q."""
    w, x, y, z = np.moveaxis(np.asarray(q, np.float64), -1, 0)
    rows = np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ], -2)
    a, b, c = rows[..., 0], rows[..., 1], rows[..., 2]
    a2, b2, c2 = a * a, b * b, c * c
    mono = np.stack([a2 * a2, b2 * b2, c2 * c2, a2 * a * b, a2 * a * c, b2 * b * a, b2 * b * c, c2 * c * a,
                     c2 * c * b, a2 * b2, a2 * c2, b2 * c2, a2 * b * c, b2 * a * c, c2 * a * b], -1).sum(-2)
    return (mono * np.sqrt(T_WEIGHTS)).astype(np.float32)


def disorientation_deg(q: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Cubic (432) disorientation angle in degrees between (N, 4) arrays."""
    return disorientation_degrees(q, truth, cubic_operators())


def cells_and_neighbours(resolution: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cells (K, 4), neighbour indices (K, 27) and neighbours aligned to each cell (K, 27, 4)."""
    from orix.quaternion import symmetry
    from orix.sampling import get_sample_fundamental
    from scipy.spatial import cKDTree

    cells = get_sample_fundamental(resolution=resolution, point_group=symmetry.Oh,
                                   method="cubochoric").data.astype(np.float32)
    t = t_features(cells)
    _, neighbours = cKDTree(t).query(t, k=N_NEIGHBOURS)
    neighbours = neighbours.astype(np.int64)
    ops = cubic_operators()
    aligned = np.empty((len(cells), N_NEIGHBOURS, 4), np.float32)
    for start in range(0, len(cells), 4096):
        nb = cells[neighbours[start:start + 4096]]  # (k, n, 4)
        eq = quat_multiply(ops[None, None], nb[:, :, None, :])  # (k, n, 24, 4)
        dots = (eq * cells[start:start + 4096, None, None, :]).sum(-1)
        best = np.abs(dots).argmax(-1)
        pick = np.take_along_axis(eq, best[..., None, None], 2)[:, :, 0]
        aligned[start:start + 4096] = pick * np.sign(np.take_along_axis(dots, best[..., None], 2))
    return cells, neighbours, aligned


def nominal_templates(cells: np.ndarray, geometry) -> np.ndarray:
    """(G, K, P) preprocessed templates of every code-book source for frames of ``geometry``,
    made as the scan's template dictionary is (working size, supersampled)."""
    import dask

    from .dictionary import simulate_templates, working_geometry

    working, supersample = working_geometry(geometry)
    with dask.config.set(scheduler="synchronous"):  # one core
        return np.stack([simulate_templates(name, working, cells, kind=kind, supersample=supersample)
                         for name, kind in CODEBOOK_SOURCES])


def code_matrix(embedded: np.ndarray) -> np.ndarray:
    """(K, D) embedded templates -> (D, K) unit columns: the graph scores a batch with one MatMul."""
    return np.ascontiguousarray(normalise_rows(embedded).T)


def normalise_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-8)).astype(np.float32)


def cache_path(bundle_folder: Path, resolution: float) -> Path:
    from .dictionary import cache_dir

    # The codes are the bundle's embedding of templates: nothing else of the bundle matters.
    h = hashlib.sha1((bundle_folder / "embedding.npy").read_bytes())
    h.update(repr(CODEBOOK_SOURCES).encode())
    digest = h.hexdigest()[:12]
    return cache_dir() / "network_codebooks" / f"{digest}-r{resolution:g}-v{FORMAT}.npz"


def load_or_build(bundle_folder: Path, resolution: float, geometry, embed) -> dict:
    """The code book for a bundle: from the cache, or built now with ``embed`` ((N, P) -> (N, D))."""
    path = cache_path(bundle_folder, resolution)
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    t0 = time.perf_counter()
    log.info("building the network's orientation code book (%g deg cells; one-off, cached in %s)", resolution, path)
    cells, neighbours, aligned = cells_and_neighbours(resolution)
    templates = nominal_templates(cells, geometry)
    codes = np.stack([code_matrix(embed(t)) for t in templates])
    book = {"codes": codes, "neighbours": neighbours, "aligned": aligned, "cells": cells}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + f".tmp{os.getpid()}.npz")
    np.savez(tmp, **book)
    os.replace(tmp, path)
    log.info("code book: %d cells x %d band geometries in %.0f s", len(cells), len(codes), time.perf_counter() - t0)
    return book

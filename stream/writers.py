"""Finished-scan outputs: every declared field, whatever the modality.

Where the fields include ``phase_id`` and ``quaternion`` (stream/orientation_map.py):

- ``<name>.h5``: orix HDF5 (rotations, phases with their structures, every other scalar
  field and the KAM map as the CrystalMap's properties), the scan's outcome in the root
  attributes and the modality's detector description in the ``detector`` group;
- ``<name>.ang`` (EDAX/TSL OIM) and ``<name>.ctf`` (Oxford AZtec), stream/vendor_files.py;
- ``<name>_kam.png``: kernel average misorientation.

Always:

- ``<name>_maps.npz``: every field as a flat array (vector fields too: an embedding), and
  ``kam`` where there are orientations;
- where the maps carry them (a modality with an ``embedding`` field, stream/latent_map.py):
  ``cluster``, ``boundary`` and ``novelty`` as HDF5 properties and PNGs, and
  ``<name>_embedding.npy`` (N, D);
- PNG maps: IPF-Z and phase, confidence, method (the modality's colours), the pattern
  quality ``iq`` in grey, and each other scalar field stretched over its range;
- files the modality's ``export_header`` adds (EBSD: ``<name>_detector.txt``, kikuchipy's);
- ``<name>.json``: the scan's summary.

The vendor headers' setup values (EBSD: the PC in the TSL convention, working distance,
kV, tilts) come from the modality's ``export_header``, asked through the registry; a sink
that cannot load the modality writes the files without them and says so in its log.

Maps are flat arrays plus the in-data mask, as orix's CrystalMap keeps them, so the
files load straight into orix, kikuchipy and MTEX.
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import numpy as np

from liveindex.models.errors import LiveIndexError
from liveindex.models.modality import QUALITY_FIELD, ExportHeader

from .orientation_map import (
    KAM_MAX_DEG,
    ORIENTATION,
    ORIX_LOCK,
    crystal_map,
    ipf_colours,
    kernel_average_misorientation,
    phase_rgb,
)
from .protocol import ScanStart
from .vendor_files import write_ang, write_ctf

log = logging.getLogger(__name__)

# Viridis through five stops (the live page's CONFIDENCE_STOPS): a sure map is yellow, doubt
# blue to purple.
CONFIDENCE_STOPS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], float)


def confidence_rgb(levels: np.ndarray) -> np.ndarray:
    """(N,) uint8 levels (0..255) -> (N, 3) uint8 viridis colours."""
    x = np.linspace(0, 255, len(CONFIDENCE_STOPS))
    return np.stack([np.interp(levels, x, CONFIDENCE_STOPS[:, c]) for c in range(3)], axis=1).round().astype(np.uint8)


def scalar_levels(values: np.ndarray) -> np.ndarray:
    """(N,) numbers -> (N,) uint8 levels over their finite range."""
    values = values.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(len(values), np.uint8)
    lo, hi = values[finite].min(), values[finite].max()
    return (np.clip(np.nan_to_num((values - lo) / max(hi - lo, 1e-12)), 0, 1) * 255).astype(np.uint8)


def extra_scalar_fields(start: ScanStart) -> list[str]:
    """Scalar fields beyond the orientation, confidence and method ones."""
    return [f.name for f in start.fields
            if f.shape == () and f.name not in (*ORIENTATION, "confidence", "method")]


def grey_rgb(levels: np.ndarray) -> np.ndarray:
    """(N,) uint8 levels -> (N, 3) grey, as OIM and AZtec show image quality and band contrast."""
    return np.repeat(levels[:, None], 3, axis=1)


def map_images(maps: dict, start: ScanStart) -> dict[str, np.ndarray]:
    """RGB images (ny, nx, 3) of every map the fields allow (and of ``kam`` where ``maps``
    carries one: 0 to KAM_MAX_DEG degrees, not indexed black)."""
    ny, nx = start.nav_shape
    images = {}
    if start.has_orientations:
        images["ipf"] = ipf_colours(maps["quaternion"], maps["phase_id"], start.phases)
        images["phase"] = phase_rgb(maps["phase_id"])
    if "confidence" in maps:
        images["confidence"] = confidence_rgb((np.clip(np.nan_to_num(maps["confidence"]), 0, 1) * 255).astype(np.uint8))
    if "method" in maps:
        palette = np.array([m.rgb for m in start.methods], np.uint8)
        images["method"] = palette[np.minimum(maps["method"], len(palette) - 1)]
    for name in extra_scalar_fields(start):
        levels = scalar_levels(maps[name])
        images[name] = grey_rgb(levels) if name == QUALITY_FIELD else confidence_rgb(levels)
    if "cluster" in maps:  # the latent maps (stream/latent_map.py)
        from .latent_map import PALETTE

        c = np.asarray(maps["cluster"], np.int64)
        images["cluster"] = np.asarray(PALETTE, np.uint8)[np.where(c >= 0, 1 + c % 255, 0)]
    for name, top in (("boundary", 3.0), ("novelty", 1.0)):
        if name in maps:
            v = np.asarray(maps[name], np.float64)
            rgb = confidence_rgb((np.clip(np.nan_to_num(v / top), 0, 1) * 255).astype(np.uint8))
            rgb[~np.isfinite(v)] = 0
            images[name] = rgb
    if "kam" in maps:
        kam = np.asarray(maps["kam"], np.float64)
        rgb = confidence_rgb((np.clip(np.nan_to_num(kam / KAM_MAX_DEG), 0, 1) * 255).astype(np.uint8))
        rgb[~np.isfinite(kam)] = 0
        images["kam"] = rgb
    return {name: rgb.reshape(ny, nx, 3) for name, rgb in images.items()}


def png_bytes(rgb: np.ndarray, min_width: int = 400) -> bytes:
    from PIL import Image

    scale = max(1, min_width // max(rgb.shape[1], 1))
    image = Image.fromarray(rgb)
    if scale > 1:
        image = image.resize((rgb.shape[1] * scale, rgb.shape[0] * scale), Image.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_outputs(out_dir, name: str, *, maps: dict, start: ScanStart, summary: dict) -> list[Path]:
    """Write <name>.h5, <name>.ang, <name>.ctf (orientation fields), <name>_maps.npz,
    <name>_<map>.png, the modality's extra files and <name>.json; returns the paths.

    Each file is written under a temporary name and renamed, so a full disk leaves no
    half-written file behind that looks complete; the error says which file and why.
    """
    with ORIX_LOCK:
        return _write_outputs(out_dir, name, maps=maps, start=start, summary=summary)


def export_header(start: ScanStart) -> tuple[ExportHeader | None, str | None]:
    """The modality's ``export_header`` for the scan's setup, asked through the registry; None
    and the reason where this process cannot load the modality or the hook fails."""
    from liveindex.models import modality as modalities

    try:
        return modalities.load(start.modality).export_header(start.setup, start.pattern_shape), None
    except Exception as exc:  # an unknown modality, one not installed here, or a setup it refuses
        return None, f"{type(exc).__name__}: {exc}"


def _annotate(path: Path, summary: dict, header: ExportHeader | None) -> None:
    """The scan's outcome in the HDF5 file's root attributes (liveindex_status: complete,
    partial or failed; liveindex_reason; liveindex_missing), beside orix's own groups; the
    modality's detector description as the attributes of a ``detector`` group."""
    import h5py

    with h5py.File(path, "r+") as f:
        f.attrs["liveindex_status"] = str(summary.get("status", "complete"))
        f.attrs["liveindex_reason"] = str(summary.get("reason") or "")
        f.attrs["liveindex_missing"] = int(summary.get("missing", 0))
        f.attrs["liveindex_modality"] = str(summary.get("modality", ""))
        if header is not None and header.detector:
            group = f.require_group("detector")
            for key, value in header.detector.items():
                group.attrs[str(key)] = value if not isinstance(value, (list, tuple)) else np.asarray(value)


def _write_outputs(out_dir, name: str, *, maps: dict, start: ScanStart, summary: dict) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
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

    maps = dict(maps)
    header, why = export_header(start)
    if header is None:
        log.warning("scan %s: modality %r could not describe its setup here (%s); the .ang and .ctf headers are "
                    "written without the projection centre, working distance and tilts", name, start.modality, why)
    if start.has_orientations:
        from orix import io as orix_io

        maps["kam"] = kernel_average_misorientation(maps["quaternion"], maps["phase_id"], start.nav_shape,
                                                    start.phases)
        props = [f.name for f in start.fields if f.shape == () and f.name not in ORIENTATION] + ["kam"]
        props += [k for k in ("cluster", "boundary", "novelty") if k in maps]  # the latent maps
        xmap = crystal_map(maps, nav_shape=start.nav_shape, step=start.step, phases=start.phases, prop_fields=props)
        _atomic(out / f"{name}.h5", lambda p: (orix_io.save(p, xmap, overwrite=True),
                                                _annotate(p, {**summary, "modality": start.modality}, header)))
        _atomic(out / f"{name}.ang", lambda p: write_ang(p, maps, start, header, scan_id=name))
        _atomic(out / f"{name}.ctf", lambda p: write_ctf(p, maps, start, header, scan_id=name))
    for suffix, text in (header.files.items() if header is not None else ()):
        _atomic(out / f"{name}{suffix}", lambda p, text=text: p.write_text(text))

    def _npz(path: Path) -> None:
        with open(path, "wb") as f:
            np.savez(f, nav_shape=np.array(start.nav_shape), **maps)

    _atomic(out / f"{name}_maps.npz", _npz)
    if "embedding" in maps and np.ndim(maps["embedding"]) == 2 and np.isfinite(maps["embedding"]).any():
        # (N, D), as the latent maps used it; none where no point has one (--latent off)
        _atomic(out / f"{name}_embedding.npy", lambda p: np.save(p, np.asarray(maps["embedding"])))
    for map_name, rgb in map_images(maps, start).items():
        _atomic(out / f"{name}_{map_name}.png", lambda p, rgb=rgb: p.write_bytes(png_bytes(rgb)))
    summary = {**summary, "files": [p.name for p in written] + [f"{name}.json"], "modality": start.modality,
               "methods": [m.label for m in start.methods], "fields": [f.to_wire()[:3] for f in start.fields],
               "phases": [p.to_wire(payload=False) for p in start.phases],
               "export_header": header.summary() if header is not None else {"unavailable": why}}
    _atomic(out / f"{name}.json", lambda p: p.write_text(json.dumps(summary, indent=1)))
    log.info("wrote %s", ", ".join(str(p) for p in written))
    return written

"""An h5ebsd acquisition in a box: appends a scan's frames to an h5ebsd file at a set rate in
HDF5's SWMR mode, as an acquisition that lets readers follow it does. For testing
``liveindex publish --follow X.h5`` without a microscope:

    python -m liveindex.models.ebsd.h5ebsd_writer PATTERNS.npy FILE.h5 --rate 1000 [--layout kikuchipy|bruker|edax]

``PATTERNS.npy`` holds (ny, nx, H, W) uint8 frames. The header (scan size, pattern size, PC,
tilts, step) is written first, then the pattern dataset (chunked one frame a chunk, its first
axis unlimited) grows frame by frame: resize, write, flush. ``--stop-after N`` ends the
acquisition early; ``--no-swmr`` writes the same file without SWMR (a reader must refuse it
while it is open) and ``--hold S`` keeps the file open S seconds after the last frame.
``--start-delay S`` waits between the header and frame 0. Write times go to
``FILE.write_times.npy``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

PC = (0.425, 0.213, 0.501)  # Bruker convention, the simulated detector's


def _put(group, values: dict) -> None:
    """Header values as the vendors store them: one-element datasets (strings as bytes)."""
    for key, value in values.items():
        if isinstance(value, dict):
            _put(group.create_group(key), value)
        elif isinstance(value, str):
            group.create_dataset(key, data=np.array([value.encode()]))
        else:
            group.create_dataset(key, data=np.atleast_1d(np.asarray(value)))


def create(path, nav_shape, pattern_shape, *, layout: str = "kikuchipy", swmr: bool = True, step: float = 1.5,
           pc=PC, sample_tilt: float = 70.0):
    """Create the file with its header and an empty pattern dataset; returns (file, dataset),
    in SWMR mode where ``swmr``."""
    import h5py

    (ny, nx), (sy, sx) = nav_shape, pattern_shape
    f = h5py.File(path, "w", libver="latest")
    frames = dict(shape=(0, sy, sx), maxshape=(None, sy, sx), chunks=(1, sy, sx), dtype="uint8")
    if layout == "kikuchipy":
        _put(f, {"manufacturer": "kikuchipy", "version": "0.13.0"})
        scan = f.create_group("Scan 1")
        _put(scan.create_group("EBSD/Header"), {
            "n_rows": ny, "n_columns": nx, "pattern_height": sy, "pattern_width": sx, "step_y": step, "step_x": step,
            "pcx": pc[0], "pcy": pc[1], "pcz": pc[2], "sample_tilt": sample_tilt, "elevation_angle": 0.0,
            "azimuth_angle": 0.0, "twist_angle": 0.0, "binning": 1, "detector_pixel_size": 70.0,
            "static_background": -1})
        _put(scan.create_group("SEM/Header"), {"beam_energy": 20.0, "magnification": 200, "microscope": "h5ebsd_writer",
                                               "working_distance": 24.7})
        dataset = scan.create_dataset("EBSD/Data/patterns", **frames)
    elif layout == "bruker":
        _put(f, {"Manufacturer": "Bruker Nano", "Version": "Esprit 2.X"})
        scan = f.create_group("Scan 0")
        _put(scan.create_group("EBSD/Header"), {
            "NROWS": ny, "NCOLS": nx, "PatternHeight": sy, "PatternWidth": sx, "YSTEP": step, "XSTEP": step,
            "Grid Type": "isometric", "SampleTilt": sample_tilt, "CameraTilt": 0.0, "KV": 20.0,
            "DetectorFullHeightMicrons": 70.0 * sy, "UnClippedPatternHeight": sy})
        data = scan.create_group("EBSD/Data")
        for key, value in zip(("PCX", "PCY", "DD"), pc):  # Esprit stores the PC per point
            data.create_dataset(key, data=np.full(ny * nx, value, np.float32))
        dataset = data.create_dataset("RawPatterns", **frames)
    elif layout == "edax":
        star = (pc[0], 1.0 - pc[1], pc[2])  # EDAX/TSL x*, y*, z* (kikuchipy's EBSDDetector.pc_tsl)
        _put(f, {"Manufacturer": "EDAX", "Version": "OIM Analysis 8.6.0 x64 [09-01-2020]"})
        scan = f.create_group("Scan 1")
        _put(scan.create_group("EBSD/Header"), {
            "nRows": ny, "nColumns": nx, "Pattern Height": sy, "Pattern Width": sx, "Step Y": step, "Step X": step,
            "Grid Type": "SqrGrid", "Sample Tilt": sample_tilt, "Camera Elevation Angle": 0.0,
            "Pattern Center Calibration": {"x-star": float(star[0]), "y-star": float(star[1]),
                                           "z-star": float(star[2])}})
        dataset = scan.create_dataset("EBSD/Data/Pattern", **frames)
    else:
        raise ValueError(f"layout {layout!r}: use kikuchipy, bruker or edax")
    if swmr:
        f.swmr_mode = True  # every object exists now: SWMR allows no new ones, only appends
    f.flush()
    return f, dataset


def acquire(file, dataset, patterns: np.ndarray, *, rate: float, stop_after: int | None = None) -> np.ndarray:
    """Append ``patterns`` (N, H, W) on a clock of ``rate`` frames/s (late frames at once, in
    one append); returns each frame's write time (wall clock, after its flush)."""
    frames = np.ascontiguousarray(patterns.reshape(-1, *patterns.shape[-2:]), np.uint8)
    n = len(frames) if stop_after is None else min(stop_after, len(frames))
    times = np.full(n, np.nan)
    t0, written = time.perf_counter(), 0
    while written < n:
        due = min(n, int((time.perf_counter() - t0) * rate) + 1)
        dataset.resize(due, axis=0)
        dataset[written:due] = frames[written:due]
        file.flush()  # raw data first, then the extent: a reader never sees a frame not written
        times[written:due] = time.time()
        written = due
        wait = t0 + written / rate - time.perf_counter()
        if wait > 0 and written < n:
            time.sleep(wait)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("patterns", help="(ny, nx, H, W) uint8 .npy")
    parser.add_argument("file")
    parser.add_argument("--layout", default="kikuchipy", choices=["kikuchipy", "bruker", "edax"])
    parser.add_argument("--rate", type=float, default=1000.0, help="frames/s (default 1000)")
    parser.add_argument("--stop-after", type=int, help="stop after this many frames (an acquisition cut short)")
    parser.add_argument("--start-delay", type=float, default=0.0, help="seconds between the header and frame 0")
    parser.add_argument("--no-swmr", action="store_true", help="write without SWMR (readers must refuse the file)")
    parser.add_argument("--hold", type=float, default=0.0, help="seconds to keep the file open after the last frame")
    args = parser.parse_args(argv)
    patterns = np.load(args.patterns)
    if patterns.ndim != 4 or patterns.dtype != np.uint8:
        parser.error(f"{args.patterns} holds {patterns.dtype}{patterns.shape}; give (ny, nx, H, W) uint8 frames")
    file, dataset = create(args.file, patterns.shape[:2], patterns.shape[2:], layout=args.layout,
                           swmr=not args.no_swmr)
    try:
        time.sleep(args.start_delay)
        times = acquire(file, dataset, patterns, rate=args.rate, stop_after=args.stop_after)
        time.sleep(args.hold)
    finally:
        file.close()
    np.save(Path(str(args.file) + ".write_times.npy"), times)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A NORDIF acquisition in a box: writes a scan's ``Pattern.dat`` frame by frame at a set rate,
as NORDIF does during acquisition, with its ``Setting.txt`` beside it. For testing
``liveindex publish --follow`` without a microscope:

    python -m liveindex.models.ebsd.nordif_writer PATTERNS.npy FOLDER --rate 1000

``PATTERNS.npy`` holds (ny, nx, H, W) uint8 frames. ``--torn`` writes every tenth frame in
two halves 20 ms apart (a reader must wait for the second half; the frames after it are
then written late, at once, to keep the rate); ``--stop-after N``
ends the acquisition early (the follower must end the scan partial). The file's write times
go to ``FOLDER/write_times.npy`` (wall clock, one per frame) for latency measurements.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# Setting.txt as NORDIF 3.1 writes it (the blocks and lines kikuchipy's reader looks for);
# {ny}x{nx} samples, {sx}x{sy} px patterns, step {step} um, sample tilt 70 deg, no elevation.
SETTINGS = """[NORDIF]\t\t
Software version\t3.1.2\t
\t\t
[Microscope]\t\t
Manufacturer\tliveindex\t
Model\tnordif_writer\t
Magnification\t200\t#
Scan direction\tDirect\t
Accelerating voltage\t20\tkV
Working distance\t24.7\tmm
Tilt angle\t70\t\u00b0
\t\t
[Electron image]\t\t
Frame rate\t0.25\tfps
Resolution\t1000x1000\tpx
Rotation\t0\t\u00b0
Flip x-axis\tFalse\t
Flip y-axis\tFalse\t
Calibration factor\t7273\t\u00b5m/V
Tilt axis\tx-axis\t
\t\t
[Detector angles]\t\t
Euler 1\t0\t\u00b0
Euler 2\t0\t\u00b0
Euler 3\t0\t\u00b0
Azimuthal\t0\t\u00b0
Elevation\t0\t\u00b0
\t\t
[Acquisition settings]\t\t
Frame rate\t{rate:.0f}\tfps
Resolution\t{sx}x{sy}\tpx
Exposure time\t1000\t\u00b5s
Gain\t0\t
\t\t
[Calibration settings]\t\t
Frame rate\t10\tfps
Resolution\t{sx}x{sy}\tpx
Exposure time\t99950\t\u00b5s
Gain\t8\t
\t\t
[Area]\t\t
Top\t0\tpx
Left\t0\tpx
Width\t{nx}\tpx
Height\t{ny}\tpx
Step size\t{step}\t\u00b5m
Number of samples\t{ny}x{nx}\t#
Scan time\t00:00:10\t
"""


def write_settings(folder, nav_shape, pattern_shape, *, step: float = 1.5, rate: float = 1000.0) -> Path:
    """Setting.txt for a (ny, nx) scan of (sy, sx) patterns; an empty Pattern.dat beside it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (ny, nx), (sy, sx) = nav_shape, pattern_shape
    text = SETTINGS.format(ny=ny, nx=nx, sy=sy, sx=sx, step=step, rate=rate)
    (folder / "Setting.txt").write_bytes(text.replace("\n", "\r\n").encode("latin-1"))
    path = folder / "Pattern.dat"
    path.write_bytes(b"")
    return path


def acquire(patterns: np.ndarray, path, *, rate: float, torn: bool = False, stop_after: int | None = None) -> np.ndarray:
    """Append ``patterns`` (N, H, W) to ``path`` on a clock of ``rate`` frames/s (each frame as
    it falls due; late frames at once); returns each frame's write time (wall clock)."""
    frames = np.ascontiguousarray(patterns.reshape(-1, *patterns.shape[-2:]), np.uint8)
    n = len(frames) if stop_after is None else min(stop_after, len(frames))
    times = np.full(n, np.nan)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        t0, written = time.perf_counter(), 0
        while written < n:
            due = min(n, int((time.perf_counter() - t0) * rate) + 1)
            for i in range(written, due):
                data = memoryview(frames[i]).cast("B")
                if torn and i % 10 == 0:
                    half = len(data) // 2
                    os.write(fd, data[:half])
                    time.sleep(0.02)  # the reader sees half a frame meanwhile
                    os.write(fd, data[half:])
                else:
                    os.write(fd, data)
                times[i] = time.time()
            written = due
            wait = t0 + written / rate - time.perf_counter()  # until the next frame is due
            if wait > 0 and written < n:
                time.sleep(wait)
    finally:
        os.close(fd)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("patterns", help="(ny, nx, H, W) uint8 .npy")
    parser.add_argument("folder")
    parser.add_argument("--rate", type=float, default=1000.0, help="frames/s (default 1000)")
    parser.add_argument("--torn", action="store_true", help="write every tenth frame in two halves 20 ms apart")
    parser.add_argument("--stop-after", type=int, help="stop after this many frames (an acquisition cut short)")
    parser.add_argument("--start-delay", type=float, default=0.0, help="seconds between Setting.txt and frame 0")
    args = parser.parse_args(argv)
    patterns = np.load(args.patterns)
    if patterns.ndim != 4 or patterns.dtype != np.uint8:
        parser.error(f"{args.patterns} holds {patterns.dtype}{patterns.shape}; give (ny, nx, H, W) uint8 frames")
    path = write_settings(args.folder, patterns.shape[:2], patterns.shape[2:], rate=args.rate)
    time.sleep(args.start_delay)
    times = acquire(patterns, path, rate=args.rate, torn=args.torn, stop_after=args.stop_after)
    np.save(Path(args.folder) / "write_times.npy", times)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

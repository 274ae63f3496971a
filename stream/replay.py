"""``liveindex replay FILE --as merlin --rate FPS``: a saved scan served as a detector would.

The scan is written as the file libertem-live's own simulator replays, then that simulator
runs as a child process (``libertem-live-mib-sim``, from libertem-live's ``sim`` extra), so
``liveindex publish --detector merlin`` (or any Merlin client) receives it over the real
protocol, without a microscope.

Merlin ``.mib`` as LiberTEM reads it (``libertem/io/dataset/mib.py``): per frame a 384-byte
ASCII header (``MQ1,<sequence>,00384,<chips>,<width>,<height>,U08|U16|U32,<layout>,...,<bit
depth>,`` padded with NUL) and the frame in big-endian pixels; beside it a ``.hdr`` with the
frame count, frames per trigger (one scan row), counter depth and ScanX/ScanY, which the
simulator sends as the acquisition header.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from liveindex.models.errors import InputError

log = logging.getLogger(__name__)

MIB_HEADER_BYTES = 384
_MIB_KINDS = {"uint8": ("U08", 6), "uint16": ("U16", 12), "uint32": ("U32", 24)}  # kind, counter depth


def load_frames(path, scan_shape=None) -> np.ndarray:
    """(ny, nx, H, W) frames of a .npy scan: (ny, nx, H, W), or (N, H, W) with ``scan_shape``."""
    path = Path(path)
    if path.suffix.lower() != ".npy":
        raise InputError(f"replay serves .npy scans, (ny, nx, H, W) or (N, H, W) with --scan-shape; {path.name} is "
                         "not one (save the frames with np.save)")
    try:
        frames = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {path} ({exc}); give a .npy of frames") from None
    if frames.ndim == 3:
        if scan_shape is None:
            raise InputError(f"{path.name} holds {len(frames)} frames without a scan shape; give --scan-shape WxH")
        ny, nx = scan_shape
        if ny * nx != len(frames):
            raise InputError(f"--scan-shape {nx}x{ny} has {ny * nx} points but {path.name} holds {len(frames)} frames")
        frames = frames.reshape(ny, nx, *frames.shape[1:])
    if frames.ndim != 4:
        raise InputError(f"{path.name} holds an array of shape {frames.shape}; give (ny, nx, H, W) or (N, H, W) frames")
    return frames


def write_mib(frames: np.ndarray, path) -> Path:
    """Write (ny, nx, H, W) integer frames as a Merlin ``.mib`` and its ``.hdr``; returns the .hdr."""
    path = Path(path)
    if frames.dtype.name not in _MIB_KINDS:
        raise InputError(f"a Merlin .mib holds uint8, uint16 or uint32 counts, not {frames.dtype}; convert the frames")
    kind, depth = _MIB_KINDS[frames.dtype.name]
    ny, nx, h, w = frames.shape
    big_endian = frames.dtype.newbyteorder(">")
    with open(path, "wb") as f:
        for i, frame in enumerate(frames.reshape(-1, h, w)):
            header = (f"MQ1,{i + 1:06d},{MIB_HEADER_BYTES:05d},01,{w:04d},{h:04d},{kind},   1x1,01,"
                      f"2024-01-01 00:00:00.000000,0.001000,0,0,0,1.0E+1,5.11E+2,0.0E+0,0.0E+0,0.0E+0,0.0E+0,"
                      f"0.0E+0,0.0E+0,3RX,0,511,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,MQ1A,"
                      f"2024-01-01T00:00:00.000000000Z,1000000ns,{depth},").encode("ascii")
            f.write(header.ljust(MIB_HEADER_BYTES, b"\0"))
            f.write(np.ascontiguousarray(frame, big_endian).tobytes())
    hdr = path.with_suffix(".hdr")
    hdr.write_text(f"HDR,\nFrames in Acquisition (Number):\t{ny * nx}\nFrames per Trigger (Number):\t{nx}\n"
                   f"Counter Depth (number):\t{depth}\nScanX:\t{nx}\nScanY:\t{ny}\nEnd\t", encoding="latin-1")
    return hdr


def simulator_command(hdr: Path, *, host: str, port: int, control_port: int, trigger_port: int,
                      rate: float | None) -> list[str]:
    """libertem-live's Merlin simulator serving ``hdr`` (its .mib beside it) once per connection."""
    exe = shutil.which("libertem-live-mib-sim") or str(Path(sys.executable).parent / "libertem-live-mib-sim")
    if not Path(exe).exists():
        raise InputError("replay --as merlin runs libertem-live's simulator: pip install 'liveindex[detectors]' "
                         "(libertem-live[sim])")
    command = [exe, str(hdr), "--host", host, "--data-port", str(port), "--control-port", str(control_port),
               "--trigger-port", str(trigger_port)]
    if rate:
        command += ["--dwelltime", str(max(1, round(1e6 / rate)))]  # microseconds a frame
    return command


def replay(path, *, kind: str, rate: float | None, host: str, port: int, control_port: int, trigger_port: int,
           scan_shape=None, folder=None, stop_event=None) -> int:
    """Write the file the simulator replays, run it until stopped; returns its exit status."""
    if kind != "merlin":
        raise InputError(f"replay --as {kind!r}: this liveindex replays through libertem-live's Merlin simulator "
                         "(--as merlin)")
    if rate is not None and not rate > 0:
        raise InputError(f"--rate {rate} must be a positive number of frames/s")
    frames = load_frames(path, scan_shape)
    folder = Path(folder) if folder else Path(path).with_suffix("")
    folder.mkdir(parents=True, exist_ok=True)
    hdr = write_mib(frames, folder / (Path(path).stem + ".mib"))
    command = simulator_command(hdr, host=host, port=port, control_port=control_port, trigger_port=trigger_port,
                                rate=rate)
    log.info("replaying %d frames of %s as a Merlin on %s:%d (control %d): %s", frames.shape[0] * frames.shape[1],
             tuple(frames.shape[2:]), host, port, control_port, " ".join(command))
    sim = subprocess.Popen(command)
    try:
        while sim.poll() is None:
            if stop_event is not None and stop_event.wait(0.5):
                break
            elif stop_event is None:
                sim.wait()
    finally:
        if sim.poll() is None:
            sim.terminate()
            try:
                sim.wait(30)
            except subprocess.TimeoutExpired:
                sim.kill()
    return 0 if sim.returncode in (0, -15, None) else int(sim.returncode)

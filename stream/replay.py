"""``liveindex replay FILE --as merlin|dectris --rate FPS``: a saved scan served as a detector would.

The scan is written as the file libertem-live's own simulator replays, then that simulator
runs as a child process (``libertem-live-mib-sim``, from libertem-live's ``sim`` extra), so
``liveindex publish --detector merlin`` (or any Merlin client) receives it over the real
protocol, without a microscope.

Merlin ``.mib`` as LiberTEM reads it (``libertem/io/dataset/mib.py``): per frame a 384-byte
ASCII header (``MQ1,<sequence>,00384,<chips>,<width>,<height>,U08|U16|U32,<layout>,...,<bit
depth>,`` padded with NUL) and the frame in big-endian pixels; beside it a ``.hdr`` with the
frame count, frames per trigger (one scan row), counter depth and ScanX/ScanY, which the
simulator sends as the acquisition header.

DECTRIS SIMPLON dump, as libertem-live-dectris-sim replays it (``libertem_dectris`` ``sim.rs``,
``common.rs``): length-prefixed messages (int64 little-endian length, then the bytes), as the
stream sends them: the ``dheader-1.0`` JSON, the detector config JSON (ntrigger, nimages,
trigger_mode, x/y_pixels_in_detector, bit_depth_image), then per frame ``dimage-1.0`` (series,
frame, md5 of the data), ``dimage_d-1.0`` (shape [x, y], type, encoding ``bs<bits>-lz4<``), the
frame bitshuffle/LZ4-compressed with the 12-byte header of the bitshuffle HDF5 filter (made
here by that filter: hdf5plugin through h5py, one chunk a frame), and ``dconfig-1.0`` (start,
stop and real time in ns); then ``dseries_end-1.0``. The simulator binds its data port at
random (0.3.0 cannot bind a fixed one: it binds twice), says which in its log, and serves
a series once the detector is armed through its REST API, which replay does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import struct
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


def write_simplon_dump(frames: np.ndarray, path, *, series: int = 1, frame_time: float = 1e-3) -> Path:
    """Write (ny, nx, H, W) integer frames as a recorded SIMPLON stream (see the module doc)."""
    path = Path(path)
    if frames.dtype.name not in _MIB_KINDS:
        raise InputError(f"a DECTRIS stream carries uint8, uint16 or uint32 counts, not {frames.dtype}; convert them")
    try:
        import h5py
        import hdf5plugin
    except ImportError:
        raise InputError("replay --as dectris compresses frames with hdf5plugin's bitshuffle filter: pip install "
                         "'liveindex[detectors]'") from None
    flat = np.ascontiguousarray(frames.reshape(-1, *frames.shape[2:]))
    n, h, w = flat.shape
    bits = flat.dtype.itemsize * 8

    def record(message) -> bytes:
        data = json.dumps(message).encode() if isinstance(message, dict) else bytes(message)
        return struct.pack("<q", len(data)) + data

    with open(path, "wb") as out, h5py.File(path.with_suffix(".bslz4.h5"), "w", driver="core",
                                              backing_store=False) as scratch:
        compressed = scratch.create_dataset("frames", data=flat, chunks=(1, h, w),
                                            **hdf5plugin.Bitshuffle(nelems=0, cname="lz4"))
        out.write(record({"htype": "dheader-1.0", "header_detail": "basic", "series": series}))
        out.write(record({"ntrigger": n, "nimages": 1, "trigger_mode": "exte", "x_pixels_in_detector": w,
                          "y_pixels_in_detector": h, "bit_depth_image": bits}))
        for i in range(n):
            blob = compressed.id.read_direct_chunk((i, 0, 0))[1]
            t0 = int(i * frame_time * 1e9)
            out.write(record({"htype": "dimage-1.0", "series": series, "frame": i,
                              "hash": hashlib.md5(blob).hexdigest()}))
            out.write(record({"htype": "dimage_d-1.0", "shape": [w, h], "type": flat.dtype.name,
                              "encoding": f"bs{bits}-lz4<"}))
            out.write(record(blob))
            out.write(record({"htype": "dconfig-1.0", "start_time": t0, "stop_time": t0 + int(frame_time * 0.9e9),
                              "real_time": int(frame_time * 0.9e9)}))
        out.write(record({"htype": "dseries_end-1.0", "series": series}))
    return path


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


def dectris_simulator_command(dump: Path, *, api_port: int, rate: float | None) -> list[str]:
    exe = shutil.which("libertem-live-dectris-sim") or str(Path(sys.executable).parent / "libertem-live-dectris-sim")
    if not Path(exe).exists():
        raise InputError("replay --as dectris runs libertem-live's simulator: pip install 'liveindex[detectors]' "
                         "(libertem-live[sim])")
    command = [exe, str(dump), "--port", str(api_port), "--zmqport", "0"]
    if rate:
        command += ["--dwelltime", str(max(1, round(1e6 / rate)))]
    return command


def replay(path, *, kind: str, rate: float | None, host: str, port: int, control_port: int, trigger_port: int,
           scan_shape=None, folder=None, stop_event=None, announce=log.info) -> int:
    """Write the file the simulator replays, run it until stopped; returns its exit status.
    ``announce`` gets one line saying where the stream is served."""
    if kind not in ("merlin", "dectris"):
        raise InputError(f"replay --as {kind!r}: this liveindex replays as merlin or dectris")
    if rate is not None and not rate > 0:
        raise InputError(f"--rate {rate} must be a positive number of frames/s")
    frames = load_frames(path, scan_shape)
    folder = Path(folder) if folder else Path(path).with_suffix("")
    folder.mkdir(parents=True, exist_ok=True)
    n = frames.shape[0] * frames.shape[1]
    if kind == "dectris":
        dump = write_simplon_dump(frames, folder / (Path(path).stem + ".simplon"))
        command = dectris_simulator_command(dump, api_port=control_port, rate=rate)
        log.info("replaying %d frames of %s as a DECTRIS detector: %s", n, tuple(frames.shape[2:]), " ".join(command))
        sim = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        data_port = _dectris_data_port(sim)
        _arm(control_port)
        announce(f"liveindex replay: DECTRIS stream of {n} frames on tcp://127.0.0.1:{data_port}, REST API on "
                 f"http://127.0.0.1:{control_port}, armed; receive it with liveindex publish --detector dectris "
                 f"--port {data_port} --scan-shape {frames.shape[1]}x{frames.shape[0]}")
    else:
        hdr = write_mib(frames, folder / (Path(path).stem + ".mib"))
        command = simulator_command(hdr, host=host, port=port, control_port=control_port, trigger_port=trigger_port,
                                    rate=rate)
        log.info("replaying %d frames of %s as a Merlin: %s", n, tuple(frames.shape[2:]), " ".join(command))
        sim = subprocess.Popen(command)
        announce(f"liveindex replay: Merlin stream of {n} frames on {host}:{port} (control {control_port}); receive "
                 f"it with liveindex publish --detector merlin --host {host} --port {port}")
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


def _dectris_data_port(sim: subprocess.Popen, timeout: float = 60) -> int:
    """The data port the DECTRIS simulator bound (its log says), its log passed on after that."""
    import threading
    import time

    t0 = time.monotonic()
    for line in sim.stderr:
        sys.stderr.write(line)
        found = re.search(r"RustedReplay listening on tcp://[^:]+:(\d+)", line)
        if found:
            threading.Thread(target=lambda: [sys.stderr.write(x) for x in sim.stderr], daemon=True).start()
            return int(found.group(1))
        if time.monotonic() - t0 > timeout:
            break
    sim.terminate()
    raise InputError("libertem-live-dectris-sim did not start (see its log above)")


def _arm(api_port: int) -> None:
    """Arm the simulated detector through its SIMPLON REST API, as the microscope's software would."""
    from libertem_live.detectors.dectris.DEigerClient import DEigerClient

    DEigerClient("127.0.0.1", api_port).sendDetectorCommand("arm")

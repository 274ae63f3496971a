"""Detector streams as live sources, through libertem-live's receivers (MIT).

``liveindex publish --detector merlin --host H --port P``: one receiver (as the vendors
require) on the detector's data port, in passive mode: it waits for an acquisition to be
armed, takes the scan shape and frame size from the acquisition's own header (``--scan-shape``
where the header has none), and then hands frames out as they arrive. Frames are frames: the
modality (``--modality``) gives the scan's setup and phases from its options
(``Modality.detector_setup``) and indexes them.

The receiver (libertem-qd-mpx's Rust thread) writes frames into a shared-memory ring; this
source decodes each stack straight into the page being filled (one copy) and releases the
slot at once, so the detector is never held up by indexing: pages go to the publisher's page
store (memory, then disk) whatever the workers' speed.

Quantum Detectors Merlin (libertem-qd-mpx), DECTRIS SIMPLON (libertem-dectris) and ASI
Timepix3 (libertem-asi-tpx3: sparse chunks summed into dense frames) are wired up.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time

import numpy as np

from liveindex.models.errors import InputError, TransportError
from liveindex.models.modality import ScanSource, wire_dtype

log = logging.getLogger(__name__)

DETECTORS = ("merlin", "dectris", "asi-tpx3")
DEFAULT_PORTS = {"merlin": 6342, "dectris": 9999, "asi-tpx3": 8283}  # Merlin's data port; the DCU's zmq stream
STACK_FRAMES = 16  # frames the receiver hands over at a time: a page fills in steps of this


def open_detector(kind: str, *, host: str, port: int | None, modality, args, arm_timeout: float,
                  stop_event=None) -> ScanSource:
    """Connect to the detector's stream and wait (up to ``arm_timeout`` s) for an acquisition."""
    if kind not in DETECTORS:
        raise InputError(f"--detector {kind!r}: this liveindex receives {', '.join(DETECTORS)}")
    cls = {"merlin": MerlinSource, "dectris": DectrisSource, "asi-tpx3": AsiTpx3Source}[kind]
    return cls(host=host, port=port or DEFAULT_PORTS[kind], modality=modality, args=args, arm_timeout=arm_timeout,
               stop_event=stop_event)


def parse_scan_shape(text: str) -> tuple[int, int]:
    """'40x30' (columns x rows) -> (ny, nx) = (30, 40)."""
    try:
        nx, ny = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise InputError(f"--scan-shape {text!r} must look like 40x30 (columns x rows)") from None
    if nx < 1 or ny < 1:
        raise InputError(f"--scan-shape {text!r} must be positive")
    return ny, nx


class StreamSource(ScanSource):
    """Frames of one acquisition from a libertem-live receiver (its shared-memory ring) and the
    matching ``CamClient`` that decodes them; subclasses connect and describe the acquisition."""

    live = True

    def _begin(self, *, frames: int, nav, pattern_shape, modality, args, metadata: dict, what: str) -> None:
        """Scan shape (``--scan-shape`` wins), the first stack (its dtype) and the modality's setup."""
        scan_shape = getattr(args, "scan_shape", None)
        if scan_shape:
            nav = parse_scan_shape(scan_shape)
        if nav is None:
            side = int(round(frames ** 0.5))
            if side * side != frames:
                raise InputError(f"the {what} acquisition of {frames} frames does not carry its scan shape; give "
                                 "--scan-shape WxH")
            nav = (side, side)
        if int(np.prod(nav)) != frames:
            raise InputError(f"scan shape {nav[1]}x{nav[0]} has {int(np.prod(nav))} points but the acquisition has "
                             f"{frames} frames; give the acquisition's scan shape with --scan-shape WxH")
        self.nav_shape = (int(nav[0]), int(nav[1]))
        self.pattern_shape = tuple(int(v) for v in pattern_shape)
        # The dtype comes with the frames: decode the first stack now (scan_start needs it).
        stack = self._conn.get_next_stack(max_size=STACK_FRAMES)
        first = None if stack is None else self._decode(stack)
        if first is None or not len(first):
            raise TransportError(f"the {what} acquisition ended before its first frame")
        self.dtype = wire_dtype(first.dtype)
        self.modality = modality
        setup, phases, step = modality.detector_setup(args, self.pattern_shape)
        self.setup = modality.check_setup(dict(setup), self.pattern_shape)
        self.phases, self.step = list(phases), tuple(step)
        self.truth = {}
        self.metadata = metadata
        self._what = what
        self._frames = first  # decoded, not yet read
        self._first = 0  # index of _frames[0]
        self._received = len(first)
        self._times: list[tuple[int, float]] = [(0, time.time())]  # (first index of a stack, when it was decoded)
        self.end_reason = "" if self._received >= frames else None
        log.info("%s acquisition: %d frames of %s %s, scan %dx%d", what, frames, self.dtype, self.pattern_shape,
                 self.nav_shape[1], self.nav_shape[0])

    def arrived(self, timeout: float) -> int:
        """Takes the next stack from the receiver (it blocks until one is there, or the stream ends)."""
        if self.end_reason is not None:
            return self._received
        stack = self._conn.get_next_stack(max_size=min(STACK_FRAMES, self.size - self._received))
        decoded = None if stack is None else self._decode(stack)
        if decoded is None or not len(decoded):
            self.end_reason = (f"the {self._what} stream ended after {self._received} of {self.size} frames"
                               if self._received < self.size else "")
            return self._received
        n = len(decoded)
        self._times.append((self._received, time.time()))
        self._frames = decoded if not len(self._frames) else np.concatenate([self._frames, decoded])
        self._received += n
        if self._received >= self.size:
            self.end_reason = ""
        return self._received

    def _decode(self, stack) -> np.ndarray:
        """A stack of frames from the receiver's shared memory as one (n, H, W) array; the slot
        goes back to the receiver at once (the handle is freed)."""
        n = len(stack)
        dtype = np.dtype(stack.get_dtype_string()).newbyteorder("=")
        decoded = np.empty((n, *self.pattern_shape), dtype)
        self._cam.decode_range_into_buffer(stack, decoded, 0, n)
        self._cam.done(stack)
        return decoded

    def read(self, first: int, count: int) -> np.ndarray:
        if first != self._first or count > len(self._frames):
            raise IndexError(f"frames {first}..{first + count - 1} were read already or have not arrived")
        page, self._frames = self._frames[:count], self._frames[count:]
        self._first += count
        return np.ascontiguousarray(page, self.dtype)

    def frame_times(self, first: int, count: int) -> np.ndarray:
        """When each frame was received (neither receiver exposes a per-frame wall-clock time
        from the detector: DECTRIS's are relative to the series start and stay in the receiver)."""
        while len(self._times) > 1 and self._times[1][0] <= first:  # read in order: earlier stacks are done
            self._times.pop(0)
        starts = np.array([s for s, _ in self._times])
        stamps = np.array([t for _, t in self._times])
        return stamps[np.searchsorted(starts, np.arange(first, first + count), side="right") - 1]

    def close(self) -> None:
        for name in ("_cam", "_conn"):
            part = getattr(self, name, None)
            if part is not None:
                try:
                    part.close()
                except Exception as exc:  # closing a receiver that already ended
                    log.debug("closing the %s receiver %s: %s", getattr(self, "_what", "detector"), name, exc)
                setattr(self, name, None)
        self._cleanup()

    def _cleanup(self) -> None:
        shutil.rmtree(self._folder, ignore_errors=True)


class MerlinSource(StreamSource):
    """One Merlin acquisition received through libertem-qd-mpx (passive mode)."""

    def __init__(self, *, host: str, port: int, modality, args, arm_timeout: float, stop_event=None):
        try:
            import libertem_qd_mpx
        except ImportError:
            raise InputError("--detector merlin needs libertem-live's receiver: pip install 'liveindex[detectors]'") \
                from None
        self._folder = tempfile.mkdtemp(prefix="liveindex-merlin-")
        try:
            self._conn = libertem_qd_mpx.QdConnection(
                data_host=host, data_port=int(port), frame_stack_size=STACK_FRAMES,
                shm_handle_path=os.path.join(self._folder, "shm"), drain=False)
            self._conn.start_passive()
        except Exception as exc:  # the Rust receiver raises its own types
            self._cleanup()
            raise TransportError(f"cannot receive from the Merlin data port {host}:{port} ({exc}); start the Merlin "
                                 "software (or libertem-live-mib-sim) there, or fix --host/--port") from None
        log.info("waiting for a Merlin acquisition on %s:%d (up to %.0f s)", host, port, arm_timeout)
        config, deadline = None, time.monotonic() + arm_timeout
        while config is None and time.monotonic() < deadline and not (stop_event and stop_event.is_set()):
            config = self._conn.wait_for_arm(timeout=0.5)
        if config is None:
            self.close()
            raise TransportError(f"no Merlin acquisition started on {host}:{port} within {arm_timeout:.0f} s "
                                 "(--arm-timeout); arm the detector, or check --host/--port")
        self._cam = libertem_qd_mpx.CamClient(self._conn.get_socket_path())
        try:
            self._begin(frames=int(config.frames_in_acquisition()), nav=config.nav_shape(),
                        pattern_shape=config.detector_shape(), modality=modality, args=args, what="Merlin",
                        metadata={"source": f"Merlin at {host}:{port}",
                                  "frames_per_trigger": int(config.frames_per_trigger())})
        except BaseException:
            self.close()
            raise

class DectrisSource(StreamSource):
    """One DECTRIS SIMPLON series (ARINA, QUADRO, EIGER) received through libertem-dectris in
    passive mode: whatever drives the scan arms the detector; frames arrive bitshuffle/LZ4
    compressed and are decompressed into the page. The detector's header carries the frame
    count and size, not the scan shape (``--scan-shape``; a square count is taken as square)."""

    def __init__(self, *, host: str, port: int, modality, args, arm_timeout: float, stop_event=None):
        try:
            import libertem_dectris
        except ImportError:
            raise InputError("--detector dectris needs libertem-live's receiver: pip install 'liveindex[detectors]'") \
                from None
        self._folder = tempfile.mkdtemp(prefix="liveindex-dectris-")
        try:
            # 2048 slots of a stack each: a generous ring (compressed frames are much smaller
            # than bytes_per_frame, the uncompressed 16-bit size of a 512x512 frame here).
            self._conn = libertem_dectris.DectrisConnection(
                uri=f"tcp://{host}:{int(port)}", handle_path=os.path.join(self._folder, "shm"),
                frame_stack_size=STACK_FRAMES, num_slots=2048, bytes_per_frame=512 * 512 * 2, huge=False)
            self._conn.start_passive()
        except Exception as exc:  # the Rust receiver raises its own types
            self._cleanup()
            raise TransportError(f"cannot receive from the DECTRIS stream tcp://{host}:{port} ({exc}); check "
                                 "--host/--port (the DCU's zmq stream port)") from None
        log.info("waiting for a DECTRIS series on tcp://%s:%d (up to %.0f s)", host, port, arm_timeout)
        armed, deadline = None, time.monotonic() + arm_timeout
        while armed is None and time.monotonic() < deadline and not (stop_event and stop_event.is_set()):
            armed = self._conn.wait_for_arm(timeout=0.5)
        if armed is None:
            self.close()
            raise TransportError(f"no DECTRIS series was armed on tcp://{host}:{port} within {arm_timeout:.0f} s "
                                 "(--arm-timeout); arm the detector, or check --host/--port")
        config, series = armed
        self._cam = libertem_dectris.CamClient(self._conn.get_socket_path())
        try:
            shape = (_config_value(config, "y_pixels_in_detector"), _config_value(config, "x_pixels_in_detector"))
            self._begin(frames=int(config.get_num_frames()), nav=None, pattern_shape=shape, modality=modality,
                        args=args, what="DECTRIS", metadata={"source": f"DECTRIS at {host}:{port}",
                                                              "series": int(series)})
        except BaseException:
            self.close()
            raise


class AsiTpx3Source(StreamSource):
    """One ASI Timepix3 acquisition (CheeTah's sparse stream) through libertem-asi-tpx3 in
    passive mode: the acquisition header carries the scan and frame shapes; each chunk of
    frames arrives as a CSR matrix (events per pixel) and is summed into dense frames."""

    def __init__(self, *, host: str, port: int, modality, args, arm_timeout: float, stop_event=None):
        try:
            import libertem_asi_tpx3
        except ImportError:
            raise InputError("--detector asi-tpx3 needs libertem-live's receiver: pip install 'liveindex[detectors]'") \
                from None
        self._folder = tempfile.mkdtemp(prefix="liveindex-tpx3-")
        try:
            # libertem-live's defaults: 24 chunks a stack, 16 kB a chunk, 2 GB of slots.
            self._conn = libertem_asi_tpx3.ASITpx3Connection(
                uri=f"{host}:{int(port)}", chunks_per_stack=24, num_slots=2048 * 1024 * 1024 // (16 * 1024 * 24),
                bytes_per_chunk=16 * 1024, huge=False, handle_path=os.path.join(self._folder, "shm"))
            self._conn.start_passive()
        except Exception as exc:  # the Rust receiver raises its own types
            self._cleanup()
            raise TransportError(f"cannot receive from the Timepix3 stream {host}:{port} ({exc}); check "
                                 "--host/--port") from None
        log.info("waiting for a Timepix3 acquisition on %s:%d (up to %.0f s)", host, port, arm_timeout)
        header, deadline = None, time.monotonic() + arm_timeout
        while header is None and time.monotonic() < deadline and not (stop_event and stop_event.is_set()):
            header = self._conn.wait_for_arm(0.5)
        if header is None:
            self.close()
            raise TransportError(f"no Timepix3 acquisition started on {host}:{port} within {arm_timeout:.0f} s "
                                 "(--arm-timeout); start it, or check --host/--port")
        self._cam = libertem_asi_tpx3.CamClient(self._conn.get_socket_path())
        try:
            nav = tuple(header.get_nav_shape())
            self._begin(frames=int(np.prod(nav)), nav=nav if len(nav) == 2 else None,
                        pattern_shape=tuple(header.get_sig_shape()), modality=modality, args=args, what="Timepix3",
                        metadata={"source": f"ASI Timepix3 at {host}:{port}"})
        except BaseException:
            self.close()
            raise

    def _decode(self, stack) -> np.ndarray:
        """The stack's CSR chunks summed into dense (n, H, W) frames (its values' dtype)."""
        pixels = int(np.prod(self.pattern_shape))
        parts = []
        try:
            for layout, indptr, indices, values in self._cam.get_chunks(handle=stack):
                n = layout.get_nframes()
                indptr = np.frombuffer(indptr, layout.get_indptr_dtype())[:n + 1].astype(np.int64)
                indices = np.frombuffer(indices, layout.get_indices_dtype())
                values = np.frombuffer(values, layout.get_value_dtype())
                dense = np.zeros((n, pixels), values.dtype)
                rows = np.repeat(np.arange(n), np.diff(indptr))
                np.add.at(dense, (rows, indices[:len(rows)]), values[:len(rows)])
                parts.append(dense.reshape(n, *self.pattern_shape))
        finally:
            self._cam.done(stack)
        if not parts:
            return np.empty((0, *self.pattern_shape), np.uint32)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _config_value(config, name: str) -> int:
    """A field of libertem-dectris's DetectorConfig, which Python sees only in its repr."""
    import re

    match = re.search(rf"{name}: (\d+)", repr(config))
    if match is None:
        raise TransportError(f"the DECTRIS detector config does not say {name}: {config!r}")
    return int(match.group(1))

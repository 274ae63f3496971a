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

Only Quantum Detectors Merlin is wired up here; DECTRIS SIMPLON and ASI Timepix3 use the same
libertem-live pattern (``libertem_dectris``, ``libertem_asi_tpx3``) but are not built yet.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time

import numpy as np

from liveindex.models.errors import InputError, TransportError
from liveindex.models.modality import FRAME_DTYPES, ScanSource

log = logging.getLogger(__name__)

DETECTORS = ("merlin",)
DEFAULT_PORTS = {"merlin": 6342}  # the Merlin software's data port
STACK_FRAMES = 16  # frames the receiver hands over at a time: a page fills in steps of this


def open_detector(kind: str, *, host: str, port: int | None, modality, args, arm_timeout: float,
                  stop_event=None) -> ScanSource:
    """Connect to the detector's stream and wait (up to ``arm_timeout`` s) for an acquisition."""
    if kind not in DETECTORS:
        raise InputError(f"--detector {kind!r}: this liveindex receives {', '.join(DETECTORS)}")
    return MerlinSource(host=host, port=port or DEFAULT_PORTS[kind], modality=modality, args=args,
                        arm_timeout=arm_timeout, stop_event=stop_event)


def parse_scan_shape(text: str) -> tuple[int, int]:
    """'40x30' (columns x rows) -> (ny, nx) = (30, 40)."""
    try:
        nx, ny = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise InputError(f"--scan-shape {text!r} must look like 40x30 (columns x rows)") from None
    if nx < 1 or ny < 1:
        raise InputError(f"--scan-shape {text!r} must be positive")
    return ny, nx


class MerlinSource(ScanSource):
    """One Merlin acquisition received through libertem-qd-mpx (passive mode)."""

    live = True

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
        n = int(config.frames_in_acquisition())
        nav = config.nav_shape()
        scan_shape = getattr(args, "scan_shape", None)
        if scan_shape:
            nav = parse_scan_shape(scan_shape)
        if nav is None:
            self.close()
            raise InputError(f"the Merlin acquisition of {n} frames does not carry its scan shape; give --scan-shape WxH")
        if int(np.prod(nav)) != n:
            self.close()
            raise InputError(f"scan shape {nav[1]}x{nav[0]} has {int(np.prod(nav))} points but the acquisition has {n} "
                             "frames; give the acquisition's scan shape with --scan-shape WxH")
        self.nav_shape = (int(nav[0]), int(nav[1]))
        self.pattern_shape = tuple(int(v) for v in config.detector_shape())
        # The dtype comes with the frames: take the first stack now (scan_start needs it).
        self._pending = self._conn.get_next_stack(max_size=STACK_FRAMES)
        if self._pending is None or len(self._pending) == 0:
            self.close()
            raise TransportError("the Merlin acquisition ended before its first frame")
        dtype = np.dtype(self._pending.get_dtype_string()).newbyteorder("=")
        self.dtype = dtype.name if dtype.name in FRAME_DTYPES else "float32"
        self.modality = modality
        setup, phases, step = modality.detector_setup(args, self.pattern_shape)
        self.setup = modality.check_setup(dict(setup), self.pattern_shape)
        self.phases, self.step = list(phases), tuple(step)
        self.truth = {}
        self.metadata = {"source": f"Merlin at {host}:{port}", "frames_per_trigger": int(config.frames_per_trigger())}
        self._raw_dtype = dtype
        self._frames = np.empty((0, *self.pattern_shape), dtype)  # decoded, not yet read
        self._first = 0  # index of _frames[0]
        self._received = 0
        self._times: list[tuple[int, float]] = []  # (first index of a stack, when it was decoded)
        self.end_reason: str | None = None
        log.info("Merlin acquisition: %d frames of %s %s, scan %dx%d", n, self.dtype, self.pattern_shape,
                 self.nav_shape[1], self.nav_shape[0])

    def arrived(self, timeout: float) -> int:
        """Takes the next stack from the receiver (it blocks until one is there, or the stream ends)."""
        if self.end_reason is not None:
            return self._received
        stack = self._pending if self._pending is not None else self._conn.get_next_stack(
            max_size=min(STACK_FRAMES, self.size - self._received))
        self._pending = None
        if stack is None or len(stack) == 0:
            self.end_reason = (f"the Merlin stream ended after {self._received} of {self.size} frames"
                               if self._received < self.size else "")
            return self._received
        n = len(stack)
        decoded = np.empty((n, *self.pattern_shape), self._raw_dtype)
        self._cam.decode_range_into_buffer(stack, decoded, 0, n)
        self._cam.done(stack)  # the slot goes back to the receiver at once (the handle is freed)
        self._times.append((self._received, time.time()))
        self._frames = decoded if not len(self._frames) else np.concatenate([self._frames, decoded])
        self._received += n
        if self._received >= self.size:
            self.end_reason = ""
        return self._received

    def read(self, first: int, count: int) -> np.ndarray:
        if first != self._first or count > len(self._frames):
            raise IndexError(f"frames {first}..{first + count - 1} were read already or have not arrived")
        page, self._frames = self._frames[:count], self._frames[count:]
        self._first += count
        return np.ascontiguousarray(page, self.dtype)

    def frame_times(self, first: int, count: int) -> np.ndarray:
        """When each frame was received (the Merlin stream carries no per-frame wall clock time
        the receiver exposes)."""
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
                    log.debug("closing the Merlin %s: %s", name, exc)
                setattr(self, name, None)
        self._cleanup()

    def _cleanup(self) -> None:
        shutil.rmtree(self._folder, ignore_errors=True)

"""The wire protocol: one msgpack header frame, then zero or more raw buffer frames.

The header always carries the schema version ``v`` and the message ``kind``. Arrays
travel as raw buffers (``numpy.tobytes`` / ``numpy.frombuffer``); their names, dtypes and
shapes are listed in the header under ``buffers``. Nothing is ever pickled.

``decode`` validates everything it can check without knowing the scan: header fields
and types, buffer sizes against dtype and shape, array shapes against each other, and a
``scan_start``'s declarations (modality name, phase records, result fields, methods). The
receiver then checks a message against the scan it belongs to (``check_frames``,
``check_results``): results must carry exactly the fields the scan declared.

v2 (this) carries the modality, its opaque setup, phases as records and the declared result
fields and methods in ``scan_start``; v1 (EBSD only: a ``detector`` and phase names) is
refused with a message that says to upgrade.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import msgpack
import numpy as np

from liveindex.models.crystal import PhaseRecord, phases_from_wire
from liveindex.models.errors import InputError, ProtocolError
from liveindex.models.modality import FRAME_DTYPES, NOT_INDEXED, Field, Method, fields_from_wire, methods_from_wire

VERSION = 2
# Scan and run ids name files in the sink's output folder: a safe character set, never a path.
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MAX_POINTS = 200_000_000  # points a scan may have (the sink holds about 40 bytes a point)
MAX_PAGE = 1_000_000  # points a page may carry

# Kinds and the header fields each must carry, with their types.
_INT = (int,)
_NUM = (int, float)
_STR = (str,)
_LIST = (list, tuple)
_DICT = (dict,)
HEADER_FIELDS: dict[str, dict[str, tuple]] = {
    "scan_start": {
        "scan": _STR,
        "modality": _STR,
        "nav_shape": _LIST,
        "step": _LIST,
        "pattern_shape": _LIST,
        "dtype": _STR,
        "setup": _DICT,
        "phases": _LIST,
        "fields": _LIST,
        "methods": _LIST,
        "metadata": _DICT,
    },
    "frames": {"scan": _STR, "first": _INT, "count": _INT, "t_sent": _NUM},
    "results": {"scan": _STR, "first": _INT, "count": _INT, "worker": _STR, "timings": _DICT},
    "scan_end": {"scan": _STR, "frames_sent": _INT, "status": _STR},
    "credit": {"worker": _STR, "pages": _INT, "done": _LIST},
    "stored": {"scan": _STR, "pages": _LIST},
    "heartbeat": {"sender": _STR},
}
# Buffers each kind must carry (name -> dtypes allowed).
# (Result pages carry the scan's declared fields besides; ``check_results`` checks them.)
REQUIRED_BUFFERS: dict[str, dict[str, tuple[str, ...]]] = {
    "frames": {"patterns": FRAME_DTYPES},
    "results": {"indices": ("int64",)},
}
# Every dtype that may appear on the wire; nothing with object semantics.
WIRE_DTYPES = frozenset(
    ["uint8", "uint16", "uint32", "int16", "int32", "int64", "float16", "float32", "float64", "bool"]
)
# "partial": the acquisition itself ended with frames missing (a followed file that stopped
# growing, a detector series cut short); the scan_end's "reason" says why.
SCAN_END_STATUSES = ("success", "abort", "fail", "partial")


@dataclass
class Message:
    """A decoded message: its header and its named arrays (read-only views)."""

    header: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.header["kind"]


def encode(kind: str, header: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> list:
    """Encode a message into frames for ``send_multipart``.

    Buffers are passed as memoryviews of C-contiguous arrays, so zmq sends them without
    another copy.
    """
    full = {"v": VERSION, "kind": kind, **header}
    buffers = []
    specs = []
    for name, array in (arrays or {}).items():
        array = np.ascontiguousarray(array)
        if array.dtype.name not in WIRE_DTYPES:
            raise ProtocolError(f"array {name!r} has dtype {array.dtype}, not a wire dtype {sorted(WIRE_DTYPES)}")
        specs.append([name, array.dtype.name, list(array.shape)])
        buffers.append(memoryview(array).cast("B"))
    full["buffers"] = specs
    _check_header(full)
    return [msgpack.packb(full, use_bin_type=True), *buffers]


def decode(frames: Iterable) -> Message:
    """Decode and validate frames received with ``recv_multipart``.

    Frames may be ``bytes`` or ``zmq.Frame``; arrays are zero-copy views of them.
    Raises ProtocolError, with the header where one was parsed, for anything malformed.
    """
    frames = list(frames)
    if not frames:
        raise ProtocolError("empty message: expected a msgpack header frame")
    raw_header = _as_buffer(frames[0])
    try:
        header = msgpack.unpackb(raw_header, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"header frame is not valid msgpack ({type(exc).__name__}: {exc})") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a msgpack map, got {type(header).__name__}")
    _check_header(header)
    specs = header["buffers"]
    if len(specs) != len(frames) - 1:
        raise ProtocolError(
            f"header lists {len(specs)} buffers but {len(frames) - 1} buffer frames arrived", header
        )
    arrays = {}
    for spec, frame in zip(specs, frames[1:]):
        name, dtype, shape = _check_spec(spec, header)
        buffer = _as_buffer(frame)
        expected = math.prod(shape) * np.dtype(dtype).itemsize  # Python ints: no overflow
        if len(buffer) != expected:
            raise ProtocolError(
                f"buffer {name!r} has {len(buffer)} bytes, expected {expected} for {dtype}{tuple(shape)}",
                header,
            )
        arrays[name] = np.frombuffer(buffer, dtype=dtype).reshape(shape)
    message = Message(header, arrays)
    _check_arrays(message)
    return message


def _as_buffer(frame) -> memoryview | bytes:
    return frame.buffer if hasattr(frame, "buffer") else frame


def _check_header(header: dict) -> None:
    if header.get("v") != VERSION:
        if isinstance(header.get("v"), int) and not isinstance(header.get("v"), bool) and header["v"] < VERSION:
            raise ProtocolError(f"the peer speaks protocol v{header['v']} (an older liveindex); this one speaks "
                                f"v{VERSION}: upgrade every part (publisher, workers, sink) to the same liveindex", header)
        raise ProtocolError(f"unsupported schema version {header.get('v')!r}; this liveindex speaks v{VERSION}", header)
    kind = header.get("kind")
    if not isinstance(kind, str) or kind not in HEADER_FIELDS:  # a list or dict is not hashable
        raise ProtocolError(f"unknown message kind {kind!r}; expected one of {sorted(HEADER_FIELDS)}", header)
    for name, types in HEADER_FIELDS[kind].items():
        value = header.get(name)
        if not isinstance(value, types) or isinstance(value, bool):
            raise ProtocolError(f"{kind} header field {name!r} is missing or not {types[0].__name__}", header)
    for key in ("scan", "run"):
        value = header.get(key)
        if value is not None and (not isinstance(value, str) or not SAFE_ID.match(value)):
            raise ProtocolError(f"{key} id {str(value)[:80]!r} must be 1-128 letters, digits, '_', '.' or '-', "
                                "starting with a letter or digit (it names files, never a path)", header)
    if not isinstance(header.get("buffers", []), list):
        raise ProtocolError("header field 'buffers' must be a list", header)
    header.setdefault("buffers", [])
    if kind == "frames" and header["count"] < 1:
        raise ProtocolError("frames page must hold at least one pattern", header)
    if kind == "frames" and header["first"] < 0:
        raise ProtocolError("frames page has a negative first index", header)
    if kind == "scan_end" and header["status"] not in SCAN_END_STATUSES:
        raise ProtocolError(f"scan_end status must be one of {SCAN_END_STATUSES}", header)
    if kind in ("results", "frames") and not 0 <= header["count"] <= MAX_PAGE:
        raise ProtocolError(f"{kind} page of {header['count']} points; at most {MAX_PAGE}", header)
    if kind == "scan_end" and header["frames_sent"] < 0:
        raise ProtocolError("scan_end frames_sent is negative", header)
    if kind == "scan_end" and not (isinstance(header.get("reason", ""), str) and len(header.get("reason", "")) <= 500):
        raise ProtocolError("scan_end reason must be text of at most 500 characters", header)
    if kind == "stored" and not (all(_is_int(p) for p in header["pages"])
                                 and isinstance(header.get("refused", ""), str)):
        raise ProtocolError("stored pages must be integers (and refused a reason)", header)
    if kind == "credit" and not (0 <= header["pages"] <= 1000 and all(
            isinstance(d, list) and len(d) == 2 and isinstance(d[0], str) and _is_int(d[1]) for d in header["done"])):
        raise ProtocolError("credit must grant 0..1000 pages and list done pages as [scan, first]", header)
    if kind == "heartbeat" and header["sender"] == "dispatcher":
        _check_dispatcher_status(header)
    if kind == "scan_start":
        _check_scan_start(header)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# A dispatcher's heartbeat feeds the sink's metrics and the live page's worker list: every
# field it may carry, checked here so that one bad beat is dropped whole and never reaches them.
_DISPATCHER_COUNTS = ("frames_sent", "queue_depth", "backlog_frames", "spilled_frames", "dropped_frames", "memory_bytes")


def _check_dispatcher_status(header: dict) -> None:
    for name in _DISPATCHER_COUNTS:
        if name in header and not (_is_int(header[name]) and 0 <= header[name] < 2**63):
            raise ProtocolError(f"dispatcher heartbeat {name} must be a non-negative integer", header)
    workers = header.get("workers", [])
    if not (isinstance(workers, list) and len(workers) <= 10_000 and all(
            isinstance(w, dict) and isinstance(w.get("name"), str) and isinstance(w.get("state"), str)
            and _is_int(w.get("credit")) for w in workers)):
        raise ProtocolError("dispatcher heartbeat workers must be a list of {name, state, credit}", header)
    if "scan" in header and header["scan"] is not None and not isinstance(header["scan"], str):
        raise ProtocolError("dispatcher heartbeat scan must be a scan id", header)


def _check_scan_start(header: dict) -> None:
    nav, pattern = header["nav_shape"], header["pattern_shape"]
    if not (1 <= len(nav) <= 2 and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in nav)):
        raise ProtocolError("scan_start nav_shape must be 1 or 2 positive integers", header)
    if int(np.prod(nav, dtype=np.float64)) > MAX_POINTS:
        raise ProtocolError(f"scan_start nav_shape {nav} has more than {MAX_POINTS} points; split the scan", header)
    if not (len(pattern) == 2 and all(isinstance(n, int) and not isinstance(n, bool) and 1 < n <= 65536
                                      for n in pattern)):
        raise ProtocolError("scan_start pattern_shape must be 2 integers in 2..65536", header)
    if header["dtype"] not in FRAME_DTYPES:
        raise ProtocolError(f"scan_start dtype must be one of {FRAME_DTYPES}", header)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in header["step"]):
        raise ProtocolError("scan_start step must be numbers", header)
    ScanStart.from_header(header)  # the declarations parse


@dataclass(frozen=True)
class ScanStart:
    """A validated ``scan_start``: what the runtime needs to know about a scan."""

    scan: str
    run: str | None
    modality: str
    nav_shape: tuple[int, int]  # (ny, nx); a line scan is (1, n)
    step: tuple[float, float]
    pattern_shape: tuple[int, int]
    dtype: str
    setup: dict
    phases: tuple[PhaseRecord, ...]
    fields: tuple[Field, ...]
    methods: tuple[Method, ...]
    metadata: dict
    header: dict

    @classmethod
    def from_header(cls, header: dict) -> "ScanStart":
        try:
            phases = tuple(phases_from_wire(header["phases"]))
            fields = fields_from_wire(header["fields"])
            methods = methods_from_wire(header["methods"])
        except InputError as exc:
            raise ProtocolError(f"scan_start declares {exc}", header) from None
        if not isinstance(header["modality"], str) or not SAFE_ID.match(header["modality"]):
            raise ProtocolError("scan_start modality must be a plain name (ebsd, spots, ...)", header)
        names = {f.name: f for f in fields}
        if "phase_id" in names and names["phase_id"].dtype not in ("int16", "int32"):
            raise ProtocolError("scan_start field phase_id must be int16 or int32", header)
        if "quaternion" in names and (names["quaternion"].shape != (4,) or names["quaternion"].dtype[0] != "f"):
            raise ProtocolError("scan_start field quaternion must be float of shape (4,)", header)
        if "method" in names and names["method"].dtype != "uint8":
            raise ProtocolError("scan_start field method must be uint8", header)
        nav = header["nav_shape"]
        step = [float(v) for v in header["step"]] or [1.0]
        return cls(scan=header["scan"], run=header.get("run"), modality=header["modality"],
                   nav_shape=tuple(nav) if len(nav) == 2 else (1, nav[0]),
                   step=tuple(step) if len(step) == 2 else (1.0, step[0]),
                   pattern_shape=tuple(header["pattern_shape"]), dtype=header["dtype"], setup=header["setup"],
                   phases=phases, fields=fields, methods=methods, metadata=header["metadata"], header=header)

    @property
    def size(self) -> int:
        return int(self.nav_shape[0] * self.nav_shape[1])

    @property
    def field(self) -> dict[str, Field]:
        return {f.name: f for f in self.fields}

    @property
    def not_indexed_code(self) -> int:
        return [m.label for m in self.methods].index(NOT_INDEXED)

    @property
    def has_orientations(self) -> bool:
        return "phase_id" in self.field and "quaternion" in self.field

    def unexplained(self, arrays: dict) -> np.ndarray:
        """Points that were answered (a method other than "none") but that no listed phase
        explains: they kept no phase (below the modality's minimum confidence) or their
        confidence is below 0.5 (the contract: above 0.5 means right). Many of them mean a
        phase is probably missing from the list, or patterns too poor to index."""
        if "phase_id" not in arrays or "method" not in arrays:
            return np.zeros(len(next(iter(arrays.values()))), bool)
        doubtful = arrays["phase_id"] < 0
        if "confidence" in arrays:
            doubtful = doubtful | (arrays["confidence"] < 0.5)
        return doubtful & (arrays["method"] != self.not_indexed_code)

    def indexed(self, arrays: dict) -> np.ndarray:
        """Which points of these field arrays were indexed: a phase where the scan has phases,
        else a method other than "none", else every point."""
        if "phase_id" in arrays:
            return arrays["phase_id"] >= 0
        if "method" in arrays:
            return arrays["method"] != self.not_indexed_code
        return np.ones(len(next(iter(arrays.values()))), bool)


def _check_spec(spec, header) -> tuple[str, str, list[int]]:
    if not (isinstance(spec, list) and len(spec) == 3):
        raise ProtocolError(f"buffer spec {spec!r} must be [name, dtype, shape]", header)
    name, dtype, shape = spec
    if not isinstance(name, str):
        raise ProtocolError(f"buffer spec {spec!r}: its name must be a string", header)
    if not isinstance(dtype, str) or dtype not in WIRE_DTYPES:  # a list or dict is not hashable
        raise ProtocolError(f"buffer {name!r} has dtype {dtype!r}, not one of {sorted(WIRE_DTYPES)}", header)
    if not (isinstance(shape, list) and len(shape) <= 8
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
        raise ProtocolError(f"buffer {name!r} has an invalid shape {shape!r}", header)
    return name, dtype, shape


def _check_arrays(message: Message) -> None:
    header, arrays = message.header, message.arrays
    for name, dtypes in REQUIRED_BUFFERS.get(message.kind, {}).items():
        if name not in arrays:
            raise ProtocolError(f"{message.kind} message lacks its {name!r} buffer", header)
        if arrays[name].dtype.name not in dtypes:
            raise ProtocolError(f"{message.kind} buffer {name!r} must be {' or '.join(dtypes)}", header)
    times = arrays.get("t_acquired")  # optional, frames and results: when each frame was acquired
    if times is not None and (times.dtype != np.float64 or times.shape != (header["count"],)):
        raise ProtocolError(f"{message.kind} buffer 't_acquired' must be float64 (count,), got "
                            f"{times.dtype}{times.shape}", header)
    if message.kind == "frames":
        patterns = arrays["patterns"]
        if patterns.ndim != 3 or patterns.shape[0] != header["count"]:
            raise ProtocolError(
                f"frames buffer has shape {patterns.shape}, expected (count={header['count']}, H, W)", header
            )
    elif message.kind == "results":
        n = header["count"]
        for name, array in arrays.items():
            if array.ndim == 0 or array.shape[0] != n:
                raise ProtocolError(f"results buffer {name!r} has shape {array.shape}, expected {n} rows", header)
        if arrays["indices"].ndim != 1:
            raise ProtocolError("results buffer 'indices' must be one-dimensional", header)
        preview = arrays.get("preview")  # optional: small uint8 copies of the patterns for the live page
        if preview is not None and (preview.dtype != np.uint8 or preview.ndim != 3 or preview.shape[0] != n
                                    or min(preview.shape[1:]) < 2 or max(preview.shape[1:]) > 128):
            raise ProtocolError(f"results preview must be uint8 (count, h, w) with 2 <= h, w <= 128, got "
                                f"{preview.dtype}{preview.shape}", header)


def plain(value):
    """``value`` (a scan_start's setup or metadata) with every byte string replaced by its size,
    so that it goes into JSON (the live page, the scan's summary): a modality may carry binary
    data in its setup (EBSD: the file's static background) and a peer may send anything."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def without(message: Message, *names: str) -> list:
    """The message encoded again without some of its arrays (the sink journals results
    without their previews, which it keeps in a file of their own)."""
    header = {k: v for k, v in message.header.items() if k not in ("v", "kind", "buffers")}
    arrays = {k: v for k, v in message.arrays.items() if k not in names}
    return encode(message.kind, header, arrays)


def check_frames(message: Message, start: ScanStart) -> None:
    """Check a frames page against the scan it claims to belong to."""
    header = message.header
    patterns = message.arrays["patterns"]
    if patterns.shape[1:] != start.pattern_shape:
        raise ProtocolError(f"patterns are {patterns.shape[1:]} but scan {header['scan']} declared "
                            f"{start.pattern_shape}", header)
    if patterns.dtype.name != start.dtype:
        raise ProtocolError(f"patterns are {patterns.dtype} but the scan declared {start.dtype}", header)
    if header["first"] + header["count"] > start.size:
        raise ProtocolError(f"frame indices run past the scan's {start.size} points", header)


def check_results(message: Message, start: ScanStart) -> None:
    """Check a results page against its scan's declared fields: each present with its dtype and
    per-point shape, method codes among the declared methods, phase ids among the phases."""
    header, arrays = message.header, message.arrays
    n = header["count"]
    for f in start.fields:
        array = arrays.get(f.name)
        if array is None:
            raise ProtocolError(f"results lack the declared field {f.name!r}", header)
        if array.dtype.name != f.dtype or array.shape != (n, *f.shape):
            raise ProtocolError(f"results field {f.name!r} is {array.dtype}{array.shape}, the scan declared "
                                f"{f.dtype}{(n, *f.shape)}", header)
    if n and "method" in arrays and arrays["method"].max() >= len(start.methods):
        raise ProtocolError(f"results carry an unknown method code; the scan's methods are "
                            f"{[m.label for m in start.methods]}", header)
    phase_id = arrays.get("phase_id")
    if n and phase_id is not None and (phase_id.min() < -1 or phase_id.max() >= len(start.phases)):
        raise ProtocolError(f"result phase ids run outside -1..{len(start.phases) - 1} (the scan's phases "
                            f"{[p.name for p in start.phases]})", header)

"""The wire protocol: one msgpack header frame, then zero or more raw buffer frames.

The header always carries the schema version ``v`` and the message ``kind``. Arrays
travel as raw buffers (``numpy.tobytes`` / ``numpy.frombuffer``); their names, dtypes and
shapes are listed in the header under ``buffers``. Nothing is ever pickled.

``decode`` validates everything it can check without knowing the scan: header fields
and types, buffer sizes against dtype and shape, array shapes against each other. The
receiver then checks a message against the scan it belongs to (``check_frames``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import msgpack
import numpy as np

from .errors import ProtocolError

VERSION = 1

# Kinds and the header fields each must carry, with their types.
_INT = (int,)
_NUM = (int, float)
_STR = (str,)
_LIST = (list, tuple)
_DICT = (dict,)
HEADER_FIELDS: dict[str, dict[str, tuple]] = {
    "scan_start": {
        "scan": _STR,
        "nav_shape": _LIST,
        "step": _LIST,
        "pattern_shape": _LIST,
        "dtype": _STR,
        "detector": _DICT,
        "phases": _LIST,
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
REQUIRED_BUFFERS: dict[str, dict[str, tuple[str, ...]]] = {
    "frames": {"patterns": ("uint8", "uint16", "float32")},
    "results": {
        "indices": ("int64",),
        "phase_id": ("int16",),
        "quaternion": ("float32",),
        "confidence": ("float32",),
        "method": ("uint8",),
    },
}
# Every dtype that may appear on the wire; nothing with object semantics.
WIRE_DTYPES = frozenset(
    ["uint8", "uint16", "int16", "int32", "int64", "float32", "float64", "bool"]
)
SCAN_END_STATUSES = ("success", "abort", "fail")
# Method codes used in result pages (the order is the wire code; new ones go at the end):
# the network's answer, template matching's, either refined against the master pattern, none.
METHODS = ("nn", "tm", "tm+refined", "none", "nn+refined")
METHOD_CODE = {name: code for code, name in enumerate(METHODS)}
# Map colours per method (the live page, stream/web/index.html, uses the same).
METHOD_RGB = ((102, 194, 165), (252, 141, 98), (141, 160, 203), (0, 0, 0), (231, 138, 195))


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
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
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
        raise ProtocolError(f"unsupported schema version {header.get('v')!r}; this liveindex speaks v{VERSION}", header)
    kind = header.get("kind")
    if kind not in HEADER_FIELDS:
        raise ProtocolError(f"unknown message kind {kind!r}; expected one of {sorted(HEADER_FIELDS)}", header)
    for name, types in HEADER_FIELDS[kind].items():
        value = header.get(name)
        if not isinstance(value, types) or isinstance(value, bool):
            raise ProtocolError(f"{kind} header field {name!r} is missing or not {types[0].__name__}", header)
    if not isinstance(header.get("buffers", []), list):
        raise ProtocolError("header field 'buffers' must be a list", header)
    header.setdefault("buffers", [])
    if kind == "frames" and header["count"] < 1:
        raise ProtocolError("frames page must hold at least one pattern", header)
    if kind == "frames" and header["first"] < 0:
        raise ProtocolError("frames page has a negative first index", header)
    if kind == "scan_end" and header["status"] not in SCAN_END_STATUSES:
        raise ProtocolError(f"scan_end status must be one of {SCAN_END_STATUSES}", header)
    if kind == "scan_start":
        _check_scan_start(header)


def _check_scan_start(header: dict) -> None:
    nav, pattern = header["nav_shape"], header["pattern_shape"]
    if not (1 <= len(nav) <= 2 and all(isinstance(n, int) and n > 0 for n in nav)):
        raise ProtocolError("scan_start nav_shape must be 1 or 2 positive integers", header)
    if not (len(pattern) == 2 and all(isinstance(n, int) and n > 1 for n in pattern)):
        raise ProtocolError("scan_start pattern_shape must be 2 integers > 1", header)
    if header["dtype"] not in REQUIRED_BUFFERS["frames"]["patterns"]:
        raise ProtocolError(f"scan_start dtype must be one of {REQUIRED_BUFFERS['frames']['patterns']}", header)
    if not header["phases"]:
        raise ProtocolError("scan_start must name at least one expected phase", header)


def _check_spec(spec, header) -> tuple[str, str, list[int]]:
    if not (isinstance(spec, list) and len(spec) == 3):
        raise ProtocolError(f"buffer spec {spec!r} must be [name, dtype, shape]", header)
    name, dtype, shape = spec
    if dtype not in WIRE_DTYPES:
        raise ProtocolError(f"buffer {name!r} has dtype {dtype!r}, not one of {sorted(WIRE_DTYPES)}", header)
    if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)):
        raise ProtocolError(f"buffer {name!r} has an invalid shape {shape!r}", header)
    return name, dtype, shape


def _check_arrays(message: Message) -> None:
    header, arrays = message.header, message.arrays
    for name, dtypes in REQUIRED_BUFFERS.get(message.kind, {}).items():
        if name not in arrays:
            raise ProtocolError(f"{message.kind} message lacks its {name!r} buffer", header)
        if arrays[name].dtype.name not in dtypes:
            raise ProtocolError(f"{message.kind} buffer {name!r} must be {' or '.join(dtypes)}", header)
    if message.kind == "frames":
        patterns = arrays["patterns"]
        if patterns.ndim != 3 or patterns.shape[0] != header["count"]:
            raise ProtocolError(
                f"frames buffer has shape {patterns.shape}, expected (count={header['count']}, H, W)", header
            )
    elif message.kind == "results":
        n = header["count"]
        expected = {"indices": (n,), "phase_id": (n,), "quaternion": (n, 4), "confidence": (n,), "method": (n,)}
        for name, shape in expected.items():
            if arrays[name].shape != shape:
                raise ProtocolError(f"results buffer {name!r} has shape {arrays[name].shape}, expected {shape}", header)
        preview = arrays.get("preview")  # optional: small uint8 copies of the patterns for the live page
        if preview is not None and (preview.dtype != np.uint8 or preview.ndim != 3 or preview.shape[0] != n
                                    or min(preview.shape[1:]) < 2 or max(preview.shape[1:]) > 128):
            raise ProtocolError(f"results preview must be uint8 (count, h, w) with 2 <= h, w <= 128, got "
                                f"{preview.dtype}{preview.shape}", header)
        if n and (arrays["method"].max() >= len(METHODS)):
            raise ProtocolError(f"results carry an unknown method code; known: {METHODS}", header)


def without(message: Message, *names: str) -> list:
    """The message encoded again without some of its arrays (the sink journals results
    without their previews, which it keeps in a file of their own)."""
    header = {k: v for k, v in message.header.items() if k not in ("v", "kind", "buffers")}
    arrays = {k: v for k, v in message.arrays.items() if k not in names}
    return encode(message.kind, header, arrays)


def check_frames(message: Message, scan_start: dict) -> None:
    """Check a frames page against the scan it claims to belong to."""
    header = message.header
    patterns = message.arrays["patterns"]
    total = int(np.prod(scan_start["nav_shape"]))
    if patterns.shape[1:] != tuple(scan_start["pattern_shape"]):
        raise ProtocolError(
            f"patterns are {patterns.shape[1:]} but scan {header['scan']} declared {tuple(scan_start['pattern_shape'])}",
            header,
        )
    if patterns.dtype.name != scan_start["dtype"]:
        raise ProtocolError(f"patterns are {patterns.dtype} but the scan declared {scan_start['dtype']}", header)
    if header["first"] + header["count"] > total:
        raise ProtocolError(f"frame indices run past the scan's {total} points", header)

"""The modality contract: what a kind of diffraction pattern provides to the runtime.

The runtime (``liveindex.stream``) moves frames and results and knows no physics. A
modality (EBSD Kikuchi patterns, TEM spot patterns, ...) is one package under
``liveindex.models`` with one ``Modality`` object that declares:

- ``name`` and the per-point result ``fields`` it produces, as (name, dtype, shape, fill),
  like LiberTEM's UDF result buffers: the runtime allocates one map per field, fills it from
  result pages and writes it;
- its ``methods``: the labels (and map colours) of what answered a point; ``"none"`` is the
  label of a point not indexed, and every modality has it;
- its command-line options (``add_arguments``, ``indexing_options``), its sources for the
  publisher (``open_source``: the simulator and its file readers);
- ``check_setup``: its part of ``scan_start`` (EBSD: PC, tilts, kV), carried opaque by the
  runtime and validated here;
- ``prepare(scan_start, ...) -> PageIndexer``, whose ``index(frames)`` returns the declared
  fields for one page. Preprocessing, matching, refinement and rescue stay inside.

Where the fields include ``phase_id`` and ``quaternion`` the runtime makes orientation maps
of them (IPF colours, disorientation against truth, kernel average misorientation, orix
CrystalMap files, EDAX ``.ang`` and Oxford ``.ctf``); other fields go to the HDF5 ``prop``
and the npz beside it. Two more field names have a meaning to the writers, as ``phase_id``
and ``quaternion`` do (``QUALITY_FIELD``, ``FIT_FIELD``): ``iq``, a per-point pattern
quality (higher is better: the .ang IQ column, the .ctf band contrast, the IQ map), and
``fit``, a per-point misfit of the answer (lower is better, as OIM's fit and AZtec's MAD:
the .ang fit and .ctf MAD columns).

What the vendor files' headers need from the setup (EBSD: the projection centre in the
TSL convention, the working distance, the tilts) comes from one optional hook,
``export_header(setup, pattern_shape)``, which the sink calls through this registry when it
writes a finished scan (``ExportHeader`` lists what it may answer). A sink that cannot load
the modality writes the files without those values and says so in its log.

This module imports numpy only: the runtime loads it everywhere, and a modality's heavy
libraries load inside ``prepare`` and ``open_source``.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from liveindex.models.errors import InputError

from .crystal import PhaseRecord

log = logging.getLogger(__name__)

# Dtypes a frame may have on the wire: 8-32 bit counting detectors and float.
FRAME_DTYPES = ("uint8", "uint16", "uint32", "float32")


def wire_dtype(dtype) -> str:
    """The dtype frames of ``dtype`` travel as: their own where the wire carries it (8-32 bit
    counts, float32), else float32 (float64 and float16 arrays, signed integers from
    background-subtracted or DM files, 64-bit counts); sources convert a page at a time."""
    dtype = np.dtype(dtype)
    return dtype.name if dtype.name in FRAME_DTYPES else "float32"


# Dtypes a result field may have.
FIELD_DTYPES = ("uint8", "uint16", "int16", "int32", "int64", "float16", "float32", "float64")
NOT_INDEXED = "none"  # the method label of a point nobody indexed
ORIENTATION_FIELDS = ("phase_id", "quaternion")
QUALITY_FIELD = "iq"  # per-point pattern quality, higher is better (.ang IQ, .ctf BC, the IQ map)
FIT_FIELD = "fit"  # per-point misfit of the answer, lower is better (.ang fit, .ctf MAD); NaN: none
_FIELD_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
MAX_FIELD_VALUES = 4096  # values per point in one field (an embedding of 4096 is plenty)


@dataclass(frozen=True)
class Field:
    """One per-point result: ``shape`` is per point (() a scalar, (4,) a quaternion);
    ``fill`` what a point holds until its result arrives (a scalar, or one value per element)."""

    name: str
    dtype: str
    shape: tuple[int, ...] = ()
    fill: Any = 0
    description: str = field(default="", compare=False)

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        if isinstance(self.fill, (list, tuple)):
            object.__setattr__(self, "fill", tuple(self.fill))
        if not isinstance(self.name, str) or not _FIELD_NAME.match(self.name) or self.name == "indices":
            raise InputError(f"result field name {self.name!r} must be lower-case letters, digits and _ "
                             "(and not 'indices')")
        if self.dtype not in FIELD_DTYPES:
            raise InputError(f"result field {self.name}: dtype {self.dtype!r} is not one of {FIELD_DTYPES}")
        if len(self.shape) > 2 or any(n < 1 for n in self.shape) or int(np.prod(self.shape)) > MAX_FIELD_VALUES:
            raise InputError(f"result field {self.name}: shape {self.shape} must be (), (n,) or (n, m) with at most "
                             f"{MAX_FIELD_VALUES} values")
        fill = np.asarray(self.fill, dtype=self.dtype)
        if fill.shape not in ((), self.shape):
            raise InputError(f"result field {self.name}: fill {self.fill!r} must be a scalar or of shape {self.shape}")

    def allocate(self, n: int) -> np.ndarray:
        """(n, *shape) array holding the fill value."""
        out = np.empty((n, *self.shape), self.dtype)
        out[...] = np.asarray(self.fill, self.dtype)
        return out

    def to_wire(self) -> list:
        fill = np.asarray(self.fill, self.dtype).tolist()
        return [self.name, self.dtype, list(self.shape), fill]

    @classmethod
    def from_wire(cls, wire) -> "Field":
        if not (isinstance(wire, (list, tuple)) and len(wire) == 4 and isinstance(wire[2], (list, tuple))):
            raise InputError(f"result field {str(wire)[:100]} must be [name, dtype, shape, fill]")
        name, dtype, shape, fill = wire
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in shape):
            raise InputError(f"result field {name!r}: shape {shape!r} must be integers")
        try:
            return cls(name, dtype, tuple(shape), fill)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, InputError):
                raise
            raise InputError(f"result field {name!r} is malformed ({exc})") from None


@dataclass(frozen=True)
class Method:
    """What answered a point: its label (on the wire and in files as its index) and colour."""

    label: str
    rgb: tuple[int, int, int]
    description: str = field(default="", compare=False)

    def to_wire(self) -> list:
        return [self.label, list(self.rgb), self.description]

    @classmethod
    def from_wire(cls, wire) -> "Method":
        if not (isinstance(wire, (list, tuple)) and len(wire) in (2, 3) and isinstance(wire[0], str)
                and 0 < len(wire[0]) <= 32 and isinstance(wire[1], (list, tuple)) and len(wire[1]) == 3
                and all(isinstance(v, int) and 0 <= v <= 255 for v in wire[1])):
            raise InputError(f"method {str(wire)[:100]} must be [label, [r, g, b], description]")
        description = wire[2] if len(wire) == 3 and isinstance(wire[2], str) else ""
        return cls(wire[0], tuple(wire[1]), description[:200])


def fields_from_wire(wire) -> tuple[Field, ...]:
    if not isinstance(wire, (list, tuple)) or not wire:
        raise InputError("a scan must declare at least one result field")
    fields = tuple(Field.from_wire(f) for f in wire)
    names = [f.name for f in fields]
    if len(set(names)) != len(names):
        raise InputError(f"result fields {names} repeat a name")
    return fields


def methods_from_wire(wire) -> tuple[Method, ...]:
    if not isinstance(wire, (list, tuple)) or not 1 <= len(wire) <= 255:
        raise InputError("a scan must declare 1..255 methods")
    methods = tuple(Method.from_wire(m) for m in wire)
    labels = [m.label for m in methods]
    if NOT_INDEXED not in labels or len(set(labels)) != len(labels):
        raise InputError(f"methods {labels} must be distinct and include {NOT_INDEXED!r} (not indexed)")
    return methods


def empty_results(fields, n: int) -> dict[str, np.ndarray]:
    """A page of ``n`` points that nobody indexed: every field at its fill."""
    return {f.name: f.allocate(n) for f in fields}


@dataclass(frozen=True)
class ExportHeader:
    """What a modality tells the file writers about a scan's setup (``Modality.export_header``);
    every value is optional (None: unknown, written as the format's "unknown", 0 in .ang).

    ``pc_tsl``: the projection centre in the EDAX/TSL convention (x*, y*, z*), the .ang header's;
    ``working_distance_mm``, ``energy_kv``, ``sample_tilt_deg``, ``detector_tilt_deg``: the .ang
    and .ctf headers' (TSL WorkingDistance; Oxford KV, TiltAngle, WorkingDistance);
    ``detector``: name -> number, text or list of numbers, stored as the attributes of the HDF5
    file's ``detector`` group (EBSD: PC in every convention, pattern shape, pixel size, binning);
    ``files``: name suffix -> text of extra files written beside the outputs as ``<scan><suffix>``
    (EBSD: ``_detector.txt``, the detector as kikuchipy's ``EBSDDetector.save`` writes it).
    """

    pc_tsl: tuple[float, float, float] | None = None
    working_distance_mm: float | None = None
    energy_kv: float | None = None
    sample_tilt_deg: float | None = None
    detector_tilt_deg: float | None = None
    detector: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.pc_tsl is not None:
            pc = tuple(float(v) for v in self.pc_tsl)
            if len(pc) != 3 or not all(np.isfinite(pc)):
                raise InputError(f"export header pc_tsl {self.pc_tsl!r} must be three finite numbers")
            object.__setattr__(self, "pc_tsl", pc)
        for name in ("working_distance_mm", "energy_kv", "sample_tilt_deg", "detector_tilt_deg"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, (int, float)) or isinstance(value, bool) or not np.isfinite(value):
                    raise InputError(f"export header {name} {value!r} must be a finite number")
                object.__setattr__(self, name, float(value))
        for suffix, text in self.files.items():
            if not (isinstance(suffix, str) and _FILE_SUFFIX.match(suffix) and isinstance(text, str)):
                raise InputError(f"export header file {suffix!r} must be a suffix such as '_detector.txt' with text")

    def summary(self) -> dict:
        """The header as plain JSON values (the scan's summary keeps it)."""
        out = {k: getattr(self, k) for k in ("working_distance_mm", "energy_kv", "sample_tilt_deg",
                                              "detector_tilt_deg") if getattr(self, k) is not None}
        if self.pc_tsl is not None:
            out["pc_tsl"] = list(self.pc_tsl)
        if self.detector:
            out["detector"] = dict(self.detector)
        return out


_FILE_SUFFIX = re.compile(r"^_[a-z0-9_]{1,32}\.[a-z0-9]{1,8}$")


@runtime_checkable
class PageIndexer(Protocol):
    """Indexes the pages of one scan (the modality keeps costly parts, such as a dictionary
    for a geometry, shared between scans). ``index`` takes (B, H, W) raw frames and returns
    every declared field as an array of B rows; frames it cannot read come back not indexed
    (method "none"), never as an exception."""

    model_name: str

    def index(self, frames: np.ndarray) -> dict[str, np.ndarray]: ...


class ScanSource:
    """Frames for the publisher, and what its ``scan_start`` says about them.

    A modality's simulator and file readers return these; the publisher reads pages by index
    range, so a page lost with a worker can be read again.
    """

    modality: "Modality"
    nav_shape: tuple[int, ...]
    step: tuple[float, ...]
    pattern_shape: tuple[int, int]
    dtype: str
    setup: dict
    phases: list[PhaseRecord]
    truth: dict[str, np.ndarray]  # field name -> (N, *shape) ground truth (simulations)
    metadata: dict
    fit_latent: bool = True  # let the modality fit a latent basis on the frames (off: --latent off)

    @property
    def size(self) -> int:
        return int(np.prod(self.nav_shape))

    def read(self, first: int, count: int) -> np.ndarray:
        raise NotImplementedError

    # -- live sources: a file growing during acquisition, a detector stream ----------------------
    # A finished scan has every frame from the start. A live source (``live = True``) has
    # ``arrived`` frames so far (0..size), more as the acquisition goes on, and ends when
    # ``end_reason`` is set: "" when every frame came, else why not (the scan then ends partial).
    live: ClassVar[bool] = False
    end_reason: str | None = None

    def arrived(self, timeout: float) -> int:
        """Frames that can be read now (0..size); a live source waits up to ``timeout`` seconds
        for more before it answers. Frames are read in order, once (a live source may forget
        a frame once it is read: the publisher's page store keeps it)."""
        return self.size

    def frame_times(self, first: int, count: int) -> np.ndarray | None:
        """Wall-clock time (s) each frame was acquired: the detector's timestamp where its stream
        carries one, else when the source saw the frame complete; None when not known."""
        return None

    def close(self) -> None:
        """Let go of the file or the detector connection."""

    def scan_start(self) -> dict:
        """The ``scan_start`` header fields (all but the scan id and run)."""
        modality = self.modality
        return {
            "modality": modality.name,
            "nav_shape": list(self.nav_shape),
            "step": list(self.step),
            "pattern_shape": list(self.pattern_shape),
            "dtype": self.dtype,
            "setup": dict(self.setup),
            "phases": [p.to_wire() for p in self.phases],
            "fields": [f.to_wire() for f in modality.fields],
            "methods": [m.to_wire() for m in modality.methods],
            "metadata": dict(self.metadata),
            **self.latent_header(),
        }

    def latent_header(self) -> dict:
        """``{"latent": basis}`` where the modality fits a latent basis on this scan's frames
        (``Modality.latent_start``), else {}; fitted once per source, so every scan_start of
        it (a publisher's restart, ``liveindex index``'s two) carries the same basis."""
        cached = getattr(self, "_latent_header", None)
        if cached is None:
            if self.fit_latent and self.live:
                # A basis is fitted on frames from the whole scan before the first page goes out;
                # a live source has not acquired them yet (and may forget a frame once read), so
                # it gets one that needs no frames (models/latent/basis.py fixed_basis).
                log.info("latent maps: a live source's embedding is the fixed basis (the lowest spatial "
                         "frequencies of its features), not fitted on its frames")
            cached = self.modality.latent_start(self) if self.fit_latent else {}
            self._latent_header = cached
        return cached

    def truth_arrays(self) -> dict[str, np.ndarray]:
        """Ground truth as ``truth_<field>`` buffers of the sink's scan_start."""
        by_name = {f.name: f for f in self.modality.fields}
        return {f"truth_{name}": np.ascontiguousarray(a, by_name[name].dtype)
                for name, a in (self.truth or {}).items() if name in by_name}


class Modality(ABC):
    """One kind of diffraction pattern. Subclasses set the class attributes and implement
    the methods; one instance per process is enough (it may cache models between scans)."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    fields: ClassVar[tuple[Field, ...]]
    methods: ClassVar[tuple[Method, ...]]

    @property
    def method_codes(self) -> dict[str, int]:
        return {m.label: code for code, m in enumerate(self.methods)}

    # -- command line -----------------------------------------------------------------------
    def add_arguments(self, parser, *, role: str) -> None:
        """Options of this modality for ``role``: "index", "worker", "publish" or "demo"."""

    def indexing_options(self, args) -> dict:
        """Validated options for ``prepare`` from parsed arguments (index, worker, demo)."""
        return {}

    def open_source(self, args, *, role: str) -> ScanSource:
        """The scan to publish or index: ``args.file`` read, else (publish, demo) simulated."""
        raise InputError(f"modality {self.name} has no sources")

    def detector_setup(self, args, pattern_shape) -> tuple[dict, list[PhaseRecord], tuple[float, float]]:
        """(setup, phases, step) of a scan whose frames come from a detector stream
        (``liveindex publish --detector``): the stream carries frames and the scan shape, the
        modality's options (``args``) the rest."""
        raise InputError(f"modality {self.name} does not take frames from a detector stream")

    def python_source(self, patterns, *, setup=None, phases=None, step=None) -> tuple[ScanSource, dict]:
        """The scan behind ``liveindex.index(patterns, ...)`` in Python: an array (numpy, dask)
        or the field library's own object (a kikuchipy signal for EBSD); ``setup`` in the
        modality's terms (EBSD: a kikuchipy EBSDDetector or a dict). Returns the source and
        the indexing options the object itself carries (a static background, say)."""
        raise InputError(f"modality {self.name} has no Python API source; index a file with liveindex index")

    def add_commands(self, subparsers) -> None:
        """Extra ``liveindex`` sub-commands (training, export)."""

    def pattern_from_features(self, features: np.ndarray, feature_shape, pattern_shape) -> np.ndarray | None:
        """Optional: (K, P) latent features (a cluster's mean embedding mapped back through the
        basis) as (K, H, W) frames the page indexer takes, so ``liveindex index`` can say what
        a cluster's mean pattern indexes as; None where the modality cannot."""
        return None

    def latent_start(self, source: "ScanSource") -> dict:
        """Optional: ``{"latent": LatentBasis.to_wire()}`` fitted on the source's frames
        (models/latent/basis.py), which the scan_start carries to every worker, so that the
        ``embedding`` field the modality declares is comparable across workers; {} for none."""
        return {}

    # -- a scan -------------------------------------------------------------------------------
    @abstractmethod
    def check_setup(self, setup: dict, pattern_shape) -> dict:
        """The setup of ``scan_start`` validated and normalised; InputError names what is wrong."""

    def describe_setup(self, setup: dict) -> list[tuple[str, str]]:
        """(label, value) pairs the live page shows for the setup."""
        return [(str(k), str(v)) for k, v in setup.items()]

    def export_header(self, setup: dict, pattern_shape) -> ExportHeader:
        """What the vendor files' headers say about this setup (optional: nothing by default).
        The sink calls it when it writes a finished scan; it must be cheap and import nothing
        heavy (no simulation library), as it runs in the sink's loop."""
        return ExportHeader()

    @abstractmethod
    def prepare(self, scan_start: dict, *, options: dict | None = None, threads: int = 1,
                providers: str = "auto", progress: bool = False, reason: str = "") -> PageIndexer:
        """A PageIndexer for the scan; may take seconds (it may build a dictionary)."""


# Built-in modalities by name, imported only when a scan names one. Tests (and other
# packages) add theirs with ``register`` or LIVEINDEX_MODALITIES="name=module:attribute,...";
# a name a peer sends is only ever looked up here, never imported as a module path.
BUILTIN = {"ebsd": "liveindex.models.ebsd.modality:EBSD", "spots": "liveindex.models.spots.modality:Spots"}
_registered: dict[str, str] = {}
_loaded: dict[str, Modality] = {}


def register(name: str, target: str) -> None:
    """Make ``name`` load ``module:attribute`` (a Modality subclass or instance)."""
    _registered[name] = target
    _loaded.pop(name, None)


def known() -> dict[str, str]:
    table = dict(BUILTIN)
    for entry in filter(None, os.environ.get("LIVEINDEX_MODALITIES", "").split(",")):
        name, _, target = entry.partition("=")
        if target:
            table[name.strip()] = target.strip()
    table.update(_registered)
    return table


def load(name: str) -> Modality:
    """The modality called ``name`` (one instance per process)."""
    if name in _loaded:
        return _loaded[name]
    table = known()
    if not isinstance(name, str) or name not in table:
        raise InputError(f"unknown modality {name!r}; this liveindex has {sorted(table)}")
    module_name, _, attribute = table[name].partition(":")
    target = getattr(importlib.import_module(module_name), attribute)
    modality = target() if isinstance(target, type) else target
    if not isinstance(modality, Modality) or modality.name != name:
        raise InputError(f"{table[name]} is not the Modality {name!r}")
    _loaded[name] = modality
    return modality

"""A tiny modality for the runtime's tests: no kikuchipy, no ONNX model, a real contract.

Its "detector" writes each point's orientation and phase into the first pixels of a 16x16
uint16 frame (the rest is noise), and its indexer reads them back, so every result can be
checked against the truth exactly. Two phases: a cubic one (m-3m) and hexagonal titanium
(6/mmm, D6h), so orientation maps, disorientation and the writers are exercised with each
phase's own symmetry. Fields beyond the orientation ones: ``iq`` (a scalar: the frame's
brightness, the writers' pattern-quality field), ``fit`` (a scalar, the writers' misfit
field: 1 - confidence, NaN where not indexed) and ``embedding`` (a vector, to the npz). Its
``export_header`` answers from the setup (the "gain" sets the working distance), so the
vendor files' headers are exercised without EBSD.

Registered for tests by LIVEINDEX_MODALITIES="fake=tests.fake_modality:FakeModality"
(tests/conftest.py), which child processes inherit.
"""

from __future__ import annotations

import time

import numpy as np

from liveindex.models.arrays import ArraySource
from liveindex.models.crystal import PhaseRecord
from liveindex.models.errors import InputError
from liveindex.models.modality import ExportHeader, Field, Method, Modality, ScanSource

SHAPE = (16, 16)
SCALE = 30000.0  # a quaternion component q is stored as (q + 1) * SCALE
UNREADABLE = 65535  # pixel (0, 5) at this value: a frame the indexer cannot read
EXPORT_PC_TSL = (0.41, 0.72, 0.53)  # what export_header says the fake detector's PC is
PHASES = (
    PhaseRecord("cubic-test", 225, (4.0, 4.0, 4.0, 90.0, 90.0, 90.0), (("Ni", 0.0, 0.0, 0.0, 1.0),), "fake:cubic"),
    PhaseRecord("ti-hcp", 194, (2.95, 2.95, 4.68, 90.0, 90.0, 120.0), (("Ti", 1 / 3, 2 / 3, 0.25, 1.0),), "fake:hcp"),
)
METHODS = (Method("decoded", (60, 160, 60), "read from the frame"), Method("none", (0, 0, 0), "not indexed"))
FIELDS = (
    Field("phase_id", "int16", (), -1),
    Field("quaternion", "float32", (4,), [1.0, 0.0, 0.0, 0.0]),
    Field("confidence", "float32", (), 0.0),
    Field("method", "uint8", (), 1),
    Field("iq", "float32", (), 0.0),
    Field("fit", "float32", (), 0.0),
    Field("embedding", "float32", (3,), 0.0),
)


def encode_frames(quaternions: np.ndarray, phase_ids: np.ndarray, seed: int = 0) -> np.ndarray:
    """(N, 4), (N,) -> (N, 16, 16) uint16 frames carrying them."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 1000, (len(quaternions), *SHAPE)).astype(np.uint16)
    frames[:, 0, :4] = np.round((quaternions + 1) * SCALE).astype(np.uint16)
    frames[:, 0, 4] = np.where(phase_ids > 0, 1000, 0)
    frames[:, 0, 5] = 0
    return frames


class FakeSource(ScanSource):
    """A grainy scan: Voronoi-free stripes of grains, alternating phases, random orientations."""

    def __init__(self, modality, nav_shape=(20, 20), seed: int = 0, gain: float = 1.0):
        rng = np.random.default_rng(seed)
        self.modality = modality
        self.nav_shape = tuple(nav_shape)
        self.step = (1.0, 1.0)
        self.pattern_shape = SHAPE
        self.dtype = "uint16"
        self.setup = {"gain": gain}
        self.phases = list(PHASES)
        n = self.size
        grain = np.arange(n) // 7
        q = rng.standard_normal((grain.max() + 1, 4))
        q *= np.sign(q[:, :1]) / np.linalg.norm(q, axis=1, keepdims=True)
        self.truth = {"quaternion": q[grain].astype(np.float32), "phase_id": (grain % 2).astype(np.int16)}
        self.metadata = {"source": "fake", "seed": seed}
        self.seed = seed

    def read(self, first: int, count: int) -> np.ndarray:
        sl = slice(first, first + count)
        return encode_frames(self.truth["quaternion"][sl], self.truth["phase_id"][sl], seed=(self.seed, first))


class FakeIndexer:
    model_name = "fake decoder"

    def __init__(self, gain: float, frame_seconds: float):
        self.gain = gain
        self.frame_seconds = frame_seconds

    def index(self, frames: np.ndarray) -> dict[str, np.ndarray]:
        if self.frame_seconds:
            time.sleep(self.frame_seconds * len(frames))  # a slow detector computer, for the backlog tests
        frames = np.asarray(frames)
        n = len(frames)
        q = frames[:, 0, :4].astype(np.float64) / SCALE - 1
        q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        readable = frames[:, 0, 5] != UNREADABLE
        return {
            "phase_id": np.where(readable, (frames[:, 0, 4] > 500).astype(np.int16), -1).astype(np.int16),
            "quaternion": q.astype(np.float32),
            "confidence": np.where(readable, 0.9, 0.0).astype(np.float32),
            "method": np.where(readable, 0, 1).astype(np.uint8),
            "iq": (frames.reshape(n, -1).mean(axis=1) * self.gain / 1000).astype(np.float32),
            "fit": np.where(readable, 0.1, np.nan).astype(np.float32),
            # Apart by phase, with noise (the sink's latent maps cluster it).
            "embedding": ((frames[:, 0, 4:5] > 500) * np.float32([3, 0, 0]) + frames[:, 1, :3] / 5000).astype(np.float32),
        }


class FakeModality(Modality):
    name = "fake"
    description = "test modality: orientations encoded in the frames"
    fields = FIELDS
    methods = METHODS

    def add_arguments(self, parser, *, role: str) -> None:
        if role in ("publish", "demo"):
            parser.add_argument("--seed", type=int, default=0)
        if role in ("worker", "index", "demo"):
            parser.add_argument("--frame-seconds", type=float, default=0.0, help="time the indexer takes a frame")

    def indexing_options(self, args) -> dict:
        return {"frame_seconds": getattr(args, "frame_seconds", 0.0)}

    def open_source(self, args, *, role: str):
        if getattr(args, "file", None):
            frames = np.load(args.file, mmap_mode="r")
            return ArraySource(frames, modality=self, setup={"gain": 1.0}, phases=list(PHASES), name=str(args.file))
        nx, ny = (int(v) for v in (getattr(args, "simulate", None) or getattr(args, "scan", "20x20")).split("x"))
        return FakeSource(self, (ny, nx), seed=getattr(args, "seed", 0))

    def check_setup(self, setup: dict, pattern_shape) -> dict:
        gain = setup.get("gain") if isinstance(setup, dict) else None
        if not isinstance(gain, (int, float)) or isinstance(gain, bool) or not gain > 0:
            raise InputError(f"fake setup {setup!r} needs a positive gain")
        if tuple(pattern_shape) != SHAPE:
            raise InputError(f"fake frames are {SHAPE}, not {tuple(pattern_shape)}")
        return {"gain": float(gain)}

    def describe_setup(self, setup: dict) -> list[tuple[str, str]]:
        return [("gain", f"{setup.get('gain')}")]

    def export_header(self, setup: dict, pattern_shape) -> ExportHeader:
        gain = self.check_setup(setup, pattern_shape)["gain"]
        return ExportHeader(pc_tsl=EXPORT_PC_TSL, working_distance_mm=10.0 * gain, energy_kv=15.0,
                            sample_tilt_deg=70.0, detector={"gain": gain, "pc_tsl": list(EXPORT_PC_TSL)},
                            files={"_fake.txt": f"gain {gain}\n"})

    def prepare(self, scan_start: dict, *, options: dict | None = None, threads: int = 1, providers: str = "auto",
                progress: bool = False, reason: str = "") -> FakeIndexer:
        setup = self.check_setup(scan_start["setup"], scan_start["pattern_shape"])
        return FakeIndexer(setup["gain"], (options or {}).get("frame_seconds", 0.0))

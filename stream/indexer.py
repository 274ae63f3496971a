"""Indexers: turn preprocessed patterns into phase, orientation and confidence.

Every indexer shares one interface and declares its capabilities as class attributes, as
kikuchipy's similarity metrics do. Execution providers are chosen when an indexer is
built, never at import time, and the log says which one runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .errors import LiveIndexError
from .protocol import METHOD_CODE

log = logging.getLogger(__name__)


@dataclass
class IndexResult:
    phase_id: np.ndarray  # (B,) int16, -1 = not indexed
    quaternion: np.ndarray  # (B, 4) float32
    confidence: np.ndarray  # (B,) float32 in [0, 1]
    method: np.ndarray  # (B,) uint8 codes of protocol.METHODS
    score: np.ndarray  # (B,) float32 raw similarity of the best match

    @classmethod
    def empty(cls, n: int) -> "IndexResult":
        q = np.zeros((n, 4), np.float32)
        q[:, 0] = 1.0
        return cls(np.full(n, -1, np.int16), q, np.zeros(n, np.float32),
                   np.full(n, METHOD_CODE["none"], np.uint8), np.zeros(n, np.float32))

    def wire_arrays(self, first: int) -> dict[str, np.ndarray]:
        """The buffers of a ``results`` message for points first, first+1, ..."""
        n = len(self.phase_id)
        return {"indices": np.arange(first, first + n, dtype=np.int64), "phase_id": self.phase_id,
                "quaternion": self.quaternion, "confidence": self.confidence, "method": self.method}


CPU_ROWS_PER_RUN = 64


def choose_providers(requested: str = "auto") -> list[str]:
    """ONNX Runtime providers: CUDA where present (unless told 'cpu'), CPU otherwise."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested == "cpu":
        return ["CPUExecutionProvider"]
    if requested == "cuda" and "CUDAExecutionProvider" not in available:
        raise LiveIndexError("--providers cuda asked for, but this onnxruntime has no CUDA provider; install onnxruntime-gpu")
    if requested in ("auto", "cuda") and "CUDAExecutionProvider" in available and _cuda_device_present():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def session_options(threads: int = 0):
    """ONNX Runtime session options shared by every graph a worker runs.

    Spinning is off: each session has its own intra-op thread pool, and a worker alternates
    between four to six sessions (network, matcher, two refinement graphs per phase) many
    times per page; idle pools spinning for the next call took the cores from the one
    running (refinement measured 1.4x slower with spinning on).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def blas_threads(threads: int):
    """A context in which numpy's BLAS (OpenBLAS) runs ``threads`` threads; 0 leaves it as is.

    Indexing runs a page per core with one-thread ONNX sessions; numpy's BLAS calls beside
    them (the 3x3 solves, screening products, preprocessing) would each wake a thread per
    core that spins after its work and takes the core from the other page: two pages at once
    ran 1.45x one page with OpenBLAS on its default threads, 2.0x with one.
    """
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=threads or None, user_api="blas")


def _cuda_device_present() -> bool:
    # onnxruntime-gpu lists CUDA as available even on machines without a GPU; creating a
    # session there logs errors and falls back. Ask the driver instead.
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        count = ctypes.c_int(0)
        return cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
    except OSError:
        return False


class TemplateIndexer:
    """Global template matching: NCC against a simulated dictionary, as one ONNX graph."""

    method = "tm"
    needs_geometry = True  # the dictionary is simulated for one detector geometry
    gives_phase = True
    batch_hint = 256  # pages of this size keep MatMul efficient

    def __init__(self, dictionary, *, providers: str = "auto", threads: int = 0):
        import onnxruntime as ort

        self.dictionary = dictionary
        chosen = choose_providers(providers)
        on_cpu = chosen == ["CPUExecutionProvider"]
        # On the CPU the int8 matcher (4x faster, same ranking); on a GPU the float one.
        path = dictionary.quantized_matcher_path if on_cpu else None
        self.session = ort.InferenceSession(str(path or dictionary.matcher_path), session_options(threads),
                                            providers=chosen)
        self.quantized = path is not None
        # On the CPU, runs of 64 rows: their scores (64 x 30k) stay in cache for the TopK,
        # 1.2x faster a pattern than pages of 256; a GPU takes the page whole.
        self.rows_per_run = CPU_ROWS_PER_RUN if on_cpu else None
        self.provider = self.session.get_providers()[0]
        log.info("template matcher %s: %d templates%s on %s", dictionary.spec.key, dictionary.size,
                 " (int8)" if self.quantized else "", self.provider)

    def warm_up(self, n_pixels: int) -> None:
        """Run one full run's batch so the first real page does not pay for allocation."""
        self.match(np.zeros((self.rows_per_run or self.batch_hint, n_pixels), np.float32))

    def match(self, patterns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, P) preprocessed patterns -> top scores (B, k) and template indices (B, k)."""
        step = self.rows_per_run or len(patterns) or 1
        runs = [self.session.run(None, {"patterns": patterns[i:i + step]})
                for i in range(0, max(len(patterns), 1), step)]  # one run for an empty batch too
        scores, indices = (np.concatenate(parts) for parts in zip(*runs))
        if scores.shape[0] != patterns.shape[0]:
            raise LiveIndexError(f"matcher returned {scores.shape[0]} rows for a batch of {patterns.shape[0]}")
        return scores, indices

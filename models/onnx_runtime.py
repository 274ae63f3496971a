"""ONNX Runtime and BLAS settings shared by every modality's graphs.

Execution providers are chosen when an indexer is built, never at import time, and the
log says which one runs.
"""

from __future__ import annotations

from liveindex.models.errors import LiveIndexError


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
    return _threadpool_controller().limit(limits=threads or None, user_api="blas")


_controller = None
_controller_modules = -1


def _threadpool_controller():
    """One kept threadpoolctl controller: making one inspects every loaded library (5.8 ms a call in
    a process with numpy, scikit-learn, orix and ONNX Runtime loaded, 13% of a spot scan's
    clustering refreshes; benchmarks/sink_latent_cost.py), its ``limit`` 0.05 ms. Made again when
    modules were imported since, which may have loaded another BLAS."""
    global _controller, _controller_modules
    import sys

    from threadpoolctl import ThreadpoolController

    if _controller is None or len(sys.modules) != _controller_modules:
        _controller, _controller_modules = ThreadpoolController(), len(sys.modules)
    return _controller


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

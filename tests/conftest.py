import logging
import os
import subprocess
import sys

import numpy as np
import pytest

# The runtime's tests run on a tiny modality of their own (tests/fake_modality.py); child
# processes (the CLI, the demo's parts) inherit this and load it by name too.
os.environ["LIVEINDEX_MODALITIES"] = "fake=tests.fake_modality:FakeModality"

from liveindex.models.ebsd.master_patterns import disorientation_degrees as disorientation  # noqa: E402,F401
from liveindex.stream.processes import setup_logging  # noqa: E402
from liveindex.stream.protocol import encode  # noqa: E402

from .fake_modality import FakeModality, FakeSource  # noqa: E402

setup_logging(logging.INFO)
FAKE = ("--modality", "fake")


def scan_start_message(scan, nav_shape, *, run=None, truth=False, seed=0):
    """A scan_start of the fake modality as a publisher sends it, for tests that talk to a sink
    directly (with ``truth``: its ground truth, as a simulator sends it)."""
    source = FakeSource(FakeModality(), nav_shape, seed=seed)
    header = {"scan": scan, **source.scan_start()}
    if run is not None:
        header["run"] = run
    return encode("scan_start", header, source.truth_arrays() if truth else None)


def results_message(indices, scan, *, quaternion=None, phase_id=0, confidence=0.7, first=None, method=0, run=None):
    """A results page of the fake modality as a worker sends it, for the given points."""
    indices = np.asarray(indices, np.int64)
    n = len(indices)
    if quaternion is None:
        quaternion = np.tile(np.float32([1, 0, 0, 0]), (n, 1))
    if first is None:
        first = int(indices[0]) if n else 0
    return encode("results", {"scan": scan, "first": first, "count": n, "worker": "w", "timings": {},
                              **({"run": run} if run is not None else {})},
                  {"indices": indices, "phase_id": np.full(n, phase_id, np.int16),
                   "quaternion": np.asarray(quaternion, np.float32), "confidence": np.full(n, confidence, np.float32),
                   "method": np.full(n, method, np.uint8), "iq": np.full(n, 0.5, np.float32),
                   "fit": np.full(n, 0.1, np.float32),
                   "embedding": np.zeros((n, 3), np.float32)})


def start_cli(*args, **popen_options):
    """Start the real command as a process of its own (a sink, a worker, ...)."""
    return subprocess.Popen([sys.executable, "-m", "liveindex.stream", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen_options)


def run_cli(*args, timeout=300):
    """Run the real command in a fresh process; returns CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "liveindex.stream", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def error_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("liveindex: error:")]


@pytest.fixture(scope="session")
def moderate_scan():
    from liveindex.models.ebsd.simulator import SimulatedScan

    return SimulatedScan((20, 20), noise="moderate", seed=3)


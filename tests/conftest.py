import logging
import subprocess
import sys

import numpy as np
import pytest

from liveindex.models.ebsd.master_patterns import disorientation_degrees as disorientation  # noqa: F401 (tests import it from here)
from liveindex.stream.processes import setup_logging
from liveindex.stream.protocol import METHOD_CODE, encode

setup_logging(logging.INFO)


def scan_start_message(scan, nav_shape, *, pattern_shape=(60, 60), run=None):
    """A scan_start as a publisher sends it, for tests that talk to a sink directly."""
    header = {"scan": scan, "nav_shape": list(nav_shape), "step": [1.0, 1.0], "pattern_shape": list(pattern_shape),
              "dtype": "uint8", "detector": {"pc": [0.4, 0.2, 0.5]}, "phases": ["ni"], "metadata": {}}
    if run is not None:
        header["run"] = run
    return encode("scan_start", header)


def results_message(indices, scan, *, quaternion=None, phase_id=0, confidence=0.7, first=None):
    """A results page as a worker sends it (template matching), for the given points."""
    indices = np.asarray(indices, np.int64)
    n = len(indices)
    if quaternion is None:
        quaternion = np.tile(np.float32([1, 0, 0, 0]), (n, 1))
    if first is None:
        first = int(indices[0]) if n else 0
    return encode("results", {"scan": scan, "first": first, "count": n, "worker": "w", "timings": {}},
                  {"indices": indices, "phase_id": np.full(n, phase_id, np.int16),
                   "quaternion": np.asarray(quaternion, np.float32), "confidence": np.full(n, confidence, np.float32),
                   "method": np.full(n, METHOD_CODE["tm"], np.uint8)})


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


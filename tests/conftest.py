import logging
import subprocess
import sys

import numpy as np
import pytest

from liveindex.models.phases import disorientation_degrees as disorientation  # noqa: F401 (tests import it from here)
from liveindex.stream.processes import setup_logging

setup_logging(logging.INFO)


def run_cli(*args, timeout=300):
    """Run the real command in a fresh process; returns CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "liveindex.stream", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def error_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("liveindex: error:")]


@pytest.fixture(scope="session")
def moderate_scan():
    from liveindex.stream.simulator import SimulatedScan

    return SimulatedScan((20, 20), noise="moderate", seed=3)


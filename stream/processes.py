"""Run pipeline parts as child processes that report readiness and keep their error.

The parent learns each child's bound endpoints from a queue (children bind port 0), so
nothing waits on sleep(); ``maybe_raise`` surfaces a child's failure in the parent.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import time

from liveindex.models.errors import LiveIndexError, TransportError

log = logging.getLogger(__name__)
_CTX = mp.get_context("spawn")  # no forked copies of zmq contexts or ORT sessions


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(processName)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
    for noisy in ("hyperspy", "kikuchipy", "orix", "numba", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore", module="hyperspy")
    warnings.filterwarnings("ignore", module="kikuchipy")
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def _child(target, kwargs, reports, stop, level):
    setup_logging(level)
    try:
        target(report=lambda **info: reports.put(("ready", info)), stop_event=stop, **kwargs)
        reports.put(("done", None))
    except LiveIndexError as exc:
        reports.put(("error", f"{type(exc).__name__}: {exc}"))
    except KeyboardInterrupt:
        reports.put(("done", None))
    except Exception as exc:  # keep the error for the parent
        logging.getLogger(__name__).exception("child failed")
        reports.put(("error", f"{type(exc).__name__}: {exc}"))


class ChildProcess:
    def __init__(self, label: str, target, **kwargs):
        self.name = label
        self.reports = _CTX.Queue()
        self.stop = _CTX.Event()
        self.info: dict | None = None
        self.error: str | None = None
        self.done = False
        self.process = _CTX.Process(target=_child, name=label, daemon=True,
                                    args=(target, kwargs, self.reports, self.stop, logging.getLogger().level))

    def start(self) -> "ChildProcess":
        self.process.start()
        return self

    def _poll(self, timeout: float = 0.0) -> None:
        """Take every report waiting (the first may be waited for up to ``timeout``)."""
        while True:
            try:
                kind, info = self.reports.get(timeout=timeout) if timeout else self.reports.get_nowait()
            except queue.Empty:
                return
            timeout = 0.0
            if kind == "ready":
                self.info = info
            elif kind == "error":
                self.error = info
            else:
                self.done = True

    def wait_ready(self, timeout: float = 120.0) -> dict:
        """Wait for the child's first report (it is listening); returns what it reported."""
        return self.wait_for(lambda info: True, timeout)

    def wait_for(self, predicate, timeout: float = 120.0) -> dict:
        """Wait until the child's latest report satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        while True:
            self.maybe_raise()  # takes every report waiting
            if self.info is not None and predicate(self.info):
                return self.info
            if not self.process.is_alive() and self.reports.empty():
                raise LiveIndexError(f"{self.name} exited (code {self.process.exitcode}) before reporting")
            if time.monotonic() > deadline:
                raise TransportError(f"{self.name} did not report in {timeout:.0f} s")
            self._poll(0.2)

    def maybe_raise(self) -> None:
        self._poll()
        if self.error:
            raise LiveIndexError(f"{self.name} failed: {self.error}")

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the child to finish; True if it did."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.process.is_alive():
            self.maybe_raise()
            if deadline is not None and time.monotonic() > deadline:
                return False
            self.process.join(0.2)
        self._poll()
        self.maybe_raise()
        return True

    def terminate(self, timeout: float = 10.0) -> None:
        self.stop.set()
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()

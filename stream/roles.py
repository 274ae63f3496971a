"""Entry points of the long-running parts, shaped for ChildProcess and the CLI alike:
each takes ``report`` (called once when listening) and ``stop_event``."""

from __future__ import annotations

from prometheus_client import start_http_server

from .metrics import WorkerMetrics
from .sink import Sink
from .worker import Worker


def run_sink(*, report, stop_event, **options) -> list[dict]:
    sink = Sink(stop_event=stop_event, **options)
    where = {"endpoint": sink.endpoint, "url": sink.http.url if sink.http else None}
    sink.on_finished = lambda finished: report(**where, finished=finished)
    report(**where, finished=[])
    try:
        return sink.run()
    finally:
        sink.close()


def run_worker(*, report, stop_event, metrics_port: int | None = None, metrics_host: str = "127.0.0.1",
               **options) -> None:
    metrics = WorkerMetrics()
    if metrics_port is not None:
        start_http_server(metrics_port, addr=metrics_host, registry=metrics.registry)
    worker = Worker(stop_event=stop_event, metrics=metrics, **options)
    report(name=worker.name)
    worker.run()

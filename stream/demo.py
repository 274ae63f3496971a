"""``liveindex demo``: publisher, workers and sink on this machine, one simulated scan."""

from __future__ import annotations

import argparse
import logging
import threading
import webbrowser

from liveindex.models import modality as modalities
from liveindex.models.modality import ScanSource

from .processes import ChildProcess
from .publisher import Publisher
from .roles import run_sink, run_worker

log = logging.getLogger(__name__)


def run_demo(*, source: ScanSource | None = None, modality: str = "ebsd", scan: str = "40x40",
             settings: dict | None = None, workers: int = 2, out_dir="liveindex-demo", http_port: int = 8080, open_browser: bool = True,
             page_size: int = 64, rate: float | None = None, options: dict | None = None,
             threads_per_worker: int = 1, stop_event: threading.Event | None = None, on_ready=None, on_done=None,
             linger: threading.Event | None = None, clusters: int | None = None) -> dict:
    """Index ``source`` (default: the ``modality``'s simulated scan of ``scan`` points, width x
    height, with its demo options as on the command line, ``settings`` overriding them) with
    ``workers`` worker processes. ``options`` go to the modality's ``prepare``.
    ``on_ready(url)`` is called once every part is up, before the scan starts, and
    ``on_done(summary)`` once the scan is written. With ``linger``, the sink keeps serving
    the finished scan's page until that event is set."""
    if source is None:
        source = simulated_source(modality, scan, settings or {})
    modality = source.modality
    options = options or {}
    source.fit_latent = options.get("latent", True)
    # Prepare the scan's indexer here once (it builds or finds the dictionary, code book...),
    # with a progress bar the user sees, rather than in every worker at once.
    modality.prepare({"scan": "demo", **source.scan_start()}, options=options, threads=threads_per_worker,
                     progress=True, reason="first run of the demo's setup")

    sink = ChildProcess("sink", run_sink, bind="tcp://127.0.0.1:0", out_dir=str(out_dir), http_port=http_port,
                        max_scans=None if linger is not None else 1, clusters=clusters).start()
    children = [sink]
    publisher = None
    try:
        sink_info = sink.wait_ready()
        publisher = Publisher(bind="tcp://127.0.0.1:0", sink=sink_info["endpoint"], page_size=page_size, rate=rate,
                              stop_event=stop_event)
        for i in range(workers):
            children.append(ChildProcess(f"worker-{i}", run_worker, dispatcher=publisher.endpoint,
                                         sink=sink_info["endpoint"], name=f"demo-worker-{i}",
                                         options={modality.name: options}, threads=threads_per_worker).start())
        for child in children[1:]:
            child.wait_ready()
        if sink_info.get("url"):
            log.info("live display: %s", sink_info["url"])
            if open_browser:
                webbrowser.open(sink_info["url"])
        if on_ready is not None:
            on_ready(sink_info.get("url"))
        report = publisher.run(source)
        finished = sink.wait_for(lambda info: bool(info.get("finished")), timeout=600)["finished"]
        summary = {**finished[0], "workers": workers, "publish_seconds": round(report.seconds, 3),
                   "out_dir": str(out_dir), "url": sink_info.get("url")}
        if on_done is not None:
            on_done(summary)
        if linger is not None:
            for child in children[1:]:
                child.terminate()
            while not linger.wait(0.5):
                sink.maybe_raise()
        return summary
    finally:
        if publisher is not None:
            publisher.close()
        for child in children:
            child.terminate()


def simulated_source(modality: str, scan: str, settings: dict) -> ScanSource:
    """The modality's simulator with its demo defaults (as the command line has them)."""
    chosen = modalities.load(modality)
    parser = argparse.ArgumentParser()
    chosen.add_arguments(parser, role="demo")
    args = parser.parse_args([])
    vars(args).update(scan=scan, file=None, **settings)
    log.info("simulating a %s %s scan (%s)", scan, modality, ", ".join(f"{k} {v}" for k, v in settings.items()))
    return chosen.open_source(args, role="demo")

"""End-to-end frames/s through the ZeroMQ pipeline vs the bare indexer on the same data.

    python benchmarks/pipeline_throughput.py [--scan 100x100] [--workers 2] [--threads 1] [--noise moderate]
                                             [--latent on|off|both]

Both runs index the same pre-rendered frames (the simulator's cost is kept out of both),
and both use the machine's cores: the bare indexer as `liveindex index` runs (index_source: a
page per core, one-thread sessions), the pipeline with one single-threaded worker process per core, plus the publisher and
the sink on the same cores. The pipeline's cost is 1 - pipeline/bare. A loose
correctness check (median error) stands beside each timing. ``--latent both`` runs the
pipeline with the latent maps (the scan's basis fitted before the clock starts, an embedding
from each worker, the sink's cluster maps and its cluster-mean indexer) and without them,
interleaved: issue 16's "embedding and clustering cost at most 15% of the indexing rate".
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile

import numpy as np

from liveindex.models.ebsd.files import array_source


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scan", default="100x100")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="inference threads per worker")
    parser.add_argument("--page-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--noise", default="moderate", help="clean, moderate or hard (the simulator's levels)")
    parser.add_argument("--latent", choices=("on", "off", "both"), default="on",
                        help="the latent maps in the pipeline runs (both: each repeat with and without)")
    args = parser.parse_args()

    from liveindex.models.ebsd.geometry import DetectorGeometry
    from liveindex.models.ebsd.master_patterns import disorientation_degrees
    from liveindex.models.ebsd.simulator import SimulatedScan, parse_nav_shape
    from liveindex.stream.offline import index_source
    from liveindex.stream.processes import setup_logging
    setup_logging(logging.WARNING)
    scan = SimulatedScan(parse_nav_shape(args.scan), noise=args.noise, seed=7)
    frames = scan.render(0, scan.size)
    source = array_source(frames, geometry=DetectorGeometry(), name="benchmark")
    source.truth = {"quaternion": scan.truth, "phase_id": scan.truth_phase.astype(np.int16)}  # the sink scores it live
    n = scan.size
    print(f"{n} frames of 60x60 uint8, {args.noise} noise, {os.cpu_count()} cores, page size {args.page_size}")

    # Bare indexer: `liveindex index`'s code path (the workers' ScanIndexer, a page per core).
    bare_times = []
    for _ in range(args.repeats):
        result, seconds = index_source(source, progress=False)
        bare_times.append(seconds)
    bare = n / min(bare_times)
    bare_error = float(np.median(disorientation_degrees(result["quaternion"], scan.truth)))

    # Pipeline: publisher -> N workers -> sink, real processes on loopback. Workers are
    # started and warmed before the clock starts; the clock runs from the first page
    # sent to the last result written into the sink's map.
    choices = [True, False] if args.latent == "both" else [args.latent == "on"]
    best, pipe_error, fitted = {c: 0.0 for c in choices}, {}, {}
    with tempfile.TemporaryDirectory() as out:
        for repeat in range(args.repeats):
            for latent in choices:
                # A source fits its basis once and keeps it (ScanSource.latent_header): one per choice.
                source.fit_latent, source._latent_header = latent, fitted.get(latent)
                source.scan_start()  # the latent basis is fitted before the clock starts
                fitted[latent] = source._latent_header
                run_dir = os.path.join(out, f"run-{repeat}-{int(latent)}")  # the sink refuses a scan id it has
                rate, pipe_error[latent] = _pipeline_run(args, source, run_dir, f"bench-{repeat}-{int(latent)}")
                best[latent] = max(best[latent], rate)
    print(f"bare indexer     : {bare:8.0f} frames/s   median error {bare_error:.2f} deg")
    for latent in choices:
        rate = best[latent]
        print(f"zmq pipeline     : {rate:8.0f} frames/s   median error {pipe_error[latent]:.2f} deg  "
              f"({args.workers} worker(s) x {args.threads} thread(s), latent maps {'on' if latent else 'off'})")
        print(f"pipeline / bare  : {rate / bare:8.3f}   (pipeline cost {100 * (1 - rate / bare):.1f}% of the indexer's "
              "throughput)")
    if len(choices) == 2:
        print(f"latent on / off  : {best[True] / best[False]:8.3f}   (the latent maps cost "
              f"{100 * (1 - best[True] / best[False]):.1f}% of the pipeline's rate; <= 15% asked)")
    return 0


def _pipeline_run(args, source, out: str, scan_id: str) -> tuple[float, float]:
    """One pipeline run: frames/s from the first page sent to the last result in the sink's
    map, and the sink's median error."""
    from liveindex.stream.processes import ChildProcess
    from liveindex.stream.publisher import Publisher
    from liveindex.stream.roles import run_sink, run_worker

    n = source.size
    sink = ChildProcess("sink", run_sink, bind="tcp://127.0.0.1:0", out_dir=out, http_port=None,
                        max_scans=2).start()
    endpoint = sink.wait_ready()["endpoint"]
    publisher = Publisher(sink=endpoint, page_size=args.page_size)
    workers = [ChildProcess(f"worker-{i}", run_worker, dispatcher=publisher.endpoint, sink=endpoint,
                            threads=args.threads) for i in range(args.workers)]
    for w in workers:
        w.start()
    for w in workers:
        w.wait_ready()
    _warm(publisher, source)
    # The sink writes the warm-up scan's files before the clock starts.
    sink.wait_for(lambda info: len(info["finished"]) == 1)
    report = publisher.run(source, scan_id=scan_id)
    sink.wait()
    summary = sink.info["finished"][-1]
    publisher.close()
    for w in workers:
        w.terminate()
    assert summary["missing"] == 0, summary
    return n / (summary["last_result_time"] - report.t_first_sent), summary["median_error_deg"]


def _warm(publisher, source) -> None:
    """Index a small scan first so each worker has its session loaded and warm."""
    warm = array_source(source.read(0, 256), geometry=source.geometry, name="warm")
    warm.fit_latent = source.fit_latent
    publisher.run(warm, scan_id="warm-up")


if __name__ == "__main__":
    sys.exit(main())

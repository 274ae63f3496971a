"""End-to-end frames/s through the ZeroMQ pipeline vs the bare indexer on the same data.

    python benchmarks/pipeline_throughput.py [--scan 100x100] [--workers 2] [--threads 1] [--noise moderate]

Both runs index the same pre-rendered frames (the simulator's cost is kept out of both),
and both use the machine's cores: the bare indexer as `liveindex index` runs (index_source: a
page per core, one-thread sessions), the pipeline with one single-threaded worker process per core, plus the publisher and
the sink on the same cores. The pipeline's cost is 1 - pipeline/bare. A loose
correctness check (median error) stands beside each timing.
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
    args = parser.parse_args()

    from liveindex.models.ebsd.geometry import DetectorGeometry
    from liveindex.models.ebsd.master_patterns import disorientation_degrees
    from liveindex.models.ebsd.simulator import SimulatedScan, parse_nav_shape
    from liveindex.stream.offline import index_source
    from liveindex.stream.processes import ChildProcess, setup_logging
    from liveindex.stream.publisher import Publisher
    from liveindex.stream.roles import run_sink, run_worker
    setup_logging(logging.WARNING)
    scan = SimulatedScan(parse_nav_shape(args.scan), noise=args.noise, seed=7)
    frames = scan.render(0, scan.size)
    source = array_source(frames, geometry=DetectorGeometry(), name="benchmark")
    source.truth = scan.truth  # so the sink scores the pipeline live
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
    best, pipe_error = None, None
    with tempfile.TemporaryDirectory() as out:
        for repeat in range(args.repeats):
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
            report = publisher.run(source, scan_id=f"bench-{repeat}")
            sink.wait()
            summary = sink.info["finished"][-1]
            publisher.close()
            for w in workers:
                w.terminate()
            assert summary["missing"] == 0, summary
            rate = n / (summary["last_result_time"] - report.t_first_sent)
            best = max(best or 0.0, rate)
            pipe_error = summary["median_error_deg"]
    cost = 1.0 - best / bare
    print(f"bare indexer     : {bare:8.0f} frames/s   median error {bare_error:.2f} deg")
    print(f"zmq pipeline     : {best:8.0f} frames/s   median error {pipe_error:.2f} deg  ({args.workers} worker(s) x {args.threads} thread(s))")
    print(f"pipeline / bare  : {best / bare:8.3f}   (pipeline cost {100 * cost:.1f}% of the indexer's throughput)")
    return 0


def _warm(publisher, source) -> None:
    """Index a small scan first so each worker has its session loaded and warm."""
    warm = array_source(source.read(0, 256), geometry=source.geometry, name="warm")
    publisher.run(warm, scan_id="warm-up")


if __name__ == "__main__":
    sys.exit(main())

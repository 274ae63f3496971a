"""End-to-end frames/s through the ZeroMQ pipeline vs the bare indexer on the same data.

    python benchmarks/pipeline_throughput.py [--modality ebsd|spots] [--scan 100x100] [--workers 2] [--threads 1]
                                             [--noise moderate] [--latent on|off|both]

``--modality spots``: the simulated precession scan (ferrite, austenite, cementite, 128x128
uint16 frames, 0.03/A per pixel, 1 deg precession; default scan 40x40), the bare indexer as
``liveindex index --modality spots`` runs; its median error is modulo the 180-degree turn
about the beam, the sink's is not (a loose check either way).

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
    parser.add_argument("--modality", choices=("ebsd", "spots"), default="ebsd")
    parser.add_argument("--scan", default=None, help="WxH (default 100x100 for EBSD, 40x40 for spots)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="inference threads per worker")
    parser.add_argument("--page-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--noise", default="moderate", help="clean, moderate or hard (the simulator's levels)")
    parser.add_argument("--latent", choices=("on", "off", "both"), default="on",
                        help="the latent maps in the pipeline runs (both: each repeat with and without)")
    args = parser.parse_args()

    from liveindex.stream.offline import index_source
    from liveindex.stream.processes import setup_logging
    setup_logging(logging.WARNING)
    source, bare_error_of = (_spots_source if args.modality == "spots" else _ebsd_source)(args)
    n = source.size
    frame = "x".join(str(v) for v in source.pattern_shape)
    print(f"{args.modality}: {n} frames of {frame} {source.dtype}, {args.noise} noise, {os.cpu_count()} cores, "
          f"page size {args.page_size}; load average {_load()}")

    # Bare indexer: `liveindex index`'s code path (the workers' page indexer), as many pages at
    # once as the pipeline has workers, each on one-thread sessions, with the latent maps on
    # unless --latent off. Pipeline: publisher -> N workers -> sink, real processes on loopback;
    # workers are started and warmed before the clock starts, which runs from the first page
    # sent to the last result written into the sink's map. Each repeat runs the bare indexer and
    # then the pipeline back to back (the cores are shared: the load moves between repeats).
    choices = [True, False] if args.latent == "both" else [args.latent == "on"]
    bare_latent = args.latent != "off"
    bare_rates, rates, pipe_error, fitted = [], {c: [] for c in choices}, {}, {}
    # The basis fitted and the indexer prepared before any clock or CPU count (a modality that
    # keeps its indexers, as spots does, hands index_source this one).
    source.fit_latent, source._latent_header = bare_latent, None
    source.modality.prepare({"scan": "offline", **source.scan_start()}, options={}, threads=1, providers="auto")
    fitted[bare_latent] = source._latent_header
    with tempfile.TemporaryDirectory() as out:
        for repeat in range(args.repeats):
            # A source fits its basis once and keeps it (ScanSource.latent_header): one per choice,
            # fitted before the clock starts.
            source.fit_latent, source._latent_header = bare_latent, fitted.get(bare_latent)
            cpu_before = _own_cpu_seconds()
            result, seconds = index_source(source, threads=args.workers, progress=False)
            bare_cpu = _own_cpu_seconds() - cpu_before
            fitted[bare_latent] = source._latent_header
            bare_rates.append(n / seconds)
            bare_error = bare_error_of(result)
            print(f"  repeat {repeat}: bare {n / seconds:.1f} frames/s, CPU s per 1000 frames {bare_cpu * 1000 / n:.2f} "
                  f"(load average {_load()})", flush=True)
            for latent in choices:
                source.fit_latent, source._latent_header = latent, fitted.get(latent)
                source.scan_start()
                fitted[latent] = source._latent_header
                run_dir = os.path.join(out, f"run-{repeat}-{int(latent)}")  # the sink refuses a scan id it has
                rate, pipe_error[latent] = _pipeline_run(args, source, run_dir, f"bench-{repeat}-{int(latent)}")
                rates[latent].append(rate)
                print(f"  repeat {repeat}: pipeline {rate:.1f} frames/s, latent {'on' if latent else 'off'}, "
                      f"{rate / bare_rates[-1]:.3f} of the bare run before it (load average {_load()})", flush=True)
    bare = max(bare_rates)
    print(f"bare indexer     : {bare:8.1f} frames/s   median error {bare_error:.2f} deg  (best of "
          f"{', '.join(f'{r:.1f}' for r in bare_rates)}; {args.workers} page(s) at once x 1 thread)")
    for latent in choices:
        rate = max(rates[latent])
        print(f"zmq pipeline     : {rate:8.1f} frames/s   median error {pipe_error[latent]:.2f} deg  (best of "
              f"{', '.join(f'{r:.1f}' for r in rates[latent])}; {args.workers} worker(s) x {args.threads} thread(s), "
              f"latent maps {'on' if latent else 'off'})")
        print(f"pipeline / bare  : {rate / bare:8.3f}   (pipeline cost {100 * (1 - rate / bare):.1f}% of the indexer's "
              "throughput, best against best)")
    if len(choices) == 2:
        on, off = max(rates[True]), max(rates[False])
        print(f"latent on / off  : {on / off:8.3f}   (the latent maps cost {100 * (1 - on / off):.1f}% of the "
              "pipeline's rate; <= 15% asked)")
    return 0


def _load() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3]) if os.path.exists("/proc/loadavg") else "?"


def _ebsd_source(args):
    from liveindex.models.ebsd.geometry import DetectorGeometry
    from liveindex.models.ebsd.master_patterns import disorientation_degrees
    from liveindex.models.ebsd.simulator import SimulatedScan, parse_nav_shape

    scan = SimulatedScan(parse_nav_shape(args.scan or "100x100"), noise=args.noise, seed=7)
    source = array_source(scan.render(0, scan.size), geometry=DetectorGeometry(), name="benchmark")
    source.truth = {"quaternion": scan.truth, "phase_id": scan.truth_phase.astype(np.int16)}  # the sink scores it live
    return source, lambda result: float(np.median(disorientation_degrees(result["quaternion"], scan.truth)))


def _spots_source(args):
    from liveindex.models import modality as modalities
    from liveindex.models.arrays import ArraySource
    from liveindex.models.ebsd.simulator import parse_nav_shape
    from liveindex.models.spots.evaluate import score_answers
    from liveindex.models.spots.phases import phases_from_spec
    from liveindex.models.spots.setup import check_setup
    from liveindex.models.spots.simulator import SimulatedSpotScan

    phases = phases_from_spec("ferrite,austenite,cementite")
    setup = check_setup({"kv": 200.0, "calibration": 0.03, "precession": 1.0}, (128, 128))
    nav = parse_nav_shape(args.scan or "40x40")
    scan = SimulatedSpotScan(nav, phases, setup, noise=args.noise, seed=7)
    frames = scan.render(0, scan.size).reshape(*nav, 128, 128)
    source = ArraySource(frames, modality=modalities.load("spots"), setup=setup, phases=phases, name="benchmark")
    source.truth = {"quaternion": scan.truth_q, "phase_id": scan.truth_phase}  # the sink scores it live
    crystal = scan.truth_phase >= 0

    def error(result) -> float:
        found = {k: v[crystal] for k, v in result.items()}
        return score_answers(found, scan.truth_q[crystal], scan.truth_phase[crystal], phases)["median_mod180_deg"]

    return source, error


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
    roles = {"sink": [sink], "workers": workers}
    cpu_before = {role: sum(_cpu_seconds(c.process.pid) for c in children) for role, children in roles.items()}
    publisher_before = _own_cpu_seconds()
    report = publisher.run(source, scan_id=scan_id)
    publisher_cpu = _own_cpu_seconds() - publisher_before
    # Read before the sink exits (the report comes once its files are written: their cost counts).
    sink.wait_for(lambda info: len(info["finished"]) == 2)
    cpu = {role: sum(_cpu_seconds(c.process.pid) for c in children) - cpu_before[role]
           for role, children in roles.items()}
    sink.wait()
    summary = sink.info["finished"][-1]
    publisher.close()
    for w in workers:
        w.terminate()
    assert summary["missing"] == 0, summary
    per_k = 1000.0 / n
    print(f"    CPU s per 1000 frames: workers {cpu['workers'] * per_k:.2f}, sink {cpu['sink'] * per_k:.2f}, "
          f"publisher (this process) {publisher_cpu * per_k:.2f}", flush=True)
    return n / (summary["last_result_time"] - report.t_first_sent), summary["median_error_deg"]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (Linux /proc; 0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def _warm(publisher, source) -> None:
    """Index a small scan first so each worker has its session loaded and warm."""
    from liveindex.models.arrays import ArraySource

    warm = ArraySource(source.read(0, 256), modality=source.modality, setup=source.setup, phases=source.phases,
                       name="warm")
    if hasattr(source, "geometry"):  # EBSD's array_source keeps its DetectorGeometry beside the setup
        warm.geometry = source.geometry
    warm.fit_latent = source.fit_latent
    publisher.run(warm, scan_id="warm-up")


if __name__ == "__main__":
    sys.exit(main())

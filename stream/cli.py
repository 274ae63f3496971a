"""The ``liveindex`` command: demo, index, publish, worker, sink, keys, models."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from liveindex.models.errors import LiveIndexError

log = logging.getLogger("liveindex")

DEFAULT_DISPATCHER = "tcp://127.0.0.1:5555"
DEFAULT_SINK = "tcp://127.0.0.1:5556"


DEFAULT_MODALITY = "ebsd"
PARTIAL_EXIT = 3  # a scan that ended with points missing (unless --allow-partial)
ROLES = ("demo", "index", "publish", "worker")  # the commands that take a modality's options


def _chosen_modality(argv) -> str:
    """``--modality NAME`` from the command line (before parsing: its options depend on it)."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--modality" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--modality="):
            return arg.split("=", 1)[1]
    return DEFAULT_MODALITY


def _modality(args):
    from liveindex.models import modality as modalities

    return modalities.load(args.modality)


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def cmd_demo(args) -> int:
    from .demo import run_demo

    def report(summary):
        err = summary.get("median_error_deg")
        print(f"liveindex demo: {summary['points']} frames, {summary['workers']} workers, "
              f"{summary['frames_per_second']:.0f} frames/s, median error "
              f"{'n/a' if err is None else f'{err:.2f} deg'}, missing {summary['missing']}, "
              f"outputs in {summary['out_dir']}", flush=True)
        if not args.exit_when_done and summary.get("url"):
            print(f"liveindex demo: the finished scan stays on {summary['url']}; press Ctrl-C to stop", flush=True)

    modality = _modality(args)
    args.scan = args.scan or "40x40"
    stop = _stop_on_signals()
    summary = run_demo(source=modality.open_source(args, role="demo"), workers=args.workers, out_dir=args.out,
                       http_port=args.http_port, open_browser=not args.no_browser, page_size=args.page_size,
                       rate=args.rate, options=modality.indexing_options(args), stop_event=stop, on_done=report,
                       linger=None if args.exit_when_done else stop, clusters=parse_clusters(args.clusters))
    return 0 if summary["missing"] == 0 else 1


def cmd_index(args) -> int:
    from .offline import index_file
    from .scan_state import missing_phase_warning

    modality = _modality(args)
    source = modality.open_source(args, role="index")
    options = modality.indexing_options(args)
    source.fit_latent = options.get("latent", True)  # off, on, or the embedding --latent names
    out = args.out or Path(args.file).with_suffix(".h5")
    summary = index_file(source, Path(out), threads=args.threads, providers=args.providers,
                         clusters=parse_clusters(args.clusters), **options)
    print(f"liveindex index: {summary['points']} patterns, {summary['indexed']} indexed, "
          f"{summary['frames_per_second']} patterns/s; wrote {', '.join(summary['files'])}")
    warning = missing_phase_warning(summary)
    if warning:
        print(f"liveindex index: {warning}")
    return 0


def cmd_publish(args) -> int:
    from .publisher import Publisher
    from .security import CurveKeys

    stop = _stop_on_signals()
    if args.detector:
        from .detectors import open_detector

        source = open_detector(args.detector, host=args.host, port=args.port, modality=_modality(args), args=args,
                               arm_timeout=args.arm_timeout, stop_event=stop)
    else:
        source = _modality(args).open_source(args, role="publish")
        from liveindex.models.latent.encoder import latent_choice

        source.fit_latent = latent_choice(getattr(args, "latent", True))  # off, on, or the embedding --latent names
    publisher = Publisher(bind=args.bind, sink=args.sink, page_size=args.page_size, rate=args.rate,
                          wait_for_workers=args.wait_for_workers, sink_timeout=args.sink_timeout,
                          worker_timeout=args.worker_timeout, store_timeout=args.store_timeout,
                          memory_limit=int(args.memory_limit * 1e6), spill_dir=args.spill_dir, preview=args.preview,
                          keys=CurveKeys.load(args.keys), stop_event=stop, restart=args.restart)
    try:
        report = publisher.run(source, scan_id=args.scan_id)
    finally:
        publisher.close()
    print(f"liveindex publish: scan {report.scan}, {report.frames} frames in {report.seconds:.2f} s "
          f"({report.frames_per_second:.0f} frames/s), {report.pages_resent} pages re-sent, "
          f"{report.frames_spilled} frames spilled to disk, peak page memory {report.peak_memory_bytes / 1e6:.1f} MB"
          + (f", {report.frames_dropped} frames dropped (preview mode)" if report.frames_dropped else "")
          + f"; {report.status}" + (f" ({report.reason})" if report.reason else ""))
    return 0 if report.status == "complete" or args.allow_partial else PARTIAL_EXIT


def cmd_replay(args) -> int:
    from .detectors import parse_scan_shape
    from .replay import replay

    return replay(args.file, kind=args.kind, rate=args.rate, host=args.host, port=args.port,
                  control_port=args.control_port, trigger_port=args.trigger_port,
                  scan_shape=parse_scan_shape(args.scan_shape) if args.scan_shape else None, folder=args.folder,
                  stop_event=_stop_on_signals(), announce=lambda line: print(line, flush=True))


def cmd_worker(args) -> int:
    from .roles import run_worker
    from .security import CurveKeys

    modality = _modality(args)
    run_worker(report=lambda **_: None, stop_event=_stop_on_signals(), dispatcher=args.dispatcher, sink=args.sink,
               name=args.name, prefetch=args.prefetch, providers=args.providers,
               threads=args.threads, connect_timeout=args.connect_timeout, metrics_port=args.metrics_port,
               options={modality.name: modality.indexing_options(args)},
               metrics_host=args.metrics_host, keys=CurveKeys.load(args.keys))
    return 0


def cmd_sink(args) -> int:
    from .roles import run_sink
    from .security import CurveKeys

    finished = run_sink(report=lambda **info: log.info("sink ready: %s", info), stop_event=_stop_on_signals(),
                        bind=args.bind, out_dir=args.out, http_host=args.http_host, http_port=args.http_port,
                        max_scans=1 if args.once else None, finish_timeout=args.finish_timeout,
                        idle_timeout=args.idle_timeout, clusters=parse_clusters(args.clusters),
                        index_cluster_means=args.index_cluster_means == "on", keys=CurveKeys.load(args.keys))
    for summary in finished:
        print(json.dumps(summary))
    return 0


def cmd_keys(args) -> int:
    from .security import make_keys

    written = make_keys(args.folder)
    print(f"liveindex keys: wrote {', '.join(p.name for p in written)} in {args.folder}. "
          "The sink needs server.key_secret and client.key; workers client.key_secret and server.key; "
          "the publisher all four. Keep *.key_secret private; pass --keys FOLDER to every part.")
    return 0


def _add_clusters_option(p):
    p.add_argument("--clusters", default="auto", metavar="auto|N",
                   help="the latent cluster map: auto (HDBSCAN finds how many, default) or N clusters (k-means), "
                        "for a modality that sends an embedding")


def _add_keys_option(p):
    p.add_argument("--keys", metavar="FOLDER", help="CurveZMQ keys made by `liveindex keys` (encrypt and authenticate "
                                                    "traffic between hosts)")


def _add_modality_options(p, modality, role: str) -> None:
    from liveindex.models import modality as modalities

    p.add_argument("--modality", default=DEFAULT_MODALITY, choices=sorted(modalities.known()),
                   help=f"the kind of patterns (default {DEFAULT_MODALITY}); the options below are this modality's")
    modality.add_arguments(p, role=role)


def parse_clusters(text):
    from liveindex.models.latent.clusters import parse_clusters

    return parse_clusters(text)


def build_parser(argv=None) -> argparse.ArgumentParser:
    """The command line; ``argv`` (default sys.argv) picks the modality whose options it has."""
    from liveindex.models import modality as modalities

    modality = modalities.load(_chosen_modality(sys.argv[1:] if argv is None else argv))
    parser = argparse.ArgumentParser(prog="liveindex", description="Live indexing of electron diffraction patterns.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run publisher, workers and sink here on one simulated scan")
    p.add_argument("--scan", default="40x40", help="scan size, width x height (default 40x40)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="liveindex-demo", help="output folder (default ./liveindex-demo)")
    p.add_argument("--no-browser", action="store_true", help="do not open the live page")
    p.add_argument("--exit-when-done", action="store_true",
                   help="stop once the scan is written (default: keep serving the page until Ctrl-C)")
    p.add_argument("--http-port", type=int, default=8080, help="live page port (0: any free port)")
    p.add_argument("--page-size", type=int, default=64, help="frames per page")
    p.add_argument("--rate", type=float, help="detector rate in frames/s (default: as fast as workers take them)")
    _add_clusters_option(p)
    _add_modality_options(p, modality, "demo")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("index", help="index a saved scan (.npy or a file format the modality reads)")
    p.add_argument("file")
    p.add_argument("--out", help="OUT.h5, OUT.ang or OUT.ctf (the other outputs go beside it) or a folder")
    _add_modality_options(p, modality, "index")
    _add_clusters_option(p)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: all cores)")
    p.add_argument("--providers", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("publish", help="stream a scan to workers (dispatcher) and the sink")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--simulate", default="40x40", metavar="WxH", help="simulated scan size (default)")
    src.add_argument("--file", help="replay a saved scan instead")
    src.add_argument("--follow", metavar="FILE",
                     help="index a file while the acquisition writes it (NORDIF .dat, EDAX .up1/.up2, Oxford .ebsp, "
                          "kikuchipy/Bruker/EDAX h5ebsd written in HDF5's SWMR mode): "
                          "frames are read as they are complete; the scan ends with the expected count, or partial "
                          "once the file stops growing for --follow-timeout seconds")
    src.add_argument("--detector", choices=["merlin", "dectris", "asi-tpx3"],
                     help="receive frames from a detector's stream (one receiver, passive: waits for the acquisition "
                          "to be armed; scan shape and frame size from its header); --modality picks the indexer")
    _add_modality_options(p, modality, "publish")
    p.add_argument("--follow-timeout", type=float, default=10.0, metavar="S",
                   help="with --follow: end the scan (partial) once the file has not grown for S seconds (default 10)")
    p.add_argument("--scan-shape", metavar="WxH",
                   help="the scan's columns x rows, where the file or detector does not say it")
    p.add_argument("--host", default="127.0.0.1", help="with --detector: the detector's data host (127.0.0.1)")
    p.add_argument("--port", type=int, help="with --detector: its data port (Merlin 6342, DECTRIS 9999, Timepix3 8283)")
    p.add_argument("--arm-timeout", type=float, default=600.0, metavar="S",
                   help="with --detector: seconds to wait for an acquisition to start (default 600)")
    p.add_argument("--bind", default=DEFAULT_DISPATCHER, help=f"dispatcher address workers connect to ({DEFAULT_DISPATCHER})")
    p.add_argument("--sink", default=DEFAULT_SINK, help=f"the sink's address ({DEFAULT_SINK})")
    p.add_argument("--page-size", type=int, default=128)
    p.add_argument("--rate", type=float, help="frames/s (default: as fast as workers take them)")
    p.add_argument("--scan-id")
    p.add_argument("--wait-for-workers", type=float, default=60.0, help="seconds to wait for a first worker")
    p.add_argument("--sink-timeout", type=float, default=10.0, help="seconds to reach the sink")
    p.add_argument("--worker-timeout", type=float, default=10.0,
                   help="seconds of silence after which a worker's pages go to the others")
    p.add_argument("--store-timeout", type=float, default=30.0,
                   help="seconds a finished page may wait for the sink to store it before it is sent again")
    p.add_argument("--memory-limit", type=float, default=512.0, metavar="MB",
                   help="memory for pages waiting for workers; beyond it they spill to --spill-dir (default 512)")
    p.add_argument("--spill-dir", help="where waiting pages spill (default: the system's temporary folder)")
    p.add_argument("--preview", action="store_true",
                   help="preview-only mode: drop frames the workers cannot keep up with instead of spilling them")
    p.add_argument("--restart", action="store_true",
                   help="resume a scan another publisher started under the same --scan-id (the sink keeps what it has)")
    p.add_argument("--allow-partial", action="store_true",
                   help=f"exit 0 for a scan that ended with points missing (default: exit {3})")
    _add_keys_option(p)
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("replay", help="serve a saved scan as a detector stream, through libertem-live's simulator")
    p.add_argument("file", help=".npy of (ny, nx, H, W) frames, or (N, H, W) with --scan-shape")
    p.add_argument("--as", dest="kind", choices=["merlin", "dectris"], default="merlin",
                   help="the detector to play: merlin (libertem-live-mib-sim) or dectris (libertem-live-dectris-sim)")
    p.add_argument("--rate", type=float, help="frames/s (default: the simulator's full rate)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (127.0.0.1)")
    p.add_argument("--port", type=int, default=6342, help="Merlin's data port (6342); a DECTRIS stream's is chosen "
                                                           "by its simulator and printed")
    p.add_argument("--control-port", type=int, default=6341, help="Merlin's control port, or DECTRIS's REST API port")
    p.add_argument("--trigger-port", type=int, default=6343)
    p.add_argument("--scan-shape", metavar="WxH")
    p.add_argument("--folder", help="where the .mib and .hdr are written (default: beside FILE)")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("worker", help="index pages from a dispatcher, send results to a sink")
    p.add_argument("--dispatcher", default=DEFAULT_DISPATCHER)
    p.add_argument("--sink", default=DEFAULT_SINK)
    p.add_argument("--name")
    p.add_argument("--prefetch", type=int, default=2, help="pages asked for ahead")
    _add_modality_options(p, modality, "worker")
    p.add_argument("--providers", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1, help="CPU threads for inference")
    p.add_argument("--connect-timeout", type=float, default=60.0, help="seconds to reach the dispatcher (0: forever)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address for /metrics (default 127.0.0.1)")
    _add_keys_option(p)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("sink", help="collect results, serve the live page and metrics, write outputs")
    p.add_argument("--bind", default=DEFAULT_SINK)
    p.add_argument("--out", default="liveindex-out")
    p.add_argument("--http-host", default="127.0.0.1")
    p.add_argument("--http-port", type=int, default=8080)
    p.add_argument("--once", action="store_true", help="exit after the first scan is written")
    p.add_argument("--finish-timeout", type=float, default=30.0, help="seconds to wait for late results after scan_end")
    p.add_argument("--idle-timeout", type=float, default=600.0,
                   help="finish a scan that got nothing for this long and no scan_end (its publisher died)")
    _add_clusters_option(p)
    p.add_argument("--index-cluster-means", choices=("on", "off"), default="on",
                   help="index each latent cluster's mean pattern in the sink, with an indexer of its own prepared "
                        "from the scan_start as a worker's (default on; off spares the sink's host its memory)")
    _add_keys_option(p)
    p.set_defaults(func=cmd_sink)

    p = sub.add_parser("keys", help="make CurveZMQ key pairs for traffic between hosts")
    p.add_argument("folder", help="a new or empty folder")
    p.set_defaults(func=cmd_keys)

    modality.add_commands(sub)  # EBSD: models train|export|eval
    from liveindex.models.latent.cli import add_encoder_commands

    add_encoder_commands(sub, modality)  # models train-encoder|adapt, every modality
    return parser


def main(argv=None) -> int:
    from .processes import setup_logging

    setup_logging(logging.INFO)
    try:
        args = build_parser(argv).parse_args(argv)
        setup_logging(logging.DEBUG if args.verbose else logging.INFO)
        return args.func(args)
    except LiveIndexError as exc:
        print(f"liveindex: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

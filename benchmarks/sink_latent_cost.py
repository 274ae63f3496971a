"""The sink's CPU seconds per 1000 spot frames with and without the latent maps, and with and
without its cluster-mean indexer: where the latent maps' cost in the sink goes.

    python benchmarks/sink_latent_cost.py [--scan 40x40] [--workers 2] [--repeats 1]

One pre-rendered simulated precession scan (ferrite, austenite, cementite, 128x128, moderate
noise) saved as .npy is published from the file three ways, the sink, workers and publisher
`liveindex` processes on loopback: ``--latent off`` (no embeddings), latent maps with
``liveindex sink --index-cluster-means off``, and latent maps as by default (the sink prepares
its own spot indexer and indexes each cluster's mean pattern). The sink's CPU seconds are its
whole life's (os.wait4's rusage: start-up, the scan, its files), so the differences between
the ways are what the latent maps and the mean indexer cost. Then the last run's embeddings
(the sink's ``scan_maps.npz``) are replayed into ``LatentClusters`` in this process as the
sink's refresher sees them, a refresh each ``REFRESH_SECONDS`` of the scan's pace, each timed
(thread CPU), with how many reclustered, and cProfile's top functions over all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scan", default="40x40")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    nx, ny = (int(v) for v in args.scan.split("x"))
    ways = {"latent off": (("--latent", "off"), ()), "latent on, mean indexer off": ((), ("--index-cluster-means",
                                                                                      "off")),
            "latent on (default)": ((), ())}
    with tempfile.TemporaryDirectory(prefix="sink-latent-") as tmp:
        path = Path(tmp) / "scan.npy"
        np.save(path, _frames(nx, ny))
        for repeat in range(args.repeats):
            for k, (name, (publish_extra, sink_extra)) in enumerate(ways.items()):
                cpu, seconds, summary = _run(Path(tmp) / f"run{repeat}-{k}", path, args.workers, publish_extra,
                                             sink_extra)
                last = (Path(tmp) / f"run{repeat}-{k}" / "scan_maps.npz", seconds)
                print(f"{name:28s}: sink CPU {cpu:5.2f} s = {cpu * 1000 / (nx * ny):.2f} s per 1000 frames; "
                      f"scan {seconds:.1f} s, missing {summary['missing']}; load {os.getloadavg()[0]:.1f}",
                      flush=True)
        _replay(*last, nx, ny)
    return 0


def _replay(maps_path: Path, seconds: float, nx: int, ny: int) -> None:
    import cProfile
    import pstats
    import time

    import sklearn.cluster  # noqa: F401  (a sink has it imported from its first refresh on)

    from liveindex.models.latent.clusters import LatentClusters
    from liveindex.stream.latent_map import REFRESH_SECONDS

    with np.load(maps_path) as maps:
        embedding = maps["embedding"].reshape(nx * ny, -1).astype(np.float32)
        # As the sink's explained_of: the calibrated confidence, at most 0.5 where no phase was kept.
        explained = np.clip(np.nan_to_num(maps["confidence"].astype(np.float32)), 0.0, 1.0)
        explained = np.where(maps["phase_id"] < 0, np.minimum(explained, 0.5), explained)
    n = len(embedding)
    step = max(int(n / seconds * REFRESH_SECONDS), 1)
    clusters = LatentClusters((ny, nx), clusters=None)
    received = np.zeros(n, bool)
    profile = cProfile.Profile()
    cpu, refits = [], 0
    for upto in [*range(step, n, step), n]:
        received[:upto] = True
        t0 = time.thread_time()
        profile.enable()
        clusters.refresh(embedding, received, np.where(received, explained, np.nan))
        profile.disable()
        cpu.append(time.thread_time() - t0)
        refits += clusters.since_fit == 0
    print(f"replay: {len(cpu)} refreshes of {embedding.shape[1]}-dim embeddings ({step} points apart), {refits} "
          f"reclustered, {len(clusters.known)} clusters at the end; CPU {sum(cpu):.2f} s = "
          f"{sum(cpu) * 1000 / n:.2f} s per 1000 frames ({' '.join(f'{c:.3f}' for c in cpu)})")
    pstats.Stats(profile).sort_stats("cumulative").print_stats(12)


def _frames(nx, ny) -> np.ndarray:
    from liveindex.models.spots.phases import phases_from_spec
    from liveindex.models.spots.setup import check_setup
    from liveindex.models.spots.simulator import SimulatedSpotScan

    phases = phases_from_spec("ferrite,austenite,cementite")
    setup = check_setup({"kv": 200.0, "calibration": 0.03, "precession": 1.0}, (128, 128))
    scan = SimulatedSpotScan((ny, nx), phases, setup, noise="moderate", seed=7)
    return scan.render(0, scan.size).reshape(ny, nx, 128, 128)


def _run(out: Path, path: Path, workers: int, publish_extra, sink_extra):
    out.mkdir()
    sink_addr, disp_addr = f"tcp://127.0.0.1:{_free_port()}", f"tcp://127.0.0.1:{_free_port()}"
    spots = ("--modality", "spots")
    logs = open(out / "logs.txt", "w")  # a pipe nobody reads would fill and stall a process
    sink = _start(logs, "sink", "--bind", sink_addr, "--out", out, "--http-port", _free_port(), "--once",
                  "--finish-timeout", "30", *sink_extra)
    procs = [_start(logs, "worker", "--dispatcher", disp_addr, "--sink", sink_addr, "--name", f"w{i}", *spots)
             for i in range(workers)]
    publisher = _start(logs, "publish", "--bind", disp_addr, "--sink", sink_addr, "--scan-id", "scan", *spots,
                       "--file", path, "--calibration", "0.03", "--precession", "1", "--rate", "2000",
                       *publish_extra)
    try:
        publisher.wait(timeout=600)
        summary = json.loads(sink.stdout.read().strip().splitlines()[-1])
        _, status, usage = os.wait4(sink.pid, 0)  # the sink's own rusage, once it has exited (--once)
        sink.returncode = os.waitstatus_to_exitcode(status)
    finally:
        for p in [*procs, publisher]:
            if p.poll() is None:
                p.terminate()
                p.wait(30)
        logs.close()
    seconds = summary.get("elapsed_s") or summary.get("seconds") or float("nan")
    return usage.ru_utime + usage.ru_stime, seconds, summary


def _start(logs, role, *args):
    return subprocess.Popen([sys.executable, "-m", "liveindex.stream", role, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=logs, text=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())

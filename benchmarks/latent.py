"""Latent maps (issue 16, EBSD): the scores and the cost.

(a) superalloy-like scan: a few gamma (disordered fcc Ni, tests/data/gamma_ni.cif) grains
    with round gamma-prime precipitates (ordered L1_2 Ni3Al, tests/data/ni3al.cif) in each,
    in the grain's orientation (cube-cube), indexed with gamma only. Truth labels: one per
    (grain, phase) pair, since a grain and the precipitates inside it are distinct regions
    and so are two grains; the cluster map is scored against them with the adjusted Rand
    index (ARI), and so is the phase map, which sees one phase.
(b) missing phase: austenite and ferrite grains indexed with austenite only: the share of
    ferrite points with novelty >= 0.5 and of austenite points with it (and, for
    comparison, what the per-point confidence below 0.5 alone marks).
(d) spot patterns (--modality spots): a simulated 4D-STEM precession scan (models/spots/
    simulator.py) of Voronoi grains of ferrite, austenite and cementite and an amorphous
    disc, indexed with the three: the cluster map against the truth (each grain one label,
    the amorphous disc one) by ARI; the boundary map's mean on points next to another
    region against inside; a worker's page (128 frames, one core) with and without the
    embedding.
(c) cost: a worker's page (128 frames, one core) with and without the embedding; the basis fit;
    the features and projection per frame; a cluster-map refresh on a synthetic 1e6-point
    embedding (1000x1000), wall and CPU, where it reclusters and where not, with its peak
    memory; the NMF basis for comparison; and the period of the cluster map in the sink
    itself (``live_period``: a 1000x1000 scan's result pages on a socket, the last fifth at
    ``--rate`` points a second), with the load.

    .venv/bin/python benchmarks/latent.py [--noise moderate] [--scan 80] [--part a,b,c] [--seed 5] [--rate 5000]
    .venv/bin/python benchmarks/latent.py --part d [--spot-scan 50] [--grain 10] [--seed 1]

--embedding pca|encoder|encoder:PATH.onnx runs every part with that embedding source (the
scan's PCA basis, the default; the modality's shipped encoder network; another encoder).
--save-frames DIR writes the scans of parts a and d as .npy, for liveindex models adapt.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
EMBEDDING = "pca"  # --embedding: what the scan_start carries (models/latent/encoder.py parse_latent)
SAVE_FRAMES = None  # --save-frames DIR: parts a and d write their scan's frames there (for liveindex models adapt)


def _save(name: str, frames, nav_shape) -> None:
    if SAVE_FRAMES is not None:
        Path(SAVE_FRAMES).mkdir(parents=True, exist_ok=True)
        np.save(Path(SAVE_FRAMES) / f"{name}.npy", frames.reshape(*nav_shape, *frames.shape[1:]))


def _index(frames, phases, *, latent=True, nav):
    from liveindex.models.ebsd.files import array_source
    from liveindex.models.ebsd.geometry import DetectorGeometry
    from liveindex.stream.offline import index_source, latent_maps
    from liveindex.stream.protocol import ScanStart

    source = array_source(frames.reshape(*nav, *frames.shape[1:]), geometry=DetectorGeometry(), phases=phases)
    source.fit_latent = EMBEDDING if latent else False
    t0 = time.perf_counter()
    header = {"scan": "bench", **source.scan_start()}
    fit_s = time.perf_counter() - t0
    keep: dict = {}
    maps, seconds = index_source(source, progress=False, keep=keep)
    start = ScanStart.from_header(header)
    t0 = time.perf_counter()
    extra = latent_maps(maps, start, indexer=keep["indexer"]) if latent else {}
    cluster_s = time.perf_counter() - t0
    return {**maps, **extra}, start, {"fit_s": fit_s, "index_s": seconds, "cluster_s": cluster_s}


def superalloy(noise: str, side: int, radius: float) -> dict:
    from sklearn.metrics import adjusted_rand_score

    from liveindex.models.ebsd.master_patterns import phases_from_spec
    from liveindex.models.ebsd.simulator import SimulatedScan

    gamma, gamma_prime = phases_from_spec(f"{DATA / 'gamma_ni.cif'},{DATA / 'ni3al.cif'}")
    scan = SimulatedScan((side, side), phase=gamma, precipitate=gamma_prime, noise=noise, seed=3,
                         grain_size=side / 2, precipitate_radius=radius)
    frames = scan.render(0, scan.size)
    _save(f"superalloy_r{radius:g}_{noise}", frames, scan.nav_shape)
    truth = scan.grain_of_point  # (grain, phase) pairs: grain g's precipitates are g + grains
    maps, start, times = _index(frames, [gamma], nav=scan.nav_shape)
    cluster = maps["cluster"]
    return {"noise": noise, "points": scan.size, "grains": len(scan.grain_rotations), "radius": radius,
            "precipitate_share": round(float((scan.truth_phase == 1).mean()), 3),
            "clusters": int(len(np.unique(cluster[cluster >= 0]))),
            "ari_cluster": round(adjusted_rand_score(truth, cluster), 3),
            "ari_phase_map": round(adjusted_rand_score(truth, maps["phase_id"]), 3),
            "indexed_as_gamma": round(float((maps["phase_id"] == 0).mean()), 3),
            # Each cluster's mean pattern indexed as a frame: size, phase, confidence.
            "mean_patterns": [(c["size"], c.get("mean_pattern_indexed", {}).get("phase"),
                               c.get("mean_pattern_indexed", {}).get("confidence")) for c in maps["clusters"]],
            **times}


def missing_phase(noise: str, side: int, seed: int = 5) -> dict:
    from liveindex.models.ebsd.master_patterns import phases_from_spec
    from liveindex.models.ebsd.simulator import SimulatedScan

    austenite, ferrite = phases_from_spec(f"{DATA / 'austenite.cif'},{DATA / 'ferrite.cif'}")
    scan = SimulatedScan((side, side), phase=[austenite, ferrite], noise=noise, seed=seed, grain_size=side / 4)
    frames = scan.render(0, scan.size)
    maps, start, times = _index(frames, [austenite], nav=scan.nav_shape)
    novel = maps["novelty"] >= 0.5
    is_ferrite = scan.truth_phase == 1
    low = start.unexplained(maps)
    return {"noise": noise, "seed": seed, "points": scan.size, "ferrite_share": round(float(is_ferrite.mean()), 3),
            "novel_ferrite": round(float(novel[is_ferrite].mean()), 4),
            "novel_austenite": round(float(novel[~is_ferrite].mean()), 4),
            "confidence_below_half_ferrite": round(float(low[is_ferrite].mean()), 4),
            "confidence_below_half_austenite": round(float(low[~is_ferrite].mean()), 4), **times}


def best_page_seconds(indexers: dict, page: np.ndarray, repeats: int = 5) -> dict:
    """Each page indexer's best time on ``page`` (after one warm call), the indexers taken in
    turn ``repeats`` times so that a change of load touches them alike."""
    best = {key: np.inf for key in indexers}
    for indexer in indexers.values():
        indexer.index(page)  # warm
    for _ in range(repeats):
        for key, indexer in indexers.items():
            t0 = time.perf_counter()
            indexer.index(page)
            best[key] = min(best[key], time.perf_counter() - t0)
    return best


def cost(noise: str, side: int) -> dict:
    from liveindex.models import modality as modalities
    from liveindex.models.ebsd.files import SimulatedSource
    from liveindex.models.ebsd.latent import features
    from liveindex.models.ebsd.simulator import SimulatedScan
    from liveindex.models.latent.basis import fit_basis, nmf_basis, read_tiles
    from liveindex.models.latent.clusters import LatentClusters
    from liveindex.models.onnx_runtime import blas_threads

    scan = SimulatedScan((side, side), noise=noise, seed=11)
    frames = scan.render(0, scan.size)
    out = {"points": scan.size}
    # One worker's page indexer with and without the embedding (the same ScanIndexer, kept by
    # the modality), on one core as a worker runs: pages of 128 interleaved, best of 5 each.
    source = SimulatedSource(scan)
    source.fit_latent = EMBEDDING
    t0 = time.perf_counter()
    start = {"scan": "cost", **source.scan_start()}
    out["scan_start_latent_s"] = round(time.perf_counter() - t0, 3)
    out["latent_wire_kb"] = round(len(__import__("msgpack").packb(start["latent"])) / 1e3, 1)
    ebsd = modalities.load("ebsd")
    indexers = {on: ebsd.prepare(start, options={"latent": on}) for on in (False, True)}
    page = frames[:128]
    with blas_threads(1):
        best = best_page_seconds(indexers, page)
    out["page_ms_latent_off"] = round(best[False] * 1e3, 2)
    out["page_ms_latent_on"] = round(best[True] * 1e3, 2)
    tiles = read_tiles(lambda a, n: frames[a:a + n], scan.nav_shape, features)
    t0 = time.perf_counter()
    basis = fit_basis(tiles, (30, 30))
    out["basis_fit_s"] = round(time.perf_counter() - t0, 3)
    page = frames[:256]
    if EMBEDDING != "pca":  # the scan's encoder, as the workers run it
        from liveindex.models.latent.encoder import latent_from_wire

        basis = latent_from_wire(start["latent"])
        basis.embed(features(page))  # warm
    t0 = time.perf_counter()
    with blas_threads(1):
        for _ in range(20):
            basis.embed(features(page))
    out["embed_us_per_frame"] = round((time.perf_counter() - t0) / (20 * len(page)) * 1e6, 2)
    out["index_us_per_frame"] = round(best[False] / len(page) * 1e6, 1)
    out["embed_us_per_frame_by_kind"] = _embed_cost_by_kind(scan, page)
    t0 = time.perf_counter()
    _, model = nmf_basis(tiles, (30, 30))
    out["nmf_fit_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    model.transform(np.maximum(features(page), 0).astype(np.float64))
    out["nmf_embed_us_per_frame"] = round((time.perf_counter() - t0) / len(page) * 1e6, 2)
    # A 1000x1000 scan's refresh on a synthetic embedding: 12 regions and noise, as float32
    # (the sink keeps it so) with each point's explained share (confidence): the first clusters the
    # subsample (HDBSCAN, the split), as every 4th does (clusters.REFIT_EVERY); the others only
    # settle the map (ICM) and recompute its novelty and boundary maps.
    rng = np.random.default_rng(0)
    n = 1_000_000
    region = (np.arange(n) // 1000 // 250) * 3 + (np.arange(n) % 1000) // 334
    emb = (rng.normal(0, 2, (12, 16))[region] + rng.normal(0, 0.3, (n, 16))).astype(np.float16).astype(np.float32)
    received = np.ones(n, bool)
    explained = rng.beta(0.6, 0.2, n).astype(np.float32)
    clusters = LatentClusters((1000, 1000))
    clusters.refresh(emb, received, explained)  # warm: imports, HDBSCAN's first call
    refit, settle = [], []
    for _ in range(8):
        t0, c0 = time.perf_counter(), time.thread_time()
        result = clusters.refresh(emb, received, explained)
        (refit if clusters.since_fit == 0 else settle).append((time.perf_counter() - t0, time.thread_time() - c0))
    tracemalloc.start()  # its own run: tracing slows numpy's allocations
    clusters.refresh(emb, received, explained)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    out["refresh_1e6_refit_s"] = [(round(w, 2), round(c, 2)) for w, c in refit]  # (wall, CPU)
    out["refresh_1e6_s"] = [(round(w, 2), round(c, 2)) for w, c in settle]
    out["refresh_1e6_peak_mb"] = round(peak / 1e6, 1)
    out["refresh_1e6_clusters"] = int(len(np.unique(result["cluster"])))
    out["refresh_load"] = _load()
    return out


def _load() -> str:
    """The 1, 5 and 15 min load averages of this machine (/proc/loadavg) and its cores."""
    return f"load {' '.join(f'{v:.2f}' for v in os.getloadavg())} on {os.cpu_count()} cores"


def live_period(side: int = 1000, rate: float = 5000.0, prefill: float = 0.8, page: int = 256,
                regions: int = 12) -> dict:
    """The cluster map's refresh period in the sink (stream/sink.py ``Sink``, its
    ``LatentRefresher`` thread): an EBSD scan_start of ``side`` x ``side`` points on a loopback
    socket, then result pages (``page`` points each, as workers send them) of a synthetic
    embedding (``regions`` regions of 16 dims, 30% of them poorly explained as at hard noise),
    the first ``prefill`` of the scan as fast as the sink takes them and the rest at ``rate``
    points a second. The period is the time between the ends of two refreshes while the rest
    comes in; a refresh's wall and CPU time and the points it held come from the sink's log."""
    import tempfile

    import zmq

    from liveindex.models.ebsd.files import SimulatedSource
    from liveindex.models.ebsd.simulator import SimulatedScan
    from liveindex.stream.latent_map import LatentMaps
    from liveindex.stream.protocol import ScanStart, encode
    from liveindex.stream.sink import Sink

    # Each refresh's end, wall and CPU time and points in, as the sink's refresher thread runs it.
    log_: list[tuple[float, float, float, int]] = []
    refresh = LatentMaps.refresh

    def timed(self, state):
        t0, c0 = time.perf_counter(), time.thread_time()
        changed = refresh(self, state)
        if changed is not None:
            log_.append((time.monotonic(), time.perf_counter() - t0, time.thread_time() - c0, self.refreshed_at_points))
        return changed

    LatentMaps.refresh = timed

    scan = SimulatedScan((4, 4), seed=1)  # only its scan_start: the pages below are synthetic
    source = SimulatedSource(scan)
    source.fit_latent = False
    header = {"scan": "period", **source.scan_start()}
    header["nav_shape"] = [side, side]
    start = ScanStart.from_header(header)
    n = side * side
    rng = np.random.default_rng(0)
    yy, xx = np.divmod(np.arange(n), side)
    k = int(np.sqrt(regions))
    region = np.minimum(yy * k // side, k - 1) * (regions // k) + np.minimum(xx * (regions // k) // side,
                                                                             regions // k - 1)
    centres = rng.normal(0, 2, (regions, 16))
    poor = rng.random(regions) < 0.3
    pages = []
    for first in range(0, n, page):
        idx = np.arange(first, min(n, first + page))
        arrays = {"indices": idx}
        for f in start.fields:
            arrays[f.name] = np.broadcast_to(np.asarray(f.fill, f.dtype), (len(idx), *f.shape)).copy()
        arrays["phase_id"][:] = 0
        arrays["method"][:] = 1
        conf = rng.beta(0.6, 0.6 * np.where(poor[region[idx]], 0.8 / 0.2, 0.1 / 0.9))
        arrays["confidence"] = conf.astype(np.float32)
        arrays["embedding"] = (centres[region[idx]] + rng.normal(0, 0.3, (len(idx), 16))).astype(np.float16)
        pages.append(encode("results", {"scan": "period", "first": int(idx[0]), "count": len(idx), "worker": "w",
                                        "timings": {}}, arrays))
    out: dict = {"points": n, "rate": rate, "page": page, "prefill": prefill}
    with tempfile.TemporaryDirectory() as tmp:
        sink = Sink(out_dir=tmp, http_port=None, finish_timeout=600.0)
        thread = threading.Thread(target=sink.run, daemon=True)
        thread.start()
        ctx = zmq.Context.instance()
        push = ctx.socket(zmq.DEALER)
        push.connect(sink.endpoint)

        def drain():  # the sink's acknowledgements
            while push.poll(0):
                push.recv_multipart()

        push.send_multipart(encode("scan_start", header))
        cut = int(prefill * len(pages))
        t0 = time.perf_counter()
        for message in pages[:cut]:
            push.send_multipart(message)
            drain()
        while sink.scans.get("period") is None or sink.scans["period"].n_received < cut * page:
            drain()
            time.sleep(0.05)
        out["prefill_s"] = round(time.perf_counter() - t0, 1)
        state = sink.scans["period"]
        fed_from = time.monotonic()
        load_before = _load()
        t0 = time.perf_counter()
        for j, message in enumerate(pages[cut:]):
            wait = t0 + j * page / rate - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            push.send_multipart(message)
            drain()
        while state.n_received < n:
            drain()
            time.sleep(0.05)
        fed_s = time.perf_counter() - t0
        time.sleep(5.0)  # a refresh more after the last page (none after it: nothing new)
        fed_to = time.monotonic()
        sink.stop_event.set()
        thread.join(30)
        push.close(linger=0)
        sink.close()
        LatentMaps.refresh = refresh
    ends = np.array([e[0] for e in log_])
    during = [e for e in log_ if fed_from <= e[0] <= fed_to]
    gaps = np.diff(ends[(ends >= fed_from) & (ends <= fed_to)])
    out.update({"fed_s": round(fed_s, 1), "load_before_feed": load_before, "load_after": _load(),
                "refreshes": len(during), "period_s_median": round(float(np.median(gaps)), 2) if len(gaps) else None,
                "period_s_max": round(float(gaps.max()), 2) if len(gaps) else None,
                "refresh_wall_s": [round(e[1], 2) for e in during], "refresh_cpu_s": [round(e[2], 2) for e in during],
                "refresh_points": [e[3] for e in during],
                "refresher_core_share": round(sum(e[2] for e in during) / max(fed_to - fed_from, 1e-9), 3)})
    return out


def _embed_cost_by_kind(scan, page) -> dict:
    """Features and embedding of a page, a frame, with the PCA basis and the shipped encoder,
    as a worker embeds (models/ebsd/latent.py embed), interleaved on one core, best of 10."""
    from liveindex.models.ebsd.files import SimulatedSource
    from liveindex.models.ebsd.latent import embed
    from liveindex.models.latent.encoder import latent_from_wire
    from liveindex.models.onnx_runtime import blas_threads

    kinds = {}
    for kind in ("pca", "encoder"):
        source = SimulatedSource(scan)
        source.fit_latent = kind
        kinds[kind] = latent_from_wire(source.scan_start()["latent"])
    best = dict.fromkeys(kinds, np.inf)
    with blas_threads(1):
        for basis in kinds.values():
            embed(basis, page)  # warm
        for _ in range(10):
            for kind, basis in kinds.items():
                t0 = time.perf_counter()
                embed(basis, page)
                best[kind] = min(best[kind], time.perf_counter() - t0)
    return {kind: round(v / len(page) * 1e6, 1) for kind, v in best.items()}


def next_to_other(labels: np.ndarray) -> np.ndarray:
    """(ny, nx) region labels -> (N,) True where one of the 4 neighbours is another region."""
    out = np.zeros(labels.shape, bool)
    out[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    out[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    out[1:] |= labels[1:] != labels[:-1]
    out[:-1] |= labels[:-1] != labels[1:]
    return out.ravel()


def spot_scan(noise: str, side: int, grain: float, seed: int) -> dict:
    from sklearn.metrics import adjusted_rand_score

    from liveindex.models import modality as modalities
    from liveindex.models.onnx_runtime import blas_threads
    from liveindex.models.spots.files import SimulatedSpotSource
    from liveindex.models.spots.latent import SpotFeatures
    from liveindex.models.spots.phases import phases_from_spec
    from liveindex.models.spots.setup import check_setup
    from liveindex.models.spots.simulator import SimulatedSpotScan
    from liveindex.stream.offline import index_source, latent_maps
    from liveindex.stream.protocol import ScanStart

    spots = modalities.load("spots")
    phases = phases_from_spec("ferrite,austenite,cementite")
    setup = check_setup({"kv": 200.0, "calibration": 0.03, "precession": 1.0}, (128, 128))
    scan = SimulatedSpotScan((side, side), phases, setup, noise=noise, seed=seed, grain_size=grain)
    t0 = time.perf_counter()
    frames = scan.render(0, scan.size)
    render_s = time.perf_counter() - t0
    _save(f"spots_seed{seed}_{noise}", frames, scan.nav_shape)
    source = SimulatedSpotSource(spots, scan, setup, phases)
    source.read = lambda first, count: frames[first:first + count]  # rendered once (7 ms a frame)
    source.fit_latent = EMBEDDING
    t0 = time.perf_counter()
    header = {"scan": "bench", **source.scan_start()}
    fit_s = time.perf_counter() - t0
    maps, index_s = index_source(source, progress=False)
    t0 = time.perf_counter()
    maps = {**maps, **latent_maps(maps, ScanStart.from_header(header))}
    cluster_s = time.perf_counter() - t0
    truth = np.where(scan.amorphous, -1, scan.grain_of_point)
    cluster = maps["cluster"]
    sizes = np.unique(truth, return_counts=True)[1]
    edge = next_to_other(truth.reshape(scan.nav_shape))
    boundary = maps["boundary"]
    out = {"noise": noise, "points": scan.size, "seed": seed, "regions": len(sizes),
           "regions_over_15_points": int((sizes >= 15).sum()), "amorphous_share": round(float(scan.amorphous.mean()), 3),
           "clusters": int(len(np.unique(cluster[cluster >= 0]))),
           "ari_cluster": round(adjusted_rand_score(truth, cluster), 3),
           "ari_phase_map": round(adjusted_rand_score(truth, maps["phase_id"]), 3),
           "boundary_next_to_other": round(float(np.nanmean(boundary[edge])), 2),
           "boundary_inside": round(float(np.nanmean(boundary[~edge])), 2),
           "boundary_points_share": round(float(edge.mean()), 3),
           # the share of edge points among the 10% highest boundary values
           "top10pct_boundary_on_edges": round(float(edge[boundary >= np.nanpercentile(boundary, 90)].mean()), 3),
           "render_s": round(render_s, 1), "fit_s": round(fit_s, 2), "index_s": round(index_s, 1),
           "cluster_s": round(cluster_s, 2)}
    # One worker's page indexer with and without the embedding (the same SpotIndexer, kept by
    # the modality), on one core: pages of 128 interleaved, best of 5 each (the page
    # times move with the load; the embedding per frame against indexing is the steadier figure).
    indexers = {on: spots.prepare(header, options={"latent": on}, threads=1) for on in (False, True)}
    page = frames[:128]
    with blas_threads(1):
        best = best_page_seconds(indexers, page)
        features = SpotFeatures(setup, (128, 128))
        centres = indexers[True].index(page)["center"]
        t0 = time.perf_counter()
        for _ in range(5):
            indexers[True].latent.embed(features(page, centres))
        embed_s = (time.perf_counter() - t0) / 5
        # The projection against the network alone, on the same features, interleaved.
        from liveindex.models.latent.encoder import latent_from_wire

        x = features(page, centres)
        kinds = {}
        for kind in ("pca", "encoder"):
            source._latent_header = None
            source.fit_latent = kind
            kinds[kind] = latent_from_wire(source.scan_start()["latent"])
        cost = dict.fromkeys(kinds, np.inf)
        for _ in range(10):
            for kind, basis in kinds.items():
                t0 = time.perf_counter()
                basis.embed(x)
                cost[kind] = min(cost[kind], time.perf_counter() - t0)
    out["page_ms_latent_off"] = round(best[False] * 1e3, 1)
    out["page_ms_latent_on"] = round(best[True] * 1e3, 1)
    out["embed_us_per_frame"] = round(embed_s / len(page) * 1e6, 1)
    out["projection_us_per_frame_by_kind"] = {k: round(v / len(page) * 1e6, 2) for k, v in cost.items()}
    out["index_us_per_frame"] = round(best[False] / len(page) * 1e6, 1)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--noise", default="moderate", choices=["clean", "moderate", "hard"])
    parser.add_argument("--scan", type=int, default=80, help="scan side in points (a and b)")
    parser.add_argument("--part", default="a,b,c")
    parser.add_argument("--radius", type=float, default=4.0, help="precipitate radius in scan points (a)")
    parser.add_argument("--spot-scan", type=int, default=50, help="spot scan side in points (d)")
    parser.add_argument("--grain", type=float, default=10.0, help="spot scan grain size in points (d)")
    parser.add_argument("--seed", type=int, default=None, help="scan seed (b: 5, d: 1 unless given)")
    parser.add_argument("--rate", type=float, default=5000.0, help="points a second fed to the sink (c)")
    parser.add_argument("--embedding", default="pca", help="pca (the default), encoder or encoder:PATH.onnx")
    parser.add_argument("--save-frames", metavar="DIR", help="write the frames of part a's and d's scans there as .npy")
    args = parser.parse_args(argv)
    global EMBEDDING, SAVE_FRAMES
    SAVE_FRAMES = args.save_frames
    from liveindex.models.latent.encoder import parse_latent

    EMBEDDING = parse_latent(args.embedding)
    logging.basicConfig(level=logging.WARNING)
    print(f"embedding: {EMBEDDING}; load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} (1 and 5 min), {os.cpu_count()} cores", flush=True)
    parts = args.part.split(",")
    if "a" in parts:
        r = superalloy(args.noise, args.scan, args.radius)
        print(f"(a) superalloy {r}", flush=True)
        print(f"    cluster map ARI {r['ari_cluster']} (>= 0.9 asked): {'met' if r['ari_cluster'] >= 0.9 else 'NOT met'}")
    if "b" in parts:
        r = missing_phase(args.noise, args.scan, 5 if args.seed is None else args.seed)
        print(f"(b) missing phase {r}", flush=True)
        ok = r["novel_ferrite"] >= 0.95 and r["novel_austenite"] <= 0.02
        print(f"    novelty: {r['novel_ferrite']:.1%} of ferrite, {r['novel_austenite']:.1%} of austenite "
              f"(>= 95% and <= 2% asked): {'met' if ok else 'NOT met'}")
    if "c" in parts:
        r = cost(args.noise, 60)
        print(f"(c) cost {r}", flush=True)
        share = r["page_ms_latent_on"] / r["page_ms_latent_off"] - 1
        print(f"    a page with the embedding takes {share:+.1%} of the time without (<= 15% asked); embedding "
              f"{r['embed_us_per_frame']} us a frame against {r['index_us_per_frame']} us to index it; refresh of "
              f"1e6 points {max(c for _, c in r['refresh_1e6_refit_s']):.2f} s of CPU at most where it reclusters, "
              f"{max(c for _, c in r['refresh_1e6_s']):.2f} s where not, peak {r['refresh_1e6_peak_mb']} MB "
              f"({r['refresh_load']}); features and embedding a frame by kind {r['embed_us_per_frame_by_kind']} us", flush=True)
        p = live_period(rate=args.rate)
        print(f"(c) live period {p}", flush=True)
        ok = p["period_s_max"] is not None and p["period_s_max"] <= 5.0
        print(f"    the sink's cluster map on a 1000x1000 scan fed at {args.rate:.0f} points/s: new every "
              f"{p['period_s_median']} s (median), {p['period_s_max']} s at most (<= 5 s asked): "
              f"{'met' if ok else 'NOT met'}; the refresher took {p['refresher_core_share']:.0%} of a core "
              f"({p['load_before_feed']} before the feed, {p['load_after']} after)")
    if "d" in parts:
        r = spot_scan(args.noise, args.spot_scan, args.grain, 1 if args.seed is None else args.seed)
        print(f"(d) spot patterns {r}", flush=True)
        share = r["page_ms_latent_on"] / r["page_ms_latent_off"] - 1
        print(f"    cluster map ARI {r['ari_cluster']} (>= 0.9 asked): {'met' if r['ari_cluster'] >= 0.9 else 'NOT met'}; "
              f"boundary {r['boundary_next_to_other']} next to another region against {r['boundary_inside']} inside; "
              f"a page with the embedding takes {share:+.1%} of the time without (embedding {r['embed_us_per_frame']} "
              f"us a frame against {r['index_us_per_frame']} us to index it)")
    print(f"load after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``liveindex index FILE``: re-index a saved scan with the workers' own code, in-process.

Whatever the modality: its ``prepare`` gives the PageIndexer the workers use, so live and
offline results are the same for the same frames.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import os
import threading
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from liveindex.models.modality import ScanSource, empty_results
from liveindex.models.onnx_runtime import blas_threads

from .protocol import ScanStart, plain
from .writers import write_outputs

log = logging.getLogger(__name__)

OUTPUT_SUFFIXES = (".h5", ".ang", ".ctf")
CALIBRATION_POINTS = 1024  # the first points a modality may calibrate its setup on (EBSD: --refine-pc)


def index_source(source: ScanSource, *, threads: int = 0, providers: str = "auto", page_size: int = 256,
                 progress: bool = True, report: dict | None = None, keep: dict | None = None,
                 **options) -> tuple[dict[str, np.ndarray], float]:
    """Index every frame of a source; returns its declared fields (one array each, a row per
    point) and the indexing seconds. ``options`` go to the modality's ``prepare``.

    ``threads`` pages are indexed at once (0: one per core), each by one-thread ONNX sessions:
    the graphs are small, and a core per page beats every core on each graph (2 cores: 1.9x
    against 1.4x), as the live pipeline's one-thread workers do. A page indexer with a
    ``calibrate`` hook (EBSD's PC fit) gets the scan's first points first; what it found
    goes into ``report`` (a ``setup`` there is the calibrated setup, which the written files
    describe), its time into the seconds. ``keep["indexer"]`` gets the page indexer (to index
    the latent clusters' mean patterns with the scan's own state)."""
    # One BLAS thread from the start, not only while pages run: OpenBLAS's threads spin for
    # about 0.1 s after each threaded call (the scan's set-up: the latent basis, the noise
    # guard), taking a core from the pages (hcp Ti, 400 patterns: 3000 -> 4400 patterns/s).
    with blas_threads(1):
        workers = threads or os.cpu_count() or 1
        modality = source.modality
        start = {"scan": "offline", **source.scan_start()}
        indexer = modality.prepare(start, options=options, threads=1, providers=providers, progress=progress,
                                   reason=f"the setup of {source.metadata.get('source', 'this scan')}")
        out = empty_results(modality.fields, source.size)
        if keep is not None:
            keep["indexer"] = indexer
        t0 = time.perf_counter()
        calibrate = getattr(indexer, "calibrate", None)
        if calibrate is not None:
            found = calibrate(source.read(0, min(source.size, CALIBRATION_POINTS)))
            if found and report is not None:
                report.update(found)
        reading = threading.Lock()  # file readers need not be thread-safe

        def index_page(first: int) -> int:
            count = min(page_size, source.size - first)
            with reading:
                frames = source.read(first, count)
            fields = indexer.index(frames)
            for name, array in out.items():
                array[first:first + count] = fields[name]
            return count

        # Equal pages, a whole number per thread, none over page_size: no thread idles at the end.
        rounds = max(1, math.ceil(source.size / (workers * page_size)))
        page_size = max(1, math.ceil(source.size / (workers * rounds)))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool, \
                tqdm(total=source.size, desc="indexing", unit="pattern", disable=not progress) as bar:
            for count in pool.map(index_page, range(0, source.size, page_size)):
                bar.update(count)
        return out, time.perf_counter() - t0


def latent_maps(maps: dict, start: ScanStart, clusters: int | None = None, *, indexer=None) -> dict:
    """The cluster, boundary and novelty maps of a finished scan whose fields include an
    embedding (the sink's, at once on every point), and ``clusters`` for the summary: each
    cluster's size and, where the scan_start carries a basis and the modality can make a
    pattern of a feature vector, what ``indexer`` answers for the cluster's mean pattern
    (the sink, which runs no indexer, cannot); {} where there is no embedding."""
    from .latent_map import EMBEDDING_FIELD, baseline_least_of, explained_of, has_latent, quality_of

    if not has_latent(start) or not np.isfinite(maps[EMBEDDING_FIELD].astype(np.float32)).any():
        return {}
    from liveindex.models.latent.clusters import LatentClusters

    received = np.ones(start.size, bool)
    found = LatentClusters(tuple(start.nav_shape), clusters=clusters, baseline_least=baseline_least_of(start))
    explained = explained_of(start, maps)
    out = found.refresh(maps[EMBEDDING_FIELD], received, explained, quality_of(maps, explained))
    result = {k: out[k] for k in ("cluster", "boundary", "novelty")}
    result["clusters"] = found.describe()
    if indexer is not None and start.header.get("latent") is not None:
        from liveindex.models.latent.encoder import latent_from_wire

        from .latent_map import index_mean_patterns

        try:
            basis = latent_from_wire(start.header["latent"])
        except Exception as exc:  # the maps stand without it
            log.warning("the clusters' mean patterns were not indexed (%s)", exc)
        else:
            centres = [found.centre(c["id"]) for c in result["clusters"]]
            for item, answer in zip(result["clusters"], index_mean_patterns(centres, start, basis, indexer)):
                if answer is not None:
                    item["mean_pattern_indexed"] = answer
    return result


def index_file(source: ScanSource, out: Path, *, clusters: int | None = None, **options) -> dict:
    report: dict = {}
    keep: dict = {}
    maps, seconds = index_source(source, report=report, keep=keep, **options)
    out = Path(out)
    if out.suffix.lower() in OUTPUT_SUFFIXES:
        out_dir, name = out.parent, out.stem
    else:
        out_dir, name = out, Path(source.metadata.get("source", "scan")).stem
    header = {"scan": name, **source.scan_start()}
    calibrated = report.pop("setup", None)  # a calibrate hook's setup (EBSD: the fitted PC) describes the scan
    if isinstance(calibrated, dict):
        header["setup"] = calibrated
    start = ScanStart.from_header(header)
    latent = latent_maps(maps, start, clusters, indexer=keep.get("indexer"))
    if "clusters" in latent:
        report["clusters"] = latent.pop("clusters")
    maps = {**maps, **latent}
    summary = {
        "scan": name,
        "points": source.size,
        "indexed": int(np.count_nonzero(start.indexed(maps))),
        "unexplained": int(np.count_nonzero(start.unexplained(maps))),
        **({"novel_points": int(np.count_nonzero(maps["novelty"] >= 0.5))} if "novelty" in maps else {}),
        "seconds": round(seconds, 3),
        "frames_per_second": round(source.size / seconds, 1) if seconds else None,
        "setup": plain(start.setup),
        **report,
        "source": source.metadata.get("source"),
        "status": "complete",
    }
    files = write_outputs(out_dir, name, maps=maps, start=start, summary=summary)
    summary["files"] = [str(p) for p in files]
    return summary

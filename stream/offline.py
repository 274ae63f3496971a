"""``liveindex index FILE``: re-index a saved scan with the workers' own code, in-process."""

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

from .errors import InputError
from .indexer import IndexResult, blas_threads
from .scan_indexer import ScanIndexer
from .sources import ScanSource
from .writers import write_outputs

log = logging.getLogger(__name__)

OUTPUT_SUFFIXES = (".h5", ".ang")


def index_source(source: ScanSource, *, resolution: float = 3.0, threads: int = 0, providers: str = "auto",
                 page_size: int = 256, progress: bool = True, refine_pc: bool = False, report: dict | None = None,
                 **indexing) -> tuple[IndexResult, float]:
    """Index every frame of a source; returns the results and the indexing seconds.

    ``threads`` pages are indexed at once (0: one per core), each by one-thread ONNX sessions:
    the graphs are small, and a core per page beats every core on each graph (2 cores: 1.9x
    against 1.4x), as the live pipeline's one-thread workers do. ``refine_pc``: fit the
    projection centre on the scan's first sure points first (stream/pc_refinement.py); the
    fit goes into ``report["pc_refinement"]``, its time into the seconds."""
    workers = threads or os.cpu_count() or 1
    indexer = ScanIndexer(source.geometry, source.phases, resolution=resolution, threads=1, providers=providers,
                          progress=progress, reason=f"the geometry of {source.metadata.get('source', 'this scan')}",
                          **indexing)
    out = IndexResult.empty(source.size)
    t0 = time.perf_counter()
    if refine_pc:
        fit = fit_scan_pc(indexer, source)
        log.info("%s", fit.describe(source.geometry))
        if report is not None:
            report["pc_refinement"] = {"pc": list(fit.geometry.pc), "given_pc": list(source.geometry.pc),
                                       "points": fit.points, "mean_ncc_before": round(fit.ncc_before, 5),
                                       "mean_ncc_after": round(fit.ncc_after, 5), "convention": "bruker"}
    background = indexer.new_background()
    reading = threading.Lock()  # file readers need not be thread-safe

    def index_page(first: int) -> int:
        count = min(page_size, source.size - first)
        with reading:
            frames = source.read(first, count)
        result = indexer.index(frames, background)
        for name in ("phase_id", "quaternion", "confidence", "method", "score"):
            getattr(out, name)[first:first + count] = getattr(result, name)
        return count

    # Equal pages, a whole number per thread, none over page_size: no thread idles at the end.
    rounds = max(1, math.ceil(source.size / (workers * page_size)))
    page_size = max(1, math.ceil(source.size / (workers * rounds)))
    with blas_threads(1), concurrent.futures.ThreadPoolExecutor(workers) as pool, \
            tqdm(total=source.size, desc="indexing", unit="pattern", disable=not progress) as bar:
        for count in pool.map(index_page, range(0, source.size, page_size)):
            bar.update(count)
    return out, time.perf_counter() - t0


def fit_scan_pc(indexer: ScanIndexer, source: ScanSource):
    """Fit the PC on the sure points among the scan's first PC_SCAN_POINTS, of its most common
    phase, and make ``indexer`` refine at it."""
    from .pc_refinement import SUBSET, fit_pc
    from .scan_indexer import CONFIDENCE_THRESHOLD

    if not indexer.refiners:
        raise InputError("--refine-pc fits the projection centre with refinement; drop --no-refine")
    count = min(source.size, PC_SCAN_POINTS)
    frames = source.read(0, count)
    background = indexer.new_background()
    first = indexer.index(frames, background)
    flat, _ = indexer.preprocess(frames, background)
    indexed = first.phase_id[first.phase_id >= 0]
    phase = int(np.bincount(indexed).argmax()) if len(indexed) else 0
    sure = np.flatnonzero((first.phase_id == phase) & (first.score >= CONFIDENCE_THRESHOLD))[:SUBSET]
    fit = fit_pc(indexer.phases[phase], indexer.geometry, flat[sure], first.quaternion[sure],
                 indexer.preprocess.working_shape, indexer.preprocess.sigma, indexer.preprocess.mask)
    indexer.refine_at(fit.geometry)
    return fit


PC_SCAN_POINTS = 1024  # the first points indexed to find sure ones for the PC fit


def index_file(source: ScanSource, out: Path, **options) -> dict:
    report: dict = {}
    result, seconds = index_source(source, report=report, **options)
    out = Path(out)
    if out.suffix.lower() in OUTPUT_SUFFIXES:
        out_dir, name = out.parent, out.stem
    else:
        out_dir, name = out, Path(source.metadata.get("source", "scan")).stem
    summary = {
        "scan": name,
        "points": source.size,
        "indexed": int(np.count_nonzero(result.phase_id >= 0)),
        "seconds": round(seconds, 3),
        "frames_per_second": round(source.size / seconds, 1) if seconds else None,
        "geometry": source.geometry.to_wire(),
        **report,
        "source": source.metadata.get("source"),
    }
    arrays = {"phase_id": result.phase_id, "quaternion": result.quaternion, "confidence": result.confidence,
              "method": result.method}
    files = write_outputs(out_dir, name, arrays=arrays, nav_shape=source.nav_shape, step=source.step,
                          phases=source.phases, summary=summary)
    summary["files"] = [str(p) for p in files]
    return summary

"""``liveindex index FILE``: re-index a saved scan with the workers' own code, in-process."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .indexer import IndexResult
from .scan_indexer import ScanIndexer
from .sources import ScanSource
from .writers import write_outputs

log = logging.getLogger(__name__)

OUTPUT_SUFFIXES = (".h5", ".ang")


def index_source(source: ScanSource, *, resolution: float = 3.0, threads: int = 0, providers: str = "auto",
                 page_size: int = 256, progress: bool = True, **indexing) -> tuple[IndexResult, float]:
    """Index every frame of a source; returns the results and the indexing seconds."""
    indexer = ScanIndexer(source.geometry, source.phases, resolution=resolution, threads=threads, providers=providers,
                          progress=progress, reason=f"the geometry of {source.metadata.get('source', 'this scan')}",
                          **indexing)
    out = IndexResult.empty(source.size)
    background = indexer.new_background()
    t0 = time.perf_counter()
    pages = range(0, source.size, page_size)
    for first in tqdm(pages, desc="indexing", unit="page", disable=not progress):
        count = min(page_size, source.size - first)
        result = indexer.index(source.read(first, count), background)
        for name in ("phase_id", "quaternion", "confidence", "method", "score"):
            getattr(out, name)[first:first + count] = getattr(result, name)
    return out, time.perf_counter() - t0


def index_file(source: ScanSource, out: Path, **options) -> dict:
    result, seconds = index_source(source, **options)
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
        "source": source.metadata.get("source"),
    }
    arrays = {"phase_id": result.phase_id, "quaternion": result.quaternion, "confidence": result.confidence,
              "method": result.method}
    files = write_outputs(out_dir, name, arrays=arrays, nav_shape=source.nav_shape, step=source.step,
                          phases=source.phases, summary=summary)
    summary["files"] = [str(p) for p in files]
    return summary

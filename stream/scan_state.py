"""The live state of one scan at the sink: one flat map per declared field, filled as
results arrive.

The maps are allocated from the fields the scan's ``scan_start`` declares (like LiberTEM's
UDF result buffers), whatever the modality. Results may arrive out of order, twice, or
before the scan_start (a worker's connection can overtake the publisher's); the first
result for a point wins and the rest are counted as duplicates.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import numpy as np

from liveindex.models.errors import ProtocolError

from .latent_map import LatentMaps, has_latent
from .orientation_map import error_to_truth
from .protocol import Message, ScanStart, check_results
from .timeline import Timeline

log = logging.getLogger(__name__)

TRUTH_PREFIX = "truth_"


class ScanState:
    def __init__(self, start: Message, *, preview_path: Path | None = None, clusters: int | None = None,
                 index_cluster_means: bool = False):
        """``clusters``: the latent cluster map's count (None: HDBSCAN finds it; --clusters);
        ``index_cluster_means``: the sink indexes each cluster's mean pattern (latent_map.py)."""
        self.header = start.header
        spec = self.spec = ScanStart.from_header(start.header)
        self.scan = spec.scan
        self.nav_shape = spec.nav_shape
        self.size = n = spec.size
        self.maps = {f.name: f.allocate(n) for f in spec.fields}
        self.received = np.zeros(n, bool)
        self.latency_s = np.full(n, np.nan, np.float32)  # detector (acquisition) to sink, per point
        self.timeline = Timeline()  # throughput and latency over the run, for the live page's chart
        self.truth = self._truth(start)
        self.error_deg = (np.full(n, np.nan, np.float32)
                          if spec.has_orientations and "quaternion" in self.truth else None)
        self.n_received = 0
        self.frames_by_worker: dict[str, int] = {}  # new points each worker filled
        # Results refused for real points (a NaN or non-unit quaternion): the point stays
        # unfilled, so the page is not acknowledged and its frames are indexed again.
        self.rejected_points = 0
        self.last_page_invalid = 0  # invalid results in the page last added
        self.dropped_points = 0  # points the dispatcher skipped (--preview) and sent as not indexed
        self._summary_cache: tuple | None = None
        self.duplicates = 0
        # Wall clock of the scan's first start (the publisher's word; it survives a sink restart,
        # whose journal replay would otherwise restart the scan's clock).
        t_start = self.header.get("t_start")
        self.t_start = float(t_start) if _is_time(t_start) else time.time()
        self.outcome: tuple[str, str | None] | None = None  # (complete|partial|failed, reason) once finished
        self.t_first_result: float | None = None
        self.t_last_result: float | None = None
        self.end: dict | None = None
        self.finished = False
        self.status: dict = {}
        self.lock = threading.Lock()  # the web thread reads while the loop writes
        self.changes: list[np.ndarray] = []  # indices filled by each accepted page; the live page's deltas
        self.ipf_rgb = np.zeros((n, 3), np.uint8) if spec.has_orientations else None  # filled lazily
        self.coloured = 0  # entries of ``changes`` already coloured
        self._colour_lock = threading.Lock()
        self.models: set[str] = set()  # what the workers answered with
        self.preview_path = preview_path
        self.previews: np.ndarray | None = None  # (n, h, w) uint8 memory map beside the outputs
        # Cluster, boundary and novelty maps where the modality declares an embedding.
        self.latent = (LatentMaps(spec, clusters=clusters, index_means=index_cluster_means)
                       if has_latent(spec) else None)

    def _truth(self, start: Message) -> dict[str, np.ndarray]:
        """Ground truth sent with the scan_start as ``truth_<field>`` buffers (simulations)."""
        truth = {}
        for name, array in start.arrays.items():
            if not name.startswith(TRUTH_PREFIX):
                continue
            field = self.spec.field.get(name[len(TRUTH_PREFIX):])
            if field is None:
                raise ProtocolError(f"scan_start carries {name} but declares no field {name[len(TRUTH_PREFIX):]!r}",
                                    start.header)
            if array.shape != (self.size, *field.shape):
                raise ProtocolError(f"{name} has shape {array.shape}, expected {(self.size, *field.shape)}",
                                    start.header)
            truth[field.name] = array
        return truth

    @property
    def phase_names(self) -> list[str]:
        return [p.name for p in self.spec.phases]

    def add(self, message: Message, *, replaying: bool = False) -> np.ndarray:
        """Fill the points of a result page; returns the mask of the page's new points.

        ``replaying``: the page comes from the journal; its arrival time is the worker's
        (``t_done``), so rates and durations after a sink restart count from the scan's start."""
        broken = self.judge(message)
        a = message.arrays
        indices = a["indices"]
        fresh = ~self.received[indices]
        # A page may repeat an index within itself; keep the first occurrence.
        _, first_pos = np.unique(indices, return_index=True)
        keep = np.zeros(len(indices), bool)
        keep[first_pos] = True
        fresh &= keep
        values = {f.name: a[f.name] for f in self.spec.fields}
        self.last_page_invalid = int(broken.sum())
        if broken.any():
            # A result whose orientation is not a unit quaternion is refused: the point stays
            # open for a valid answer (the page is sent again), it never becomes "not indexed".
            self.rejected_points += int((fresh & broken).sum())
            fresh &= ~broken
        if "confidence" in values:
            values["confidence"] = np.clip(np.nan_to_num(values["confidence"]), 0.0, 1.0)
        idx = indices[fresh]
        with self.lock:
            for name, array in values.items():
                self.maps[name][idx] = array[fresh]
            self.received[idx] = True
            if self.latent is not None:
                self.latent.on_points(self.maps, idx)
            self.changes.append(idx)
            preview = a.get("preview")
            if preview is not None and len(idx):
                self._keep_previews(idx, preview[fresh])
            if "model" in message.header:
                self.models.add(str(message.header["model"])[:300])
            t_done = message.header["timings"].get("t_done")
            now = float(t_done) if replaying and _is_time(t_done) else time.time()
            t_acquired = message.header["timings"].get("t_acquired")
            per_frame = a.get("t_acquired")  # when each frame was acquired (live sources), else the page's
            if per_frame is not None:
                latency = now - per_frame[fresh]
                self.latency_s[idx] = np.where(np.isfinite(latency), np.maximum(latency, 0.0), np.nan)
            elif _is_time(t_acquired):
                self.latency_s[idx] = max(0.0, now - t_acquired)
            if self.error_deg is not None and len(idx):
                truth = {name: t[idx] for name, t in self.truth.items()}
                self.error_deg[idx] = error_to_truth(self.maps["quaternion"][idx], self.maps["phase_id"][idx], truth,
                                                     self.spec.phases)
            # Counters change under the same lock as the maps: ``summary`` caches by version,
            # and must never see the page's points without its counts.
            new = int(fresh.sum())
            worker = str(message.header["worker"])[:100]
            self.frames_by_worker[worker] = self.frames_by_worker.get(worker, 0) + new
            self.n_received += new
            self.duplicates += len(indices) - new
            if worker == "dispatcher":
                self.dropped_points += new
            self.t_first_result = self.t_first_result or now
            self.t_last_result = max(self.t_last_result or now, now)
        return fresh

    def refresh_latent(self, *, final: bool = False) -> None:
        """Recluster and recompute the latent maps (the sink's refresher thread, and once more,
        ``final``, before the files are written); the points whose cluster changed go to the
        live page."""
        if self.latent is None:
            return
        changed = self.latent.finish(self) if final else self.latent.refresh(self)
        if changed is not None and len(changed):
            with self.lock:
                self.changes.append(changed)

    def novel_points(self) -> int:
        """Points in a population no listed phase explains (novelty 0.5 or more): tells a phase
        missing from poor patterns of listed phases, which are both below confidence 0.5."""
        return int(np.count_nonzero((self.latent.novelty >= 0.5) & self.received))

    def judge(self, message: Message) -> np.ndarray:
        """Check a result page against the scan (declared fields, indices inside it; a
        ProtocolError otherwise) and return the mask of its invalid results: orientations
        that are not unit quaternions."""
        check_results(message, self.spec)
        indices = message.arrays["indices"]
        if len(indices) and (indices.min() < 0 or indices.max() >= self.size):
            raise ProtocolError(f"result indices run outside the scan's {self.size} points", message.header)
        q = message.arrays.get("quaternion")
        if q is None or not self.spec.has_orientations:
            return np.zeros(len(indices), bool)
        q = np.nan_to_num(q.astype(np.float64), nan=9.0, posinf=9.0, neginf=9.0)
        return ~(np.abs(np.linalg.norm(q, axis=1) - 1) < 1e-2)

    def _keep_previews(self, idx: np.ndarray, preview: np.ndarray) -> None:
        if self.previews is None and self.preview_path is not None:
            shape = (self.size, *preview.shape[1:])
            path = self.preview_path
            if path.exists():  # a restarted sink: keep what the last one stored
                old = np.load(path, mmap_mode="r+")
                self.previews = old if old.shape == shape and old.dtype == np.uint8 else None
            if self.previews is None:
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    self.previews = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
                    # Reserve the space now: a sparse map written on a full disk dies of SIGBUS.
                    with open(path, "r+b") as f:
                        os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
                except OSError as exc:
                    log.error("no pattern previews for scan %s: cannot reserve %s (%s); results are unaffected",
                              self.scan, path, exc.strerror or exc)
                    self.previews, self.preview_path = None, None
                    return
        if self.previews is not None and preview.shape[1:] == self.previews.shape[1:]:
            self.previews[idx] = preview

    def pattern_preview(self, index: int) -> np.ndarray | None:
        if self.previews is None or not self.received[index]:
            return None
        return np.array(self.previews[index])

    def refresh_colours(self) -> None:
        """Colour the points that arrived since the last call (the live page's IPF map)."""
        from .orientation_map import ipf_colours

        if self.ipf_rgb is None:
            with self.lock:
                self.coloured = len(self.changes)
            return
        with self._colour_lock, self.lock:
            upto = len(self.changes)
            if upto == self.coloured:
                return
            idx = np.concatenate(self.changes[self.coloured:upto])
            q, pid = self.maps["quaternion"][idx].copy(), self.maps["phase_id"][idx].copy()
        with self._colour_lock:  # one colourer at a time, so ``coloured`` only moves forward
            if upto <= self.coloured:
                return
            rgb = ipf_colours(q, pid, self.spec.phases)
            with self.lock:
                self.ipf_rgb[idx] = rgb
                self.coloured = upto

    @property
    def version(self) -> int:
        """How many result pages filled points: the live page's and the caches' clock."""
        return len(self.changes)

    def page_received(self, first: int, count: int) -> bool:
        """Every point of the page first..first+count-1 is in (so it may be acknowledged)."""
        return bool(self.received[max(first, 0):first + count].all()) if 0 <= first < self.size else False

    @property
    def complete(self) -> bool:
        return self.n_received >= self.size

    @property
    def frames_per_second(self) -> float:
        if not self.t_first_result or self.n_received < 2:
            return 0.0
        span = max(self.t_last_result - self.t_start, 1e-3)
        return self.n_received / span

    def median_error(self) -> float | None:
        if self.error_deg is None:
            return None
        errors = self.error_deg[self.received & (self.maps["phase_id"] >= 0)]
        errors = errors[errors == errors]
        return float(np.median(errors)) if len(errors) else None

    def summary(self) -> dict:
        # Under the lock: boolean-mask indexing while the sink's loop sets points corrupted
        # the heap once (numpy sizes the result, then the mask grows under it).
        with self.lock:
            key = (self.version, self.end is not None, self.outcome)
            if self._summary_cache is None or self._summary_cache[0] != key:
                self._summary_cache = (key, self._summary())  # O(points): once per change, not per viewer
            return dict(self._summary_cache[1])

    def _summary(self) -> dict:
        err = self.median_error()
        indexed = int(np.count_nonzero(self.spec.indexed(self.maps) & self.received))
        summary = {
            "scan": self.scan,
            "run": self.header.get("run"),
            "modality": self.spec.modality,
            "points": self.size,
            "received": self.n_received,
            "indexed": indexed,
            "missing": self.size - self.n_received,
            "duplicates": self.duplicates,
            "seconds": round((self.t_last_result or time.time()) - self.t_start, 3),
            "frames_per_second": round(self.frames_per_second, 1),
            "median_error_deg": None if err is None else round(err, 3),
            "status": self.outcome[0] if self.outcome else "running",
            "reason": self.outcome[1] if self.outcome else None,
            "last_result_time": self.t_last_result,
            "frames_by_worker": dict(self.frames_by_worker),
            "rejected_points": self.rejected_points,
            "dropped_points": self.dropped_points,
            "unexplained": int(np.count_nonzero(self.spec.unexplained(self.maps) & self.received)),
        }
        if self.latent is not None and self.latent.clusters.known:
            summary["novel_points"] = self.novel_points()
        latency = self.latency_s[self.received]
        latency = latency[latency == latency]
        if len(latency):
            summary["latency_p50_s"] = round(float(np.percentile(latency, 50)), 4)
            summary["latency_p99_s"] = round(float(np.percentile(latency, 99)), 4)
        if self.error_deg is not None:
            scored = self.received & (self.maps["phase_id"] >= 0)
            e = self.error_deg[scored]
            # NaN: indexed as another phase than the truth's; counted as not within 3 deg.
            summary["within_3deg"] = round(float((e < 3).mean()), 4) if len(e) else None
            if "phase_id" in self.truth:
                summary["wrong_phase"] = int(np.count_nonzero(scored & (self.maps["phase_id"] != self.truth["phase_id"])))
        return summary


MISSING_PHASE_SHARE = 0.01  # unexplained points above this share of the answered ones are counted in a line
MISSING_PHASE_QUESTION = 0.1  # ... and above this share the line asks whether a phase is missing


def missing_phase_warning(summary: dict) -> str | None:
    """The line the log, the page and ``liveindex index`` show where many points fit no listed
    phase (confidence below 0.5, or no phase kept)."""
    unexplained = summary.get("unexplained") or 0
    answered = max(summary.get("received", summary.get("points", 0)) or 0, 1)
    if unexplained < 10 or unexplained < MISSING_PHASE_SHARE * answered:
        return None
    count = f"{unexplained:,}".replace(",", " ") + f" points ({unexplained / answered:.0%})"
    if unexplained < MISSING_PHASE_QUESTION * answered:  # a few noisy patterns in a right scan look like this
        return f"{count} fit no listed phase surely (confidence below 0.5)"
    novel = summary.get("novel_points")
    if novel is not None and novel < max(10, MISSING_PHASE_SHARE * answered):
        # The latent maps see no population that the listed phases leave unexplained: the
        # answers are unsure throughout, not absent for one kind of pattern.
        return (f"{count} fit no listed phase surely (confidence below 0.5), but the latent maps find no population "
                "that no listed phase explains: the patterns are hard to index surely (noise, thickness, the setup) "
                "rather than a phase missing")
    return f"{count} fit no listed phase: is a phase missing? (add it to --phases; or the patterns are too poor to index)"


def _is_time(value) -> bool:
    """A plausible wall-clock time from a peer (seconds since the epoch, 2001..2286)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 1e9 < value < 1e10

"""The live latent maps of a scan whose modality declares an ``embedding`` field: cluster,
boundary and novelty maps (models/latent/clusters.py), the clusters' mean patterns and
what the indexer answered for their points.

The runtime knows no physics here either: it clusters whatever vectors the ``embedding``
field holds. Each arriving point is assigned to its nearest cluster at once
(``on_points``, with its novelty from the neighbours in so far); every ``REFRESH_SECONDS``
the sink's refresher thread recomputes the whole maps (``refresh``; the bounded subsample is
reclustered every few refreshes, models/latent/clusters.py), and the points whose cluster
changed go to the live page as one more change. A cluster's mean pattern is its
mean embedding mapped back through the basis the scan_start carries (no frames needed), and
``ClusterMeanIndexer`` indexes it with the scan's own page indexer, prepared in the sink from
the scan_start as a worker prepares its own (the modality's contract: ``prepare`` and
``pattern_from_features``), so the page says which phase and orientation the indexer gives
each cluster's mean pattern while the scan runs.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time

import numpy as np

log = logging.getLogger(__name__)

EMBEDDING_FIELD = "embedding"
# Optional: a modality whose confidence says "is the answer right" too conservatively to tell an
# unsure listed grain from a missing phase declares this field, the chance that a listed phase
# explains the pattern (spots: models/spots/confidence.py listed); the novelty reads it instead.
LISTED_FIELD = "listed"
QUALITY_FIELD = "score"  # where the modality declares a listed field: the match score the novelty's gate reads
LATENT_MAPS = ("cluster", "boundary", "novelty")  # also the HDF5 prop keys and PNG names
REFRESH_SECONDS = 2.0  # the period where a refresh is cheap (a small scan)
# Where it is not (a 1e6-point scan: 0.4-0.6 s of CPU, 1.1-1.4 s where it reclusters), the
# refresher takes at most about this share of one core, on the sink's host (where the workers
# share it, as in the demo, that is CPU the indexing does not get), ...
REFRESHER_CORE_SHARE = 0.2
# ... but never leaves the map older than this (issue 16: a new cluster map at least every 5 s;
# measured at load 4-5 on 2 cores, a 4.5 s bound here made maps 5.0 s apart at worst).
MAX_REFRESH_SECONDS = 3.5
# Cluster colours (tab20, then repeated): index 0 is "no cluster".
CLUSTER_COLOURS = [[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189], [140, 86, 75],
                   [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207], [174, 199, 232],
                   [255, 187, 120], [152, 223, 138], [255, 152, 150], [197, 176, 213], [196, 156, 148],
                   [247, 182, 210], [199, 199, 199], [219, 219, 141], [158, 218, 229]]
PALETTE = [[0, 0, 0]] + [CLUSTER_COLOURS[i % len(CLUSTER_COLOURS)] for i in range(255)]


def explained_of(spec, arrays: dict) -> np.ndarray | None:
    """(B,) float32 of a page's (or a scan's) fields: each answered point's chance that a listed
    phase explains it, the modality's ``listed`` field where it declares one, else its calibrated
    confidence (the contract's: the chance its answer is right; at most 0.5 where it kept no
    phase), or 1/0 by ``spec.unexplained`` where there is no confidence; NaN where not answered.
    None where the modality answers with no method."""
    if "method" not in arrays:
        return None
    if LISTED_FIELD in arrays:
        # The modality says whether a listed phase explains the pattern, whatever the answer.
        x = np.nan_to_num(np.clip(arrays[LISTED_FIELD].astype(np.float32), 0.0, 1.0), nan=0.0)
    elif "confidence" in arrays and "phase_id" in arrays:
        x = np.nan_to_num(np.clip(arrays["confidence"].astype(np.float32), 0.0, 1.0), nan=0.0)
        x = np.where(arrays["phase_id"] < 0, np.minimum(x, 0.5), x)
    else:
        x = np.where(spec.unexplained(arrays), 0.0, 1.0).astype(np.float32)
    return np.where(arrays["method"] != spec.not_indexed_code, x, np.nan).astype(np.float32)


def quality_of(arrays: dict, explained: np.ndarray | None) -> np.ndarray | None:
    """(B,) float32: each answered point's match score where the modality declares a listed
    field (spots), for the novelty's gate (models/latent/clusters.py QUALITY_GATE); else None."""
    if explained is None or LISTED_FIELD not in arrays or QUALITY_FIELD not in arrays:
        return None
    return np.where(np.isfinite(explained), arrays[QUALITY_FIELD].astype(np.float32), np.nan).astype(np.float32)


def baseline_least_of(spec) -> float:
    """The least baseline of the novelty (models/latent/clusters.py), on the scale of the field
    ``explained_of`` reads for this modality: its listed field where it declares one, else the
    calibrated confidence."""
    from liveindex.models.latent.clusters import BASELINE_LEAST, BASELINE_LEAST_LISTED

    return BASELINE_LEAST_LISTED if LISTED_FIELD in spec.field else BASELINE_LEAST


def has_latent(spec) -> bool:
    f = spec.field.get(EMBEDDING_FIELD)
    return f is not None and len(f.shape) == 1 and f.dtype.startswith("float")


class LatentMaps:
    """One scan's latent maps, beside its ScanState (which calls ``on_points`` under its lock)."""

    def __init__(self, spec, *, clusters: int | None = None, index_means: bool = False):
        """``index_means``: index each cluster's mean pattern in the sink (ClusterMeanIndexer)."""
        # Imported here: the runtime imports no package under models/ but the contract at import
        # time (tests/test_layout.py); these are numpy-only and modality-neutral.
        from liveindex.models.latent.clusters import LatentClusters
        from liveindex.models.latent.encoder import latent_from_wire

        self.spec = spec
        n = spec.size
        self.clusters = LatentClusters(tuple(spec.nav_shape), clusters=clusters, baseline_least=baseline_least_of(spec))
        self.cluster = np.full(n, -1, np.int16)
        self.distance = np.full(n, np.nan, np.float32)
        self.boundary = np.full(n, np.nan, np.float32)
        self.novelty = np.full(n, np.nan, np.float32)
        self.explained = np.full(n, np.nan, np.float32)  # explained_of each point in
        self.quality: np.ndarray | None = None  # spots (a listed field): each point's match score (QUALITY_GATE)
        # The embeddings as float32, converted as the points come in: a refresh neither copies the
        # float16 map under the scan's lock nor converts it whole (0.04-0.08 s of CPU at 1e6 x 16
        # here, and a 64 MB allocation each time); 64 MB held here beside the 32 MB map.
        self.embedding = np.full((n, *spec.field[EMBEDDING_FIELD].shape), np.nan, np.float32)
        self.basis = None
        wire = spec.header.get("latent")
        if wire is not None:
            try:
                self.basis = latent_from_wire(wire)  # a PCA basis or an encoder (its decoder)
            except Exception as exc:  # a bad basis costs the mean patterns only
                log.warning("scan %s: %s; clusters are shown without mean patterns", spec.scan, exc)
        self.refreshed_at_points = 0  # points in at the last refresh
        self.refresh_seconds: list[float] = []
        self.refreshing = threading.Lock()
        self.info: list[dict] = []  # per cluster: id, size, colour, phase, ... (for status.json)
        self.mean_indexer = (ClusterMeanIndexer(spec, self.basis) if index_means and self.basis is not None
                             and self.basis.makes_patterns else None)

    def on_points(self, maps: dict, idx: np.ndarray) -> None:
        """New points: their nearest cluster now and their novelty with the neighbours in so
        far (under the ScanState's lock)."""
        if not len(idx):
            return
        self.embedding[idx] = maps[EMBEDDING_FIELD][idx]
        page = {name: maps[name][idx] for name in ("phase_id", "method", "confidence", LISTED_FIELD, QUALITY_FIELD)
                if name in maps}
        explained = explained_of(self.spec, page)
        if explained is not None:
            self.explained[idx] = explained
            quality = quality_of(page, explained)
            if quality is not None:
                if self.quality is None:
                    self.quality = np.full(len(self.explained), np.nan, np.float32)
                self.quality[idx] = quality
        if not self.clusters.known:
            return
        ids, dist = self.clusters.assign(self.embedding[idx])
        self.cluster[idx], self.distance[idx] = ids, dist
        pooled = pooled_quality = None
        if explained is not None:  # over the rows of these points only (a page: a row or two, and 2 around)
            nx = int(self.spec.nav_shape[-1])
            y0, y1 = int(idx.min()) // nx, int(idx.max()) // nx + 1
            pooled = self.clusters.pooled(self.cluster, self.explained, rows=(y0, y1))[idx - y0 * nx]
            if self.quality is not None:
                pooled_quality = self.clusters.pooled(self.cluster, self.quality, rows=(y0, y1))[idx - y0 * nx]
        self.novelty[idx] = self.clusters.novelty(ids, dist, pooled, pooled_quality)

    def refresh(self, state) -> np.ndarray | None:
        """Recluster and recompute the maps; returns the points whose cluster changed (for the
        live page), None where nothing new came in."""
        with self.refreshing:
            with state.lock:
                if state.n_received == self.refreshed_at_points or state.n_received < 2:
                    return None
                self.refreshed_at_points = state.n_received
                received = state.received.copy()
                explained = np.where(received, self.explained, np.nan) if "method" in state.maps else None
                quality = None
                if explained is not None and self.quality is not None:
                    quality = np.where(received, self.quality, np.nan)
            t0 = time.perf_counter()
            # Read without the lock: points coming in meanwhile write rows that ``received`` leaves out.
            out = self.clusters.refresh(self.embedding, received, explained, quality)
            self.refresh_seconds.append(time.perf_counter() - t0)
            with state.lock:
                # Points that came in meanwhile keep their on-arrival assignment.
                take = received
                changed = np.flatnonzero(take & (self.cluster != out["cluster"]))
                for name in ("cluster", "distance", "boundary", "novelty"):
                    getattr(self, name)[take] = out[name][take]
            # Outside the lock (a pass over the map a cluster: 0.1 s at 1e6 points that the sink's
            # loop need not wait for); points coming in meanwhile may or may not count.
            info = self._describe(state)
            if self.mean_indexer is not None:
                self.mean_indexer.annotate(info, self.clusters)
            self.info = info
            return changed

    def finish(self, state, wait: float = 30.0) -> np.ndarray | None:
        """The last refresh of a finished scan: its clusters with their mean patterns indexed
        where the sink's indexer is ready within ``wait`` s; the indexer is then let go."""
        if self.mean_indexer is not None:
            self.mean_indexer.wait(wait)
            self.refreshed_at_points = -1  # refresh even where no point came in since
        changed = self.refresh(state)
        if self.mean_indexer is not None:
            self.mean_indexer.close()
            self.mean_indexer = None
        return changed

    def _describe(self, state) -> list[dict]:
        """Each cluster: id, size, colour, unexplained share, and what the indexer answered for
        its points (the commonest phase and its share)."""
        from liveindex.models.latent.clusters import NOVEL

        out = []
        phase = state.maps.get("phase_id")
        names = state.phase_names
        for c in self.clusters.describe():
            mine = self.cluster == c["id"]
            item = {**c, "colour": PALETTE[1 + c["id"] % 255]}
            if phase is not None and mine.any():
                counts = np.bincount(phase[mine].astype(np.int64) + 1, minlength=len(names) + 1)
                best = int(counts.argmax())
                item["phase"] = names[best - 1] if best > 0 else "not indexed"
                item["phase_share"] = round(float(counts[best] / counts.sum()), 3)
                if best > 0 and "quaternion" in state.maps:
                    # The orientation of the point nearest the cluster's mean among those of its
                    # commonest phase: a mean of orientations needs the crystal symmetry.
                    members = np.flatnonzero(mine & (phase == best - 1))
                    near = self.distance[members]
                    nearest = members[np.nanargmin(near)] if np.isfinite(near).any() else None
                    if nearest is not None:
                        from .orientation_map import euler_degrees

                        item["euler_deg"] = [round(v, 1) for v in euler_degrees(
                            state.maps["quaternion"][nearest].astype(float))]
            item["novel"] = bool(c["novel_share"] >= NOVEL)  # most of its points novel
            out.append(item)
        return out

    def layer(self, name: str, idx) -> np.ndarray:
        if name == "cluster":
            c = self.cluster[idx].astype(np.int64)
            return np.where(c >= 0, 1 + c % 255, 0).astype(np.uint8)
        values = np.nan_to_num(getattr(self, name)[idx], nan=0.0)
        top = 1.0 if name == "novelty" else 3.0  # boundary: 1 is the scan's median, 3 a clear boundary
        return (np.clip(values / top, 0, 1) * 255).astype(np.uint8)

    def live_maps(self) -> list[dict]:
        return [{"name": "cluster", "title": "Clusters (latent)", "kind": "palette", "colours": PALETTE, "labels": [],
                 "legend": "clusters"},
                {"name": "boundary", "title": "Boundaries (latent)", "kind": "scale", "range": [0, 3]},
                {"name": "novelty", "title": "Novelty (latent)", "kind": "scale", "range": [0, 1]}]

    def maps(self) -> dict[str, np.ndarray]:
        """The finished scan's maps (int16 cluster, -1 none; float32 boundary and novelty)."""
        return {"cluster": self.cluster.copy(), "boundary": self.boundary.copy(), "novelty": self.novelty.copy()}

    def mean_pattern(self, cluster_id: int) -> np.ndarray | None:
        """(h, w) float32: the cluster's mean embedding mapped back through the basis."""
        centre = self.clusters.centre(cluster_id)
        if centre is None or self.basis is None or len(centre) != self.basis.dims:
            return None
        return self.basis.reconstruct(centre).reshape(self.basis.feature_shape)


def index_mean_patterns(centres, start, basis, indexer) -> list[dict | None]:
    """What ``indexer`` answers for each cluster's mean pattern (its centre, a mean embedding,
    through ``basis`` and the modality's ``pattern_from_features``): phase name, Euler angles
    (deg) and confidence as far as the modality answers them; all None where the modality
    makes no pattern of a feature vector or the indexer fails (the maps stand without it)."""
    from liveindex.models import modality as modalities

    if not len(centres):
        return []
    if not basis.makes_patterns:  # the fixed basis' low-pass sketch: nothing an indexer can answer for
        return [None] * len(centres)
    try:
        frames = modalities.load(start.modality).pattern_from_features(
            basis.reconstruct(np.stack(centres)), basis.feature_shape, start.pattern_shape)
        if frames is None:
            return [None] * len(centres)
        fields = indexer.index(frames)
    except Exception as exc:
        log.warning("scan %s: the clusters' mean patterns were not indexed (%s: %s)", start.scan,
                    type(exc).__name__, exc)
        return [None] * len(centres)
    out = []
    for k in range(len(centres)):
        mean = {}
        if "phase_id" in fields:
            pid = int(fields["phase_id"][k])
            mean["phase"] = start.phases[pid].name if 0 <= pid < len(start.phases) else None
        if "quaternion" in fields and mean.get("phase"):
            from .orientation_map import euler_degrees

            mean["euler_deg"] = [round(v, 2) for v in euler_degrees(fields["quaternion"][k].astype(float))]
        if "confidence" in fields:
            mean["confidence"] = round(float(fields["confidence"][k]), 4)
        out.append(mean)
    return out


class ClusterMeanIndexer:
    """The sink's own page indexer for one scan, for the clusters' mean patterns only.

    Prepared once, in a thread of its own (a dictionary or template library may take seconds
    to load, more to build: the refresher does not wait), from the scan_start as a worker
    prepares it, with the modality's default options (a worker's command-line options are not
    the sink's to know). It costs the sink's host one more indexer's memory; ``liveindex sink
    --index-cluster-means off`` spares it. A mean pattern is indexed again only when its
    cluster's centre has moved."""

    def __init__(self, spec, basis):
        self.spec, self.basis = spec, basis
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cluster-means")
        self.future = None
        self.known: dict[int, tuple[bytes, dict | None]] = {}  # cluster id -> (its centre's bytes, the answer)

    def _indexer(self):
        if self.future is None:
            from liveindex.models import modality as modalities

            def prepare():
                modality = modalities.load(self.spec.modality)
                if type(modality).pattern_from_features is modalities.Modality.pattern_from_features:
                    return None  # it makes no pattern of a feature vector: nothing to index
                header = {**self.spec.header, "setup": modality.check_setup(self.spec.setup, self.spec.pattern_shape)}
                return modality.prepare(header, reason=f"scan {self.spec.scan}'s cluster means")

            self.future = self.pool.submit(prepare)
        if not self.future.done():
            return None
        try:
            indexer = self.future.result()
        except Exception as exc:  # once: the maps and the page stand without it
            log.warning("scan %s: no indexer for the clusters' mean patterns (%s: %s)", self.spec.scan,
                        type(exc).__name__, exc)
            indexer = None
        if indexer is None:
            self.basis = None  # asked no more
        return indexer

    def wait(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for the indexer (the finished scan's files want the answers)."""
        if self.basis is not None:
            self._indexer()
            concurrent.futures.wait([self.future], timeout=timeout)

    def annotate(self, items: list[dict], clusters) -> None:
        """Add ``mean_pattern_indexed`` to each cluster's item, indexing the moved ones."""
        if self.basis is None or not items:
            return
        indexer = self._indexer()
        if indexer is None:
            return
        centres = {c["id"]: clusters.centre(c["id"]) for c in items}
        moved = [i for i, c in centres.items() if c is not None and self.known.get(i, (None,))[0] != c.tobytes()]
        answers = index_mean_patterns([centres[i] for i in moved], self.spec, self.basis, indexer)
        for i, answer in zip(moved, answers):
            self.known[i] = (centres[i].tobytes(), answer)
        for item in items:
            answer = self.known.get(item["id"], (None, None))[1]
            if answer is not None:
                item["mean_pattern_indexed"] = answer

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def refresh_pause(period: float, spent: float, cpu: float) -> float:
    """Seconds to wait after a refresh that took ``spent`` seconds (``cpu`` of them this
    thread's CPU time): the next starts ``period`` after this one where the refresh is cheap,
    later where it is not so that the thread keeps to REFRESHER_CORE_SHARE of a core, but at
    most MAX_REFRESH_SECONDS after it; where even that is too short (a refresh slower than the
    promise, a very loaded host) a pause of half its CPU time still leaves the sink's loop most
    of a core. CPU time, not wall time, sets the share: on a loaded machine the wall time
    counts the other processes' turns too (a wall-time pause made the map new every 3.5-6.3 s
    at load 4.5 on 2 cores)."""
    start_to_start = min(max(period, cpu / REFRESHER_CORE_SHARE), MAX_REFRESH_SECONDS)
    return max(start_to_start - spent, 0.5 * cpu)


class LatentRefresher(threading.Thread):
    """The sink's thread that refreshes the latent maps of running scans every
    ``REFRESH_SECONDS`` (0.5-1.4 s of CPU at 1e6 points: never in the sink's loop)."""

    def __init__(self, scans, *, stop_event: threading.Event, period: float = REFRESH_SECONDS):
        super().__init__(name="latent-refresh", daemon=True)
        self.scans = scans  # () -> the ScanStates held now
        self.stop_event = stop_event
        self.period = period
        self.error: BaseException | None = None

    def run(self) -> None:
        wait = self.period
        while not self.stop_event.wait(wait):
            t0, c0 = time.perf_counter(), time.thread_time()
            for state in list(self.scans()):
                if state.latent is None or state.finished:
                    continue
                try:
                    state.refresh_latent()
                except Exception as exc:  # the maps wait for the next refresh; the sink goes on
                    self.error = exc
                    log.error("scan %s: latent maps not refreshed (%s: %s)", state.scan, type(exc).__name__, exc,
                              exc_info=True)
            spent, cpu = time.perf_counter() - t0, time.thread_time() - c0
            wait = refresh_pause(self.period, spent, cpu)

    def maybe_raise(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error

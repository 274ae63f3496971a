"""Prometheus metrics, one registry per process, with the conventional names and units."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class SinkMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.frames_received = Counter("liveindex_frames_received", "Result frames received by the sink", registry=r)
        self.frames_indexed = Counter("liveindex_frames_indexed", "Frames indexed with a phase (not -1)", registry=r)
        self.duplicates = Counter("liveindex_duplicate_results", "Results for points already filled, ignored", registry=r)
        self.bad_messages = Counter("liveindex_bad_messages", "Messages that failed to parse or validate", registry=r)
        self.latency = Histogram("liveindex_frame_latency_seconds", "Latency per frame from acquisition at the detector to the sink",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.frames_per_second = Gauge("liveindex_frames_per_second", "Frames received per second, last 2 s", registry=r)
        self.queue_depth = Gauge("liveindex_queue_depth_frames", "Frames published but not yet indexed", registry=r)
        self.frames_by_method = Counter("liveindex_frames_by_method", "Frames received, by the method that answered "
                                        "(the scan's modality's labels; EBSD: nn, tm, tm+refined, nn+refined, none)",
                                        ["method"], registry=r)
        self.backlog = Gauge("liveindex_backlog_frames", "Frames acquired but not yet sent to a worker (memory and disk)",
                             registry=r)
        self.backlog_spilled = Gauge("liveindex_backlog_spilled_frames", "Frames of the backlog spilled to disk",
                                     registry=r)
        self.frames_dropped = Gauge("liveindex_frames_dropped", "Frames dropped by the dispatcher in preview-only mode "
                                    "(current scan)", registry=r)
        self.workers_up = Gauge("liveindex_workers_up", "Workers the dispatcher heard from recently", registry=r)
        self.progress = Gauge("liveindex_scan_progress_ratio", "Fraction of the current scan's points received", registry=r)
        self.error_median = Gauge("liveindex_disorientation_median_degrees",
                                  "Median disorientation to ground truth (simulated scans)", registry=r)


class WorkerMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.frames = Counter("liveindex_worker_frames", "Frames indexed by this worker", registry=r)
        self.pages = Counter("liveindex_worker_pages", "Pages indexed by this worker", registry=r)
        self.bad_messages = Counter("liveindex_bad_messages", "Messages that failed to parse or validate", registry=r)
        self.page_seconds = Histogram("liveindex_worker_page_seconds", "Time to index one page", buckets=LATENCY_BUCKETS,
                                      registry=r)

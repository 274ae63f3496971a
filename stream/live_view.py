"""What the live page is shown, read from the sink: status, map updates with only the points
that changed, point details, PNGs and output files.

The page knows no modality: ``status.json`` lists the maps the scan's fields allow (with
their kind, legend and colours), the methods with their colours and the setup as label /
value rows. A client that has seen ``version`` v of a scan (v = number of accepted result
pages) gets the points of pages v.. as parallel arrays, one per map; a new client, or one
far behind, gets the whole map once. Arrays travel base64-encoded in JSON over server-sent
events, so a 1000x1000 scan costs about 6 MB once and then a few kB per update.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path

import numpy as np

from .latent_map import LATENT_MAPS
from .orientation_map import PHASE_COLOURS, euler_degrees, ipf_key_png
from .protocol import plain
from .scan_state import ScanState, missing_phase_warning
from .writers import map_images, png_bytes

# The dispatcher reports twice a second; silent longer than this, its worker list is old news.
DISPATCHER_SILENT_SECONDS = 5.0


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def live_maps(state: ScanState) -> list[dict]:
    """The maps the page draws for this scan: name, title, kind and legend.

    Kinds: ``rgb`` (3 bytes a point), ``palette`` (a byte a point indexing ``colours``, with
    ``labels``), ``scale`` (a byte a point, 0..255 over ``range``, viridis)."""
    spec = state.spec
    maps = []
    if spec.has_orientations:
        names = state.phase_names
        maps.append({"name": "ipf", "title": "Orientation (IPF-Z)", "kind": "rgb",
                     "keys": [{"phase": name, "url": f"/keys/ipf-{i}.png"} for i, name in enumerate(names)]})
        colours = [[0, 0, 0]] + [PHASE_COLOURS[i % len(PHASE_COLOURS)].tolist() for i in range(len(names))]
        maps.append({"name": "phase", "title": "Phase", "kind": "palette", "colours": colours,
                     "labels": ["not indexed", *names]})
    if "confidence" in spec.field:
        maps.append({"name": "confidence", "title": "Confidence", "kind": "scale", "range": [0, 1]})
    if "method" in spec.field:
        maps.append({"name": "method", "title": "Method", "kind": "palette",
                     "colours": [list(m.rgb) for m in spec.methods],
                     "labels": [m.description or m.label for m in spec.methods]})
    if state.latent is not None:
        maps.extend(state.latent.live_maps())
    return maps


def _layer(state: ScanState, name: str, idx) -> np.ndarray:
    if name == "ipf":
        return state.ipf_rgb[idx]
    if name == "phase":
        return (state.maps["phase_id"][idx] + 1).astype(np.uint8)  # 0 = not indexed
    if name == "confidence":
        return (np.clip(state.maps["confidence"][idx], 0, 1) * 255).astype(np.uint8)
    if name in LATENT_MAPS and state.latent is not None:
        return state.latent.layer(name, idx)
    return state.maps[name][idx].astype(np.uint8)  # a palette field (method)


def map_update(state: ScanState, since: int) -> tuple[dict | None, int]:
    """The points filled after page ``since`` (all of them if ``since`` < 0), and the new version."""
    state.refresh_colours()
    with state.lock:
        upto = state.coloured
        if since == upto:
            return None, upto
        full = since < 0 or since > upto
        if not full:
            idx = np.concatenate(state.changes[since:upto]) if upto > since else np.zeros(0, np.int64)
            full = len(idx) > state.size // 4  # cheaper to send the dense map
        if full:
            idx = slice(None)
        maps = live_maps(state)
        update = {"scan": state.scan, "nav": list(state.nav_shape), "full": full, "maps": maps,
                  "layers": {m["name"]: _b64(_layer(state, m["name"], idx)) for m in maps}}
        if full:
            update["received"] = _b64(state.received.astype(np.uint8))
        else:
            update["idx"] = _b64(idx.astype(np.uint32))
    return update, upto


def point_details(state: ScanState, index: int) -> dict:
    """Everything known about one scan point, for the page's click."""
    spec = state.spec
    ny, nx = state.nav_shape
    with state.lock:
        received = bool(state.received[index])
        values = {name: array[index].copy() for name, array in state.maps.items()}
        error = state.error_deg[index] if state.error_deg is not None else np.nan
    details = {"index": index, "x": index % nx, "y": index // nx, "received": received, "rows": []}
    rows = details["rows"]
    if received:
        phase_id = int(values["phase_id"]) if "phase_id" in values else None
        if phase_id is not None:
            details["phase"] = state.phase_names[phase_id] if phase_id >= 0 else None
            rows.append(["phase", details["phase"] or "not indexed"])
        for f in spec.fields:
            if f.name in ("phase_id", "quaternion") or f.shape != ():
                continue
            value = values[f.name]
            if f.name == "method":
                method = spec.methods[int(value)] if int(value) < len(spec.methods) else None
                details["method"] = method.label if method else str(int(value))
                rows.append(["method", (method.description or method.label) if method else str(int(value))])
            else:
                shown = round(float(value), 4) if f.dtype.startswith("float") else int(value)
                if isinstance(shown, float) and not np.isfinite(shown):
                    shown = None  # JSON has no NaN (a fit where the method has none)
                details[f.name] = shown
                rows.append([f.name, "-" if shown is None else f"{shown:.3f}" if isinstance(shown, float) else str(shown)])
        if spec.has_orientations and phase_id is not None and phase_id >= 0:
            q = values["quaternion"].astype(float)
            details["quaternion"] = [round(float(v), 5) for v in q]
            details["euler_deg"] = [round(v, 2) for v in euler_degrees(q)]
            rows.append(["Euler (Bunge)", ", ".join(f"{v:.1f}°" for v in details["euler_deg"])])
            rows.append(["quaternion", ", ".join(f"{v:.4f}" for v in details["quaternion"])])
        if error == error:
            details["error_deg"] = round(float(error), 3)
            rows.append(["error vs truth", f"{error:.2f}°"])
        if state.latent is not None:
            with state.lock:
                cluster = int(state.latent.cluster[index])
                boundary, novelty = float(state.latent.boundary[index]), float(state.latent.novelty[index])
            details["cluster"] = cluster if cluster >= 0 else None
            rows.append(["cluster", str(cluster) if cluster >= 0 else "none yet"])
            for name, value in (("boundary", boundary), ("novelty", novelty)):
                details[name] = round(value, 3) if value == value else None
                rows.append([name, f"{value:.2f}" if value == value else "-"])
    else:
        rows.append(["state", "not in yet"])
    details["pattern"] = state.pattern_preview(index) is not None
    return details


class SinkView:
    """The sink as the HTTP server reads it (the server calls these from its threads)."""

    def __init__(self, sink):
        self.sink = sink
        self.metrics_registry = sink.metrics.registry
        self._png_cache: dict[tuple, bytes] = {}

    def status(self) -> dict:
        sink = self.sink
        state = sink.current
        if state is None:
            return {"scan": None}
        status = dict(state.status if state.finished and state.status else state.summary())
        dispatcher = sink.dispatcher_status if sink.dispatcher_status.get("scan") == state.scan else {}
        workers = [dict(w) for w in dispatcher.get("workers", []) if isinstance(w, dict)]
        silent = time.monotonic() - sink.dispatcher_heard
        for worker in workers:  # the dispatcher's last word may be old: say what is known now
            if state.finished:
                worker["state"] = "done"
            elif silent > DISPATCHER_SILENT_SECONDS:
                worker["state"] = f"no word for {silent:.0f} s"
        rate = 0.0 if state.finished else sink.rate_now
        latency = [v for _, v in tuple(sink.latency_window)]  # one C-level copy: the loop appends meanwhile
        spec = state.spec
        status.update({
            "version": state.version, "frames_per_second_now": rate,
            "latency_now_s": float(np.median(latency)) if latency else None,
            "timeline": state.timeline.to_wire(),
            "seconds_left": (state.size - state.n_received) / rate if rate > 0 else None,
            "workers_up": len(workers), "workers": workers,
            "queue_depth": dispatcher.get("queue_depth"), "backlog_frames": dispatcher.get("backlog_frames"),
            "spilled_frames": dispatcher.get("spilled_frames"), "dropped_frames": dispatcher.get("dropped_frames"),
            "modality": spec.modality, "setup": plain(spec.setup), "setup_rows": _setup_rows(spec),
            "phases": state.phase_names,
            "phase_records": [p.to_wire(payload=False) for p in spec.phases],
            "methods": [m.to_wire() for m in spec.methods],
            "fields": [f.to_wire()[:3] for f in spec.fields],
            "maps": live_maps(state),
            "pattern_shape": list(spec.pattern_shape), "metadata": plain(spec.metadata),
            "nav_shape": list(state.nav_shape), "bad_messages": sink.receiver.bad_total,
            "models": sorted(state.models),
        })
        status["missing_phase_warning"] = missing_phase_warning(status)  # the log's line, word for word
        if state.latent is not None:
            status["clusters"] = state.latent.info
            seconds = state.latent.refresh_seconds
            status["latent_refresh_s"] = round(seconds[-1], 3) if seconds else None
        return status

    def map_update(self, scan: str | None, since: int) -> tuple[dict | None, str | None, int]:
        """For the live page's event stream: what changed in the current scan since ``since``."""
        state = self.sink.current
        if state is None:
            return None, None, -1
        update, version = map_update(state, since if state.scan == scan else -1)
        return update, state.scan, version

    def point_details(self, index: int) -> dict | None:
        state = self.sink.current
        if state is None or not 0 <= index < state.size:
            return None
        return point_details(state, index)

    def pattern_png(self, index: int) -> bytes | None:
        state = self.sink.current
        if state is None or not 0 <= index < state.size:
            return None
        preview = state.pattern_preview(index)
        return None if preview is None else png_bytes(np.repeat(preview[..., None], 3, axis=2), min_width=1)

    def cluster_png(self, cluster: str) -> bytes | None:
        """A cluster's mean pattern (its mean embedding through the scan's basis), grey, stretched."""
        state = self.sink.current
        if state is None or state.latent is None or not cluster.isdigit():
            return None
        image = state.latent.mean_pattern(int(cluster))
        if image is None or not np.isfinite(image).all():
            return None
        lo, hi = float(image.min()), float(image.max())
        grey = ((image - lo) * (255.0 / max(hi - lo, 1e-12))).astype(np.uint8)
        return png_bytes(np.repeat(grey[..., None], 3, axis=2), min_width=128)

    def ipf_key_png(self, phase: str) -> bytes | None:
        """The IPF key of the current scan's phase number ``phase`` (its Laue class's)."""
        state = self.sink.current
        if state is None or not state.spec.has_orientations or not phase.isdigit():
            return None
        index = int(phase)
        return ipf_key_png(state.spec.phases[index].space_group) if index < len(state.spec.phases) else None

    def map_png(self, name: str) -> bytes | None:
        state = self.sink.current
        if state is None:
            return None
        key = (state.scan, state.version, name)
        if key not in self._png_cache:
            with state.lock:
                maps = {k: v.copy() for k, v in state.maps.items()}
            images = map_images(maps, state.spec)
            self._png_cache = {(state.scan, state.version, n): png_bytes(rgb) for n, rgb in images.items()}
        return self._png_cache.get(key)

    def file_path(self, name: str) -> Path | None:
        sink = self.sink
        for summary in sink.finished:
            if name in summary.get("files", []) and Path(name).name == name:
                path = sink.out_dir / name
                return path if path.is_file() else None
        return None


def _setup_rows(spec) -> list[list[str]]:
    """The setup as the modality describes it; as plain key/value rows where this sink cannot
    load the modality (a sink needs none of them to run)."""
    from liveindex.models import modality as modalities

    try:
        rows = modalities.load(spec.modality).describe_setup(spec.setup)
    except Exception:  # an unknown modality, or one whose package is not installed here
        rows = [(str(k), str(v)) for k, v in plain(spec.setup).items()]
    return [[str(k)[:60], str(v)[:200]] for k, v in rows]

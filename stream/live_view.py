"""What the live page is sent: map updates with only the points that changed, point
details, and the IPF colour key.

A client that has seen ``version`` v of a scan (v = number of accepted result pages)
gets the points of pages v.. as parallel arrays; a new client, or one far behind, gets
the whole map once. Arrays travel base64-encoded in JSON over server-sent events, so a
1000x1000 scan costs about 6 MB once and then a few kB per update.
"""

from __future__ import annotations

import base64
import functools
import io

import numpy as np

from .protocol import METHODS
from .scan_state import ScanState
from .writers import ORIX_LOCK


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


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
        update = {
            "scan": state.scan,
            "nav": list(state.nav_shape),
            "full": full,
            "ipf": _b64(state.ipf_rgb[idx]),
            "phase": _b64((state.phase_id[idx] + 1).astype(np.uint8)),  # 0 = not indexed
            "confidence": _b64((np.clip(state.confidence[idx], 0, 1) * 255).astype(np.uint8)),
            "method": _b64(state.method[idx]),
        }
        if full:
            update["received"] = _b64(state.received.astype(np.uint8))
        else:
            update["idx"] = _b64(idx.astype(np.uint32))
    return update, upto


def point_details(state: ScanState, index: int) -> dict:
    """Everything known about one scan point, for the page's click."""
    from orix.quaternion import Rotation

    ny, nx = state.nav_shape
    with state.lock:
        received = bool(state.received[index])
        phase_id = int(state.phase_id[index])
        q = state.quaternion[index].astype(float)
        details = {
            "index": index, "x": index % nx, "y": index // nx, "received": received,
            "phase": state.header["phases"][phase_id] if phase_id >= 0 else None,
            "phase_id": phase_id,
            "confidence": round(float(state.confidence[index]), 4),
            "method": METHODS[int(state.method[index])],
        }
        error = state.error_deg[index] if state.error_deg is not None else np.nan
    if received and phase_id >= 0:
        details["quaternion"] = [round(v, 5) for v in q]
        with ORIX_LOCK:
            euler = Rotation(q).to_euler(degrees=True)[0]
        details["euler_deg"] = [round(float(v), 2) for v in euler]
    if error == error:
        details["error_deg"] = round(float(error), 3)
    details["pattern"] = state.pattern_preview(index) is not None
    return details


@functools.lru_cache(maxsize=8)
def ipf_key_png(phase: str) -> bytes:
    """orix's IPF-Z colour key for the phase's Laue group, as a small PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from orix.plot import IPFColorKeyTSL

    from liveindex.models.phases import point_group

    fig = IPFColorKeyTSL(point_group(phase).laue).plot(return_figure=True)
    fig.set_size_inches(2.0, 1.7)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight", transparent=True)
    plt.close(fig)
    return buffer.getvalue()

"""Is the live page responsive at 1000x1000 points? A real sink takes result pages over
loopback at a steady rate while headless Chromium shows the page; prints the time to
load the whole map, the cost of each update in the browser, updates per second, the size
of an update, and click-to-details time.

    python benchmarks/live_page.py [--scan 1000x1000] [--rate 50000] [--seconds 20]

Needs chromium on PATH and the playwright package (the test extra has it).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scan", default="1000x1000")
    parser.add_argument("--rate", type=float, default=50_000, help="result points per second into the sink")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long to watch")
    parser.add_argument("--page", type=int, default=1000, help="points per result page")
    args = parser.parse_args()

    import zmq
    from playwright.sync_api import sync_playwright

    from liveindex.models.ebsd.geometry import DetectorGeometry
    from liveindex.models.ebsd.master_patterns import phase_record
    from liveindex.models.ebsd.results import FIELDS, METHOD_CODE, METHODS
    from liveindex.models.ebsd.simulator import parse_nav_shape
    from liveindex.stream.protocol import encode
    from liveindex.stream.sink import Sink

    ny, nx = parse_nav_shape(args.scan)
    n = ny * nx
    sink = Sink(out_dir=tempfile.mkdtemp(prefix="liveindex-page-"), http_port=0)
    threading.Thread(target=sink.run, daemon=True).start()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(sink.endpoint)
    sock.send_multipart(encode("scan_start", {"scan": "big", "modality": "ebsd", "nav_shape": [ny, nx],
                                              "step": [1.0, 1.0], "pattern_shape": [60, 60], "dtype": "uint8",
                                              "setup": DetectorGeometry().to_wire(),
                                              "phases": [phase_record("ni").to_wire()],
                                              "fields": [f.to_wire() for f in FIELDS],
                                              "methods": [m.to_wire() for m in METHODS],
                                              "metadata": {"source": "benchmark"}}))
    rng = np.random.default_rng(0)
    grains = rng.normal(size=(400, 4)).astype(np.float32)
    grains /= np.linalg.norm(grains, axis=1, keepdims=True)
    grain_of = (np.arange(n) // nx // (ny // 20 or 1)) * 20 + (np.arange(n) % nx) // (nx // 20 or 1)
    preview = rng.integers(0, 255, (args.page, 30, 30), np.uint8)
    sent = 0

    def feed(until_points: int) -> None:
        nonlocal sent
        t0, start = time.perf_counter(), sent
        while sent < min(until_points, n):
            due = start + int((time.perf_counter() - t0) * args.rate)
            while sent < min(due, until_points, n):
                count = min(args.page, n - sent)
                idx = np.arange(sent, sent + count, dtype=np.int64)
                sock.send_multipart(encode(
                    "results", {"scan": "big", "first": sent, "count": count, "worker": "bench",
                                "timings": {"t_acquired": time.time()}},
                    {"indices": idx, "phase_id": np.zeros(count, np.int16),
                     "quaternion": grains[grain_of[idx] % len(grains)],
                     "confidence": rng.random(count, np.float32),
                     "method": np.full(count, METHOD_CODE["tm"], np.uint8), "score": np.zeros(count, np.float32),
                     "preview": preview[:count]}))
                sent += count
            time.sleep(0.005)

    feed(n // 2)  # half the map in before the browser opens: the full-map load is the heavy case
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.add_init_script("""
            window.bench = {apply: [], bytes: [], t: []};
            const wrap = () => {
              const orig = window.applyMap;
              window.applyMap = u => { const t = performance.now(); orig(u);
                bench.apply.push(performance.now() - t); bench.t.push(performance.now());
                bench.bytes.push((u.idx || u.received).length); };
            };
            document.addEventListener('DOMContentLoaded', wrap);""")
        t_open = time.perf_counter()
        page.goto(sink.http.url)
        page.wait_for_function("window.bench.apply.length > 0", timeout=120_000)
        first_map_s = time.perf_counter() - t_open
        first_apply_ms = page.evaluate("bench.apply[0]")
        feeder = threading.Thread(target=feed, args=(n,), daemon=True)
        feeder.start()
        time.sleep(args.seconds)  # watch the page while points stream in
        apply_ms = page.evaluate("bench.apply.slice(1)")
        times = page.evaluate("bench.t.slice(1)")
        sizes = page.evaluate("bench.bytes.slice(1)")
        t0 = time.perf_counter()
        box = page.locator("#map-ipf").bounding_box()
        page.mouse.click(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.2)
        page.wait_for_function("document.getElementById('pattern').naturalWidth > 0", timeout=30_000)
        click_s = time.perf_counter() - t0
        received = page.evaluate("+document.body.dataset.progress")
        browser.close()
    sink.stop_event.set()
    sink.close()
    span_s = (times[-1] - times[0]) / 1000 if len(times) > 1 else float("nan")
    print(f"{nx}x{ny} points, {args.rate:.0f} points/s into the sink, watched {args.seconds:.0f} s")
    print(f"open page to full map drawn: {first_map_s:.2f} s (browser applies it in {first_apply_ms:.0f} ms)")
    print(f"updates: {len(apply_ms)} in {span_s:.1f} s = {len(apply_ms) / span_s:.1f}/s; browser cost per update "
          f"median {statistics.median(apply_ms):.1f} ms, max {max(apply_ms):.1f} ms; update size median "
          f"{statistics.median(sizes) / 1e3:.1f} kB of base64 indices")
    print(f"click to pattern and details shown: {click_s * 1e3:.0f} ms; map progress at the end "
          f"{received * 100:.1f}% (loose check: > 50%)")
    return 0 if received > 0.5 and apply_ms else 1


if __name__ == "__main__":
    sys.exit(main())

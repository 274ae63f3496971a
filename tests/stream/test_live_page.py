"""The live page in a real headless Chromium during a running demo scan.

Needs Debian's chromium (``apt-get install chromium``; .ci/run installs it) and the
``playwright`` package, which drives it over the DevTools protocol. The screenshot is
kept in ``test-artifacts/`` (or $LIVEINDEX_ARTIFACTS).
"""

import os
import shutil
import threading
from pathlib import Path

import pytest

from liveindex.stream.demo import run_demo

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("LIVEINDEX_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))


# The page knows no modality: the runtime's test modality (a cubic and a hexagonal phase, an
# extra scalar and a vector field) and EBSD end to end, each with what its click must show.
CASES = {
    "ebsd": {"settings": {"noise": "moderate"}, "words": ("ni", "confidence", "Euler", "PC (Bruker)"), "preview": 30,
             "maps": ["ipf", "phase", "confidence", "method", "cluster", "boundary", "novelty"], "mean_pattern": True},
    "fake": {"settings": {}, "words": ("confidence", "Euler", "iq", "gain"), "preview": 16,
             "maps": ["ipf", "phase", "confidence", "method", "cluster", "boundary", "novelty"],
             "mean_pattern": False},  # its scan_start carries no latent basis: clusters without a mean pattern
}


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: apt-get install chromium")
@pytest.mark.parametrize("modality", sorted(CASES))
def test_live_page_grows_reaches_100_percent_and_shows_a_clicked_point(tmp_path, modality):
    case = CASES[modality]
    from playwright.sync_api import sync_playwright

    ready = threading.Event()
    close_page = threading.Event()  # the finished scan stays served until the test is done with it
    page_open = threading.Event()  # the scan starts only once the browser is watching
    outcome = {}

    def demo():
        try:
            outcome["summary"] = run_demo(modality=modality, scan="30x40", settings=case["settings"], workers=2, out_dir=tmp_path,
                                          http_port=0, open_browser=False, rate=250, page_size=16,
                                          on_ready=lambda url: (outcome.update(url=url), ready.set(),
                                                                page_open.wait(120)),
                                          linger=close_page)
        except Exception as exc:  # surfaced below
            outcome["error"] = exc
            ready.set()

    thread = threading.Thread(target=demo, daemon=True)
    thread.start()
    assert ready.wait(180) and "error" not in outcome, outcome.get("error")

    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(outcome["url"])
            page.wait_for_function("document.body.dataset.connected === '1'", timeout=60_000)
            page_open.set()

            def ipf_pixels():
                return page.evaluate("document.getElementById('map-ipf').toDataURL()")

            page.wait_for_function("+document.body.dataset.progress > 0.05", timeout=120_000)
            # The map and the progress it goes with, read together: on a loaded machine the
            # events can bunch up, so "later" is measured from what the page had then.
            early, seen = page.evaluate("[document.getElementById('map-ipf').toDataURL(), "
                                        "+document.body.dataset.progress]")
            assert seen < 1, "the page saw the scan only once it had finished"
            page.wait_for_function(f"+document.body.dataset.progress > {seen}", timeout=120_000)
            assert ipf_pixels() != early, "the orientation map did not change while the scan ran"
            page.wait_for_function("document.body.dataset.progress === '1.0000'", timeout=120_000)
            page.wait_for_function("document.getElementById('badge').textContent === 'complete'", timeout=120_000)
            assert "1,200 / 1,200 points (100.0%)" in page.inner_text("#progress-text")

            box = page.locator("#map-ipf").bounding_box()
            page.mouse.click(box["x"] + box["width"] * 0.55, box["y"] + box["height"] * 0.35)
            page.wait_for_function("document.body.dataset.selected !== undefined", timeout=10_000)
            details = page.inner_text("#details-list") + page.inner_text("#meta")
            assert all(word in details for word in case["words"]), details
            assert page.evaluate("[...document.querySelectorAll('canvas[data-map]')].map(c => c.dataset.map)") \
                == case["maps"]
            page.wait_for_function("document.getElementById('pattern').naturalWidth > 0", timeout=10_000)
            assert page.evaluate("document.getElementById('pattern').naturalWidth") == case["preview"]
            page.wait_for_function("document.querySelectorAll('#downloads a').length >= 5", timeout=30_000)
            assert page.evaluate("document.getElementById('ipf-key').naturalWidth") > 50
            # The cluster legend (the latent maps): a click shows the cluster's size and mean pattern.
            page.wait_for_function("document.querySelectorAll('.cluster-item').length >= 1", timeout=30_000)
            page.locator(".cluster-item").first.click()
            page.wait_for_function("document.body.dataset.cluster !== undefined", timeout=10_000)
            assert "size" in page.inner_text("#details-list")
            if case["mean_pattern"]:
                page.wait_for_function("document.getElementById('pattern').naturalWidth > 0", timeout=10_000)
                assert page.evaluate("document.getElementById('pattern').src").split("?")[0].endswith("/cluster.png")
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / f"live-page-{modality}.png"), full_page=True)
            browser.close()
    finally:
        page_open.set()
        close_page.set()
    thread.join(60)
    assert outcome["summary"]["missing"] == 0

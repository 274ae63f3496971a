"""The scan's throughput and latency history behind the live page's chart (stream/timeline.py)."""

import pytest

from liveindex.stream.timeline import MAX_BINS, Timeline


def test_bins_count_frames_per_second_and_average_the_pages_latencies():
    timeline = Timeline()
    timeline.add(100.0, 50, 0.2)  # the first result: its points in the first bin
    timeline.add(100.5, 30, 0.4)  # spread over 0 - 0.5 s: 15 in each of the first two bins
    timeline.add(101.0, 10, None)  # a page without acquisition times: no latency; 0.5 - 1 s
    timeline.add(104.0, 6, 0.1)  # after a pause, spread over the last 2 s only (its bin at 4 s: still filling)
    wire = timeline.to_wire()
    assert wire["bin_s"] == 0.25
    rates = wire["frames_per_s"]
    assert rates[:4] == [260.0, 60.0, 20.0, 20.0]  # (50 + 15) / 0.25, 15 / 0.25, 5 / 0.25, 5 / 0.25
    assert rates[4:8] == [0.0] * 4 and rates[8:] == [3.0] * 8  # 6 frames over 2 - 4 s
    assert sum(rates) * 0.25 == pytest.approx(96)  # every frame counted
    assert wire["latency_ms"][0] == pytest.approx(200.0) and wire["latency_ms"][2] == pytest.approx(400.0)


def test_a_long_scan_keeps_few_bins_and_loses_no_frames():
    timeline = Timeline()
    for second in range(10 * MAX_BINS):
        timeline.add(float(second), 7, 0.05)
    timeline.add(10.0 * MAX_BINS + 0.5, 1, None)  # the partial bin the wire leaves out
    wire = timeline.to_wire()
    assert len(wire["frames_per_s"]) <= MAX_BINS
    assert wire["bin_s"] == 16.0  # 0.25 s doubled until 2400 s fit in MAX_BINS bins
    assert sum(wire["frames_per_s"]) * wire["bin_s"] == pytest.approx(7 * 10 * MAX_BINS, abs=1)
    # 7 frames a second: the first result's page sits in the first bin, the rest spread over the
    # second before each, so the bins' rates are 7 but at the ends (7 +- 7 / 16).
    assert wire["frames_per_s"][1:-1] == [7.0] * (len(wire["frames_per_s"]) - 2)
    assert set(wire["latency_ms"]) == {50.0}

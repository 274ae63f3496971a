"""The scan's throughput and latency history behind the live page's chart (stream/timeline.py)."""

import pytest

from liveindex.stream.timeline import MAX_BINS, Timeline


def test_bins_count_frames_per_second_and_average_the_pages_latencies():
    timeline = Timeline()
    timeline.add(100.0, 50, 0.2)
    timeline.add(100.5, 30, 0.4)
    timeline.add(101.2, 10, None)  # a page without acquisition times: no latency
    timeline.add(103.1, 5, 0.1)  # bins 2 has nothing; bin 3 is the last, still filling
    wire = timeline.to_wire()
    assert wire["bin_s"] == 1.0
    assert wire["frames_per_s"] == [80.0, 10.0, 0.0]  # the last (partial) bin left out
    assert wire["latency_ms"][0] == pytest.approx(300.0) and wire["latency_ms"][1:] == [None, None]


def test_a_long_scan_keeps_few_bins_and_loses_no_frames():
    timeline = Timeline()
    for second in range(10 * MAX_BINS):
        timeline.add(float(second), 7, 0.05)
    timeline.add(10.0 * MAX_BINS + 0.5, 1, None)  # the partial bin the wire leaves out
    wire = timeline.to_wire()
    assert len(wire["frames_per_s"]) <= MAX_BINS
    assert wire["bin_s"] == 16.0  # doubled until 2400 s fit in MAX_BINS bins
    assert sum(wire["frames_per_s"]) * wire["bin_s"] == pytest.approx(7 * 10 * MAX_BINS)
    assert set(wire["frames_per_s"]) == {7.0} and set(wire["latency_ms"]) == {50.0}

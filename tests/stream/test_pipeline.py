"""The whole data path with real processes on loopback."""

import json

import numpy as np
import pytest
from orix import io as orix_io

from liveindex.stream.demo import run_demo

from ..conftest import disorientation, run_cli, start_cli

pytestmark = pytest.mark.slow


def test_publisher_two_workers_sink_complete_map_and_accurate(tmp_path):
    summary = run_demo(scan="40x40", settings={"noise": "moderate"}, workers=2, out_dir=tmp_path, http_port=0,
                       open_browser=False)
    assert summary["missing"] == 0 and summary["points"] == 1600
    assert summary["median_error_deg"] < 2.5
    scan = summary["scan"]
    xmap = orix_io.load(tmp_path / f"{scan}.h5")
    assert xmap.shape == (40, 40)
    assert xmap.phases[0].name == "ni" and xmap.phases[0].point_group.name == "m-3m"
    assert (xmap.phase_id == 0).all()
    ang = orix_io.load(tmp_path / f"{scan}.ang")
    assert ang.shape == (40, 40)
    # The .ang round trip keeps the orientations (up to crystal symmetry).
    assert np.median(disorientation(ang.rotations.data, xmap.rotations.data)) < 0.1
    for name in ("ipf", "confidence", "phase", "method"):
        assert (tmp_path / f"{scan}_{name}.png").stat().st_size > 100
    written = json.loads((tmp_path / f"{scan}.json").read_text())
    assert written["missing"] == 0
    # The latent cluster map from two workers' embeddings: one basis (in the scan_start), so the
    # grains come out whole, not cut along the pages each worker took.
    from sklearn.metrics import adjusted_rand_score

    from liveindex.models.ebsd.simulator import SimulatedScan

    grains = SimulatedScan((40, 40), noise="moderate", seed=0).grain_of_point
    assert adjusted_rand_score(grains, xmap.prop["cluster"]) > 0.8
    assert np.load(tmp_path / f"{scan}_embedding.npy").shape == (1600, 16)


def test_separate_commands_over_ipc(tmp_path):
    sink_addr, disp_addr = f"ipc://{tmp_path}/sink.sock", f"ipc://{tmp_path}/dispatch.sock"
    sink = start_cli("sink", "--bind", sink_addr, "--out", tmp_path / "out", "--http-port", "0", "--once")
    workers = [start_cli("worker", "--dispatcher", disp_addr, "--sink", sink_addr, "--name", f"w{i}") for i in range(2)]
    try:
        publish = run_cli("publish", "--simulate", "16x12", "--bind", disp_addr, "--sink", sink_addr, "--page-size", "32",
                          "--scan-id", "cli", timeout=180)
        assert publish.returncode == 0, publish.stderr
        out, err = sink.communicate(timeout=120)
        assert sink.returncode == 0, err
        summary = json.loads(out.strip().splitlines()[-1])
        assert summary["scan"] == "cli" and summary["missing"] == 0 and summary["median_error_deg"] < 2.5
        assert orix_io.load(tmp_path / "out" / "cli.h5").shape == (12, 16)
    finally:
        for p in [sink, *workers]:
            p.terminate()
        for p in [sink, *workers]:
            p.wait(20)
    assert all(p.returncode is not None for p in workers)

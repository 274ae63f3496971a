"""Torch against ONNX Runtime, and `liveindex models eval` against the bundle's figures."""

import json
import math

import numpy as np

from liveindex.models.ebsd.network import default_bundle_path

from ...conftest import run_cli


def test_torch_and_onnx_runtime_agree(tmp_path):
    """The exported graph computes what the torch module computes (tolerance: export.PARITY_ATOL, 1e-4),
    for the shipped bundle's weights and for a fresh network with non-trivial batch-norm statistics."""
    import torch

    from liveindex.models.ebsd import training_data as td
    from liveindex.models.ebsd.export import PARITY_ATOL, dummy_codebook, export_onnx, parity
    from liveindex.models.ebsd.network import NetworkModel
    from liveindex.models.ebsd.train import build_inference_model, build_network

    flat = td.preprocess(td.camera_frames(td.render_clean(40, seed=3).images, np.random.default_rng(3), "moderate"))
    shipped = NetworkModel.load(providers="cpu")
    torch.manual_seed(0)
    embed = torch.from_numpy(np.load(default_bundle_path() / "embedding.npy"))
    net = build_network(3, width=8, hidden=32, embed=embed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    model = build_inference_model(net)
    path = tmp_path / "network.onnx"
    export_onnx(model, path)
    for book in (dummy_codebook(embed.shape[1]), shipped.codebook_inputs()):
        diffs = parity(model, path, flat, book)
        assert all(diffs[k] <= PARITY_ATOL[k] for k in diffs), diffs
    # The batch axis is dynamic.
    for k in ("bundle.json", "embedding.npy"):
        (tmp_path / k).write_bytes((default_bundle_path() / k).read_bytes())
    fresh = NetworkModel.load(tmp_path, providers="cpu")
    fresh._book = shipped.codebook()
    for batch in (1, 7, 40):
        phase, quat, _, _ = fresh.predict(flat[:batch])
        assert phase.shape == (batch,) and quat.shape == (batch, 4)


def test_shipped_bundle_matches_its_torch_checkpoint_record():
    """Export measured the shipped graph against torch; the record says within tolerance."""
    bundle = json.loads((default_bundle_path() / "bundle.json").read_text())
    assert all(v <= bundle["parity"]["tolerance"][k] for k, v in bundle["parity"]["max_abs_diff"].items())


def test_eval_reproduces_the_bundle_phase_accuracy(tmp_path):
    out = tmp_path / "figures.json"
    proc = run_cli("models", "eval", "--n", 150, "--json", out, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "bundle:" in proc.stdout  # recorded figures printed beside the new ones
    now = json.loads(out.read_text())["figures"]
    recorded = json.loads((default_bundle_path() / "bundle.json").read_text())["validation"]
    for noise in ("clean", "moderate"):
        for pair, then in recorded["noise"][noise]["pair_accuracy"].items():
            got = now["noise"][noise]["pair_accuracy"][pair]
            n = 2 * now["n_per_source"]
            # Binomial spread of a 300-pattern estimate, 4 sigma, at least 3 points.
            tolerance = max(0.03, 4 * math.sqrt(max(then * (1 - then), 0.01) / n))
            assert abs(got - then) <= tolerance, (noise, pair, got, then)

"""Export a trained checkpoint as a model bundle: ``network.onnx`` plus ``bundle.json``.

The graph has a dynamic batch axis. After writing it, export checks torch against ONNX
Runtime on a batch of simulated patterns, then measures the bundle's validation figures
(models/evaluate.py, through ONNX Runtime exactly as workers run it) and its inference
cost, and records them with the provenance in ``bundle.json``.
"""

from __future__ import annotations

import datetime
import json
import logging
import platform
from pathlib import Path

import numpy as np

from liveindex.models.ebsd.preprocess import MAX_WORKING_SIDE
from liveindex.models.provenance import git_commit

from . import training_data as td
from .codebook import CODEBOOK_SERVES, CODEBOOK_SOURCES
from .master_patterns import KNOWN_PHASES, STRUCTURES, point_group
from .network import BUNDLE_FORMAT, EMBEDDING_FILE, NETWORK_FILE, NetworkModel

log = logging.getLogger(__name__)

OPSET = 17
# Torch vs ONNX Runtime on the same inputs, both float32 on the CPU: measured differences are
# about 1e-6; these bounds leave room for other CPUs' kernels.
PARITY_ATOL = {"phase_probabilities": 1e-4, "quaternion": 1e-4, "orientation_confidence": 1e-4}
OUTPUTS = ("phase_probabilities", "quaternion", "orientation_confidence")
DEFAULT_EVAL_N = 1000


INPUTS = ("patterns", "codes", "neighbours", "aligned", "geometry_index")


def dummy_codebook(embed_dim: int, n_cells: int = 40, seed: int = 0) -> dict:
    """A small random code book with the real one's shapes and dtypes (for export and tests)."""
    from .codebook import CODEBOOK_SOURCES, N_NEIGHBOURS, normalise_rows

    rng = np.random.default_rng(seed)
    aligned = rng.standard_normal((n_cells, N_NEIGHBOURS, 4)).astype(np.float32)
    codes = normalise_rows(rng.standard_normal((len(CODEBOOK_SOURCES), n_cells, embed_dim)).astype(np.float32))
    return {"codes": np.ascontiguousarray(codes.transpose(0, 2, 1)),
            "neighbours": rng.integers(0, n_cells, (n_cells, N_NEIGHBOURS)).astype(np.int64),
            "aligned": aligned / np.linalg.norm(aligned, axis=-1, keepdims=True),
            "geometry_index": np.arange(len(CODEBOOK_SOURCES), dtype=np.int64)}


def export_onnx(model, path: Path) -> None:
    """Export the inference module; batch and the code book's cell count are dynamic axes."""
    import torch

    embed_dim = model.net.embed.shape[1]
    book = dummy_codebook(embed_dim)
    dummy = (torch.zeros(2, td.WORKING_SHAPE[0] * td.WORKING_SHAPE[1]),
             *(torch.from_numpy(book[k]) for k in INPUTS[1:]))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, dummy, str(path), input_names=list(INPUTS), output_names=list(OUTPUTS),
                      dynamic_axes={"patterns": {0: "batch"}, "codes": {0: "geometries", 2: "cells"}, "geometry_index": {0: "geometries"}, "neighbours": {0: "cells"},
                                    "aligned": {0: "cells"}, **{o: {0: "batch"} for o in OUTPUTS}},
                      opset_version=OPSET, dynamo=False, do_constant_folding=True)


def parity(model, onnx_path: Path, flat: np.ndarray, book: dict) -> dict:
    """Largest absolute difference per output between torch and ONNX Runtime (CPU, 1 thread)."""
    import onnxruntime as ort
    import torch

    with torch.no_grad():
        expected = [t.numpy() for t in model(torch.from_numpy(flat), *(torch.from_numpy(book[k]) for k in INPUTS[1:]))]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    got = session.run(None, {"patterns": flat, **{k: book[k] for k in INPUTS[1:]}})
    return {name: float(np.abs(e.reshape(g.shape) - g).max()) for name, e, g in zip(OUTPUTS, expected, got)}


CALIBRATION_SEED = 31_337
CALIBRATION_N = 2400


def calibrate_confidence(model, folder: Path) -> dict:
    """Refit the orientation-confidence head (a logistic on three score features) on a
    calibration set that has failures in it.

    Training data rarely fails (median error 1.4 deg, 98% within 3 deg), so the head trained
    with the network learned "always sure": it said 1.0 at the hard noise level too, where
    most answers are wrong. Here it is refitted on patterns at every noise level of the
    simulated detector plus the training variation, from a seed of its own (never the
    validation one), with torch's L-BFGS on the same binary cross-entropy.
    """
    import torch

    from . import codebook as cb
    from .network import NetworkModel

    rng = np.random.default_rng(CALIBRATION_SEED)
    clean = td.render_clean(CALIBRATION_N, seed=CALIBRATION_SEED)
    frames = [td.camera_frames(clean.images, rng, noise) for noise in ("clean", "moderate", "hard")]
    frames.append(td.corrupt(clean.images, rng))
    flat = torch.from_numpy(td.preprocess(np.concatenate(frames)))
    truth = np.concatenate([clean.rotations] * len(frames))
    shell = NetworkModel.__new__(NetworkModel)  # only the code book is needed, from this folder
    shell._book, shell._codes, shell.folder = None, {}, folder
    shell.bundle = {"orientation": {"embedding": EMBEDDING_FILE, "cell_resolution_deg": model.net_config["cell_resolution"]}}
    shell.geometry_range, shell.frame_shape = td.GeometryRange(), td.FRAME_SHAPE
    book = [torch.from_numpy(v) for v in shell.codebook_inputs().values()]
    captured = []
    hook = model.net.confidence.register_forward_hook(lambda m, inp, out: captured.append(inp[0].detach()))
    with torch.no_grad():
        qs = [model(flat[i:i + 1024], *book)[1] for i in range(0, len(flat), 1024)]
    hook.remove()
    feats = torch.cat(captured)
    ok = torch.from_numpy((cb.disorientation_deg(torch.cat(qs).numpy(), truth) <= 3.0).astype(np.float32))
    head = model.net.confidence
    before = float(torch.nn.functional.binary_cross_entropy_with_logits(head(feats)[:, 0], ok))
    opt = torch.optim.LBFGS(head.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(feats)[:, 0], ok)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        after = float(torch.nn.functional.binary_cross_entropy_with_logits(head(feats)[:, 0], ok))
    log.info("confidence head refitted on %d patterns (%.0f%% within 3 deg): BCE %.3f -> %.3f", len(ok),
             100 * float(ok.mean()), before, after)
    return {"seed": CALIBRATION_SEED, "n": int(len(ok)), "within_3deg": round(float(ok.mean()), 4),
            "bce_before": round(before, 4), "bce_after": round(after, 4),
            "noise": "simulated detector clean, moderate, hard, and the training variation"}


def export(checkpoint: Path, out: Path, *, eval_n: int = DEFAULT_EVAL_N, command: str = "") -> dict:
    import torch

    from .evaluate import evaluate, inference_cost
    from .train import load_checkpoint, set_one_core

    set_one_core(torch)
    net, ckpt = load_checkpoint(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / NETWORK_FILE
    export_onnx(net, onnx_path)
    np.save(out / EMBEDDING_FILE, net.net.embed.numpy().astype(np.float32))
    calibration = calibrate_confidence(net, out)
    export_onnx(net, onnx_path)  # again, with the refitted confidence head
    check = td.preprocess(td.camera_frames(td.render_clean(64, seed=5).images, np.random.default_rng(5), "moderate"))
    diffs = parity(net, onnx_path, check, dummy_codebook(net.net.embed.shape[1]))
    bad = {k: v for k, v in diffs.items() if v > PARITY_ATOL[k]}
    if bad:
        raise RuntimeError(f"torch and ONNX Runtime disagree beyond {PARITY_ATOL}: {bad}")
    log.info("parity torch vs ONNX Runtime: %s", diffs)

    train_meta_path = checkpoint.parent / "train.json"
    train_meta = json.loads(train_meta_path.read_text()) if train_meta_path.exists() else {}
    config = ckpt["config"]
    bundle = {
        "format": BUNDLE_FORMAT,
        "name": out.name,
        "network": NETWORK_FILE,
        "orientation": {
            "method": "classification over orientation cells, then regression: cosine similarity of an "
                      "embedding (PCA of simulated patterns, embedding.npy; embedding_dim) against one code per cell and band "
                      "geometry, then the softmax-weighted mean (learned temperature) of the best cell and its 26 "
                      "nearest cells, each in the symmetric equivalent next to it",
            "cell_resolution_deg": config["cell_resolution"],
            "codebook_sources": [list(s) for s in CODEBOOK_SOURCES],
            "codebook_serves": {p: list(g) for p, g in CODEBOOK_SERVES.items()},
            "codebook_geometry": "the nominal geometry of geometry_range (pc_centre, sample tilt 70, detector tilt 0)",
            "temperature": ckpt.get("temperature"),
            "embedding_dim": config["embed_dim"],
            "embedding": EMBEDDING_FILE,
        },
        "phases": [{"name": p, "space_group": STRUCTURES[p][0], "point_group": point_group(p).name,
                    "description": KNOWN_PHASES[p],
                    "training_master_patterns": [k for n, k, _ in td.TRAIN_SOURCES if n == p]}
                   for p in ckpt["phases"]],
        "input": {
            "name": "patterns", "shape": ["batch", td.WORKING_SHAPE[0] * td.WORKING_SHAPE[1]], "dtype": "float32",
            "working_shape": list(td.WORKING_SHAPE), "trained_frame_shape": list(td.FRAME_SHAPE),
            "preprocessing": f"liveindex.models.ebsd.preprocess.Preprocessor: bin to the working shape (longer side <= "
                             f"{MAX_WORKING_SIDE} px), subtract a Gaussian-blurred background (sigma = width/8, truncate 2), then each "
                             "row zero-mean and unit-norm",
        },
        "outputs": {
            "phase_probabilities": "(batch, n_phases) softmax over phases, in the order of 'phases'",
            "quaternion": "(batch, 4) unit quaternion (w, x, y, z), w >= 0, orix convention (as kikuchipy's "
                          "get_patterns simulates); any of the 24 cubic equivalents",
            "orientation_confidence": "(batch,) the network's estimate of P(disorientation <= 3 deg)",
        },
        "geometry_range": td.GeometryRange().to_json(),
        "training": {
            "sources": [list(s) for s in td.TRAIN_SOURCES],
            "variation": td.Variation().to_json(),
            "config": config,
            "history_last": (train_meta.get("history") or [None])[-1],
            "train_seconds": train_meta.get("train_seconds"),
            "loss": "cross-entropy (phase) + 10 x min over the 24 cubic operators s and sign of |q - s q_true| "
                    "+ 0.1 x BCE of the orientation confidence against error <= 3 deg",
        },
        "parity": {"max_abs_diff": diffs, "tolerance": PARITY_ATOL},
        "confidence_calibration": calibration,
        "provenance": {
            "seed": config["seed"], "git_commit": git_commit(Path(__file__).resolve().parents[1], "ebsd/bundles"),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "n_train": config["n_train"], "n_val": config["n_val"], "epochs": config["epochs"],
            "eval_n_per_source": eval_n, "train_command": train_meta.get("command", ""), "export_command": command,
            "torch": torch.__version__, "python": platform.python_version(),
        },
    }
    (out / "bundle.json").write_text(json.dumps(bundle, indent=1))
    model = NetworkModel.load(out, providers="cpu", threads=1)
    log.info("measuring validation figures on %d held-out patterns per source", eval_n)
    bundle["validation"] = evaluate(model, eval_n)  # the graph a CPU worker runs: int8 code scoring
    bundle["validation"]["graph"] = "the CPU graph (int8 code scoring, models.network.quantize_code_scoring)"
    bundle["inference_cost"] = inference_cost(model)
    float_cost = inference_cost(NetworkModel.load(out, providers="cpu", threads=1, quantized=False))
    bundle["inference_cost"].update({"float_graph_ms_best": float_cost["per_pattern_ms_best"],
                                     "float_graph_one_phase_ms_best": float_cost["one_phase_ms_best"]})
    (out / "bundle.json").write_text(json.dumps(bundle, indent=1))
    log.info("bundle written to %s", out)
    return bundle

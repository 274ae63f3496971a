"""Train the spot modality's networks and export a bundle: ``liveindex models train --modality
spots --phases ferrite,austenite,cementite --out models/spots/bundles/default``.

Training data: patterns simulated with the renderer the evaluation sets use (simulator.py),
each phase its own set, orientations uniform on SO(3) (which includes every in-plane turn),
noise levels clean/moderate/hard at random, rel-rod widths 0.015-0.06/A, beam-centre jitter,
and a residual elliptical distortion (axis ratio 1 +- ``DISTORTION``, random axis) that the
indexer's polar grid does not undo: the distortion augmentation. The beam centre is found in
each frame as the indexer finds it. Inputs are network.py's rotation-invariant spectra of the
matcher's polar image (so no in-plane rotation augmentation is needed: the features do not
change under it).

- Phase classifier: an MLP, softmax over the bundle's phases, trained on every phase's set
  with each phase weighted by the inverse of its count.
- Orientation, one per phase: an MLP, softmax over the phase's library templates (one per
  beam direction of the fundamental-sector grid), trained on soft targets: a Gaussian
  (``TARGET_SIGMA_DEG``) of the angle between the pattern's beam direction and each
  template's, over the phase's symmetry, so near templates share the credit.

Export: each network as its own ONNX graph (softmax inside), checked against torch; figures
on a held-out set (seed ``VALIDATION_SEED``, not a training seed) written to bundle.json with
the setup, the phases (with their structure's fingerprint) and the command that made it.
torch is imported here only.
"""

from __future__ import annotations

import datetime
import json
import logging
import time
from pathlib import Path

import numpy as np

from liveindex.models.crystal import proper_operators
from liveindex.models.provenance import git_commit

from .diffraction import rotation_matrices
from .indexer import find_centers
from .matcher import front_graph, polar_offsets
from .network import Bundle, SpotNetworks, feature_size, phase_fingerprint, spectrum_features
from .simulator import NOISE_LEVELS, SpotPatternRenderer, uniform_quaternions
from .templates import PolarGrid, sector_directions

log = logging.getLogger(__name__)

DISTORTION = 0.02
EXCITATION_RANGE = (0.015, 0.06)
NOISE_MIX = (("clean", 0.25), ("moderate", 0.5), ("hard", 0.25))
TARGET_SIGMA_DEG = 2.0
VALIDATION_SEED = 7_000_007
CHUNK = 250


class PolarFront:
    """The matcher's polar image (matcher.py: front graph, each radius' median over the angle
    removed, ReLU, unit norm) without its templates: the networks' input for training data."""

    def __init__(self, pattern_shape, grid: PolarGrid):
        import onnxruntime as ort

        from liveindex.models.onnx_runtime import session_options

        h, w = pattern_shape
        self.session = ort.InferenceSession(front_graph(pattern_shape, grid), session_options(1),
                                            providers=["CPUExecutionProvider"])
        self.scale = np.array([2.0 / (w - 1), 2.0 / (h - 1)], np.float32)
        self.offsets = (polar_offsets(grid) * self.scale).astype(np.float32)  # (R, A, 2)

    def __call__(self, frames: np.ndarray, centers: np.ndarray) -> np.ndarray:
        norm = (centers.astype(np.float32) * self.scale - 1.0).astype(np.float32)
        grid = self.offsets[None] + norm[:, None, None, :]
        polar_g = self.session.run(None, {"frames": frames.astype(np.float32), "grid": grid})[0]
        half = polar_g.shape[2] // 2
        ring = np.partition(polar_g, half, axis=2)[:, :, half:half + 1]
        polar = np.maximum(polar_g - ring, 0.0)
        return polar / (np.sqrt((polar**2).sum(axis=(1, 2), keepdims=True)) + 1e-6)


def simulate(phase_records, phase: int, setup: dict, n: int, seed: int, pattern_shape, front: PolarFront):
    """``n`` patterns of one phase -> (features (n, F), quaternions (n, 4))."""
    features, quats = [], []
    h, w = pattern_shape
    names, weights = zip(*NOISE_MIX)
    for chunk, first in enumerate(range(0, n, CHUNK)):
        rng = np.random.default_rng([seed, phase, chunk])
        m = min(CHUNK, n - first)
        ratio = 1.0 + rng.uniform(-DISTORTION, DISTORTION)
        distorted = dict(setup, ellipticity=[ratio, float(rng.uniform(0, 180))])
        renderer = SpotPatternRenderer(phase_records, distorted, pattern_shape)
        level = NOISE_LEVELS[names[rng.choice(len(names), p=weights)]]
        q = uniform_quaternions(rng, m)
        xy, inten = renderer.spots(phase, q, rng.uniform(*EXCITATION_RANGE, m))
        centers = np.array([w / 2, h / 2]) + rng.normal(0, 1.0, (m, 2)) * np.hypot(1.0, level.jitter)
        frames = renderer.render(xy, inten, centers, level, rng).astype(np.float32)
        features.append(spectrum_features(front(frames, find_centers(frames))))
        quats.append(q)
    return np.concatenate(features), np.concatenate(quats)


def beam_directions(q: np.ndarray) -> np.ndarray:
    return rotation_matrices(q)[:, :, 2]  # R @ e_z: the crystal direction along the beam


def soft_targets(directions: np.ndarray, library: np.ndarray, space_group: int) -> np.ndarray:
    """(n, 3) beam directions, (N, 3) the library's -> (n, N) float32 targets (rows sum to 1)."""
    ops = rotation_matrices(proper_operators(space_group))
    cos = np.full((len(directions), len(library)), -1.0)
    for op in ops:
        cos = np.maximum(cos, (directions @ op.T) @ library.T)
    angle = np.degrees(np.arccos(np.clip(cos, -1, 1)))
    target = np.exp(-0.5 * (angle / TARGET_SIGMA_DEG) ** 2)
    target /= np.maximum(target.sum(1, keepdims=True), 1e-12)
    nearest = angle.argmin(1)  # no template within a few sigma (grid edges): the nearest takes it all
    empty = target.sum(1) < 0.5
    target[empty] = 0
    target[empty, nearest[empty]] = 1
    return target.astype(np.float32)


def mlp(n_in: int, hidden: int, n_out: int):
    import torch.nn as nn

    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, n_out))


def fit(model, x: np.ndarray, target, *, epochs: int, seed: int, weights=None, batch: int = 256,
        lr: float = 2e-3) -> list[float]:
    """Adam, one-cycle learning rate; cross-entropy against class indices (an array) or soft
    targets (a function of the batch's row indices: made per batch, as a (n, templates) array
    for 80 000 cementite patterns would take 0.8 GB)."""
    import torch

    torch.manual_seed(seed)
    xt = torch.from_numpy(x)
    soft = callable(target)
    tt = None if soft else torch.from_numpy(target)
    w = torch.from_numpy(np.asarray(weights, np.float32)) if weights is not None else None
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-5)
    steps = epochs * int(np.ceil(len(x) / batch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for a in range(0, len(x), batch):
            idx = order[a:a + batch]
            logits = model(xt[idx])
            if soft:
                loss = -(torch.from_numpy(target(idx.numpy())) * torch.log_softmax(logits, 1)).sum(1).mean()
            else:
                loss = torch.nn.functional.cross_entropy(logits, tt[idx], weight=w)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        history.append(round(total / len(x), 4))
    return history


def export_onnx(model, n_in: int, path: Path) -> None:
    import torch

    class WithSoftmax(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, features):
            return torch.softmax(self.inner(features), 1)

    model.eval()
    torch.onnx.export(WithSoftmax(model), (torch.zeros(2, n_in),), str(path), input_names=["features"],
                      output_names=["probabilities"], dynamic_axes={"features": {0: "batch"}, "probabilities": {0: "batch"}},
                      opset_version=17, dynamo=False)


def validate(bundle_folder: Path, phase_records, setup: dict, pattern_shape, n: int, seed: int,
             front: PolarFront, resolution: float) -> dict:
    """The exported graphs (ONNX Runtime) on ``n`` held-out patterns a phase: phase accuracy and
    the orientation network's best template within 3 deg (and within 3 deg of the beam direction
    modulo symmetry; the in-plane angle comes from the correlation, not measured here)."""
    networks = SpotNetworks(Bundle.load(bundle_folder), providers="cpu", threads=1)
    out = {"patterns_per_phase": n, "seed": seed, "per_phase": {}}
    right_all = []
    for p, record in enumerate(phase_records):
        x, q = simulate(phase_records, p, setup, n, seed, pattern_shape, front)
        probs = networks.phase_probabilities(x)
        right = probs.argmax(1) == p
        right_all.append(right)
        library = sector_directions(record.space_group, resolution)
        best = networks.direction_probabilities(p, x)
        ops = rotation_matrices(proper_operators(record.space_group))
        v = beam_directions(q)
        top = np.argsort(-best, 1)[:, :4]
        within = []
        for k in range(top.shape[1]):
            d = library[top[:, k]]
            # The spectrum cannot tell a direction from its mirror image (-v's orbit): both count.
            cos = np.max([np.abs(np.einsum("ni,ni->n", v @ op.T, d)) for op in ops], axis=0)
            within.append(np.degrees(np.arccos(np.clip(cos, -1, 1))) < 3.0)
        within = np.array(within)
        out["per_phase"][record.name] = {"phase_accuracy": round(float(right.mean()), 4),
                                         "direction_within_3deg_top1": round(float(within[0].mean()), 4),
                                         "direction_within_3deg_top4": round(float(within.any(0).mean()), 4)}
    out["phase_accuracy"] = round(float(np.concatenate(right_all).mean()), 4)
    return out


def train_bundle(phase_records, setup: dict, out: Path, *, pattern_shape=(128, 128), resolution: float = 2.0,
                 n_per_phase=None, epochs: int = 15, seed: int = 0, hidden: int = 256, n_val: int = 300,
                 batch: int = 256, command: str = "") -> dict:
    """Simulate, train, export and validate; writes the bundle to ``out``; returns bundle.json."""
    import torch

    torch.set_num_threads(1)  # one core: the machine is shared, and the bundle is reproducible so
    start = time.perf_counter()
    grid = PolarGrid.for_shape(pattern_shape)
    front = PolarFront(pattern_shape, grid)
    n_in = feature_size(grid)
    libraries = [sector_directions(r.space_group, resolution) for r in phase_records]
    if n_per_phase is None:  # about 30 patterns per template, at least 20 000 a phase
        n_per_phase = [max(20_000, 30 * len(lib)) for lib in libraries]
    elif np.isscalar(n_per_phase):
        n_per_phase = [int(n_per_phase)] * len(phase_records)
    data = []
    for p, record in enumerate(phase_records):
        t = time.perf_counter()
        data.append(simulate(phase_records, p, setup, n_per_phase[p], seed, pattern_shape, front))
        log.info("simulated %d %s patterns in %.0f s", n_per_phase[p], record.name, time.perf_counter() - t)
    simulate_s = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    x_all = np.concatenate([d[0] for d in data])
    y_all = np.concatenate([np.full(len(d[0]), p, np.int64) for p, d in enumerate(data)])
    counts = np.bincount(y_all, minlength=len(phase_records))
    classifier = mlp(n_in, hidden, len(phase_records))
    t = time.perf_counter()
    history = {"classifier": fit(classifier, x_all, y_all, epochs=epochs, seed=seed, batch=batch,
                                 weights=counts.sum() / (len(counts) * counts))}
    log.info("classifier trained in %.0f s: loss %s", time.perf_counter() - t, history["classifier"][-3:])
    export_onnx(classifier, n_in, out / "classifier.onnx")
    phases_meta = []
    for p, record in enumerate(phase_records):
        x, q = data[p]
        directions = beam_directions(q)

        def target(rows, directions=directions, library=libraries[p], space_group=record.space_group):
            return soft_targets(directions[rows], library, space_group)

        net = mlp(n_in, hidden, len(libraries[p]))
        t = time.perf_counter()
        history[record.name] = fit(net, x, target, epochs=epochs, seed=seed + 1 + p, batch=batch)
        log.info("%s orientation network (%d templates) trained in %.0f s: loss %s", record.name,
                 len(libraries[p]), time.perf_counter() - t, history[record.name][-3:])
        name = f"orientation_{record.name}.onnx"
        export_onnx(net, n_in, out / name)
        phases_meta.append({"name": record.name, "space_group": record.space_group, "fingerprint": phase_fingerprint(record),
                            "templates": len(libraries[p]), "orientation_file": name,
                            "training_patterns": int(n_per_phase[p])})
    bundle = {
        "format": 1, "modality": "spots", "name": out.name,
        "method": "Hadjadj et al.: a phase classifier network, then one orientation network per phase (softmax over "
                  "the phase's library templates, one per beam direction of its fundamental sector); inputs: the "
                  "rotation-invariant angular power spectrum of the matcher's polar image (network.py); in-plane "
                  "angle from the template's correlation; polar template matching as the fallback on each branch",
        "classifier": {"file": "classifier.onnx", "hidden": hidden},
        "phases": phases_meta,
        "setup": {"kv": setup["kv"], "calibration": setup["calibration"], "precession": setup["precession"],
                  "pattern_shape": list(pattern_shape), "resolution_deg": resolution},
        "input": {"name": "features", "size": n_in, "radial_bins": n_in // 21, "harmonics": "0, 2, ..., 40"},
        "training": {"seed": seed, "epochs": epochs, "batch": batch, "hidden": hidden, "noise_mix": dict(NOISE_MIX), "excitation_range": EXCITATION_RANGE,
                     "distortion": DISTORTION, "target_sigma_deg": TARGET_SIGMA_DEG, "loss_history": history,
                     "simulate_s": round(simulate_s, 1), "seconds": round(time.perf_counter() - start, 1),
                     "torch_threads": 1, "command": command,
                     "git_commit": git_commit(Path(__file__).resolve().parent, "bundles"),
                     "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
    }
    (out / "bundle.json").write_text(json.dumps(bundle, indent=1))
    if n_val:
        bundle["validation"] = validate(out, phase_records, setup, pattern_shape, n_val, VALIDATION_SEED, front,
                                        resolution)
        log.info("validation: %s", bundle["validation"])
    (out / "bundle.json").write_text(json.dumps(bundle, indent=1))
    return bundle

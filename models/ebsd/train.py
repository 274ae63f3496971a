"""Training of the phase/orientation network (torch, CPU, one core).

One ONNX-exportable module, trained on simulated patterns (models/training_data.py):

- phase: a small CNN (5 convolutions, 0.35 M parameters) plus a linear term on the best score
  in each band geometry's code book (below); softmax over the bundle's phases, cross-entropy;
- orientation: classification over orientation cells, then regression. The m-3m fundamental
  zone is cut into cells (a 3 deg cubochoric sampling, 30 443 cells). A linear embedding
  (the 128 leading principal components of simulated patterns: fitted, then frozen, since the
  codes are made with it) maps a pattern to 128 numbers (64 kept too little of dynamical Ni
  patterns: 72% of them within 3 deg at moderate noise, against 89% with 128 and 92% with
  full-size NCC on the same cells); their cosine with one code per cell
  and code book (Ni's dynamical master pattern, Fe's kinematical one, Ni's kinematical one for
  kinematical fcc patterns such as Ni3Al's; all at the nominal geometry) classifies the cell. The quaternion is then the softmax-weighted mean
  of the best cell and its 26 nearest cells, each taken in the symmetric equivalent next to
  it, with a learned temperature: sub-cell precision from the neighbours' scores. The
  symmetry-aware loss is min over the 24 cubic rotations s (and sign) of |q - s q_true|.
  The code book is an input of the graph, built when a bundle is loaded (models/codebook.py);
- orientation confidence: a logistic head on (best cell score, its margin over the mean
  score, phase probability), trained with binary cross-entropy against error <= 3 deg.

What was tried first, and why not (same budget each, 150 000 training patterns, ~4 min on
one core): the CNN regressing a quaternion with the min-over-symmetry loss reached a median
error of 32 deg on the validation set; regressing the cubic-invariant tensor T
(models/codebook.t_features) and decoding it in the graph, 16 deg. Regression from scratch
learns far too slowly for one CPU core and ~25 minutes; the cell code book starts at 2.4 deg
before any training.

Torch is imported here and in export only; inference (models/network.py) runs the exported
ONNX graph without it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import training_data as td
from .codebook import CODEBOOK_SOURCES

log = logging.getLogger(__name__)

CONFIDENT_DEG = 3.0  # orientation confidence = estimated P(error <= this)


@dataclass
class TrainConfig:
    seed: int = 0
    n_train: int = 90_000
    n_val: int = 2_000
    epochs: int = 5
    batch: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    orientation_weight: float = 10.0
    confidence_weight: float = 0.1
    width: int = 16  # channels of the phase CNN's first convolution; the others scale with it
    hidden: int = 128  # the phase CNN's fully connected layer
    embed_dim: int = 128
    cell_resolution: float = 3.0


def set_one_core(torch) -> None:
    # The development machine is two cores shared with benchmarks: train on one.
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass


def cubic_operators() -> np.ndarray:
    from .codebook import cubic_operators as ops

    return ops()


def build_codebook(cell_resolution: float, embed_dim: int) -> dict:
    """Cells, neighbours, the PCA embedding of simulated templates, the codes (G, D, K) and a
    zero geometry bias (torch tensors)."""
    import torch

    from liveindex.models.ebsd.geometry import DetectorGeometry

    from . import codebook as cb

    t0 = time.perf_counter()
    cells, neighbours, aligned = cb.cells_and_neighbours(cell_resolution)
    templates = cb.nominal_templates(cells, DetectorGeometry(pc=td.GeometryRange().pc_centre))
    flat = torch.from_numpy(templates.reshape(-1, templates.shape[-1]))
    torch.manual_seed(0)
    sub = flat[::3]
    _, _, v = torch.svd_lowrank(sub, q=embed_dim + 16, niter=4, M=sub.mean(0, keepdim=True))
    embed = v[:, :embed_dim].contiguous()
    codes = np.stack([cb.code_matrix((torch.from_numpy(t) @ embed).numpy()) for t in templates])
    log.info("code book: %d cells x %d band geometries, %d-d embedding, in %.0f s", len(cells), len(templates),
             embed_dim, time.perf_counter() - t0)
    return {"cells": torch.from_numpy(cells), "neighbours": torch.from_numpy(neighbours),
            "aligned": torch.from_numpy(aligned), "embed": embed, "codes": torch.from_numpy(codes),
            "geometry_index": torch.arange(len(codes))}


def build_network(n_phases: int, width: int = 16, hidden: int = 128, *, embed):
    """The exported module. Inputs: patterns (B, P), and the code book: codes (G', D, K) unit
    columns of G' of the G band geometries, geometry_index (G',) int64 saying which,
    neighbours (K, 27) int64, aligned neighbour quaternions (K, 27, 4). Training passes every
    geometry; a worker that knows its scan's phases passes only theirs (a Ni scan: one of
    three, a third of the work), and a geometry not passed counts as no evidence (score 0)
    for its phase."""
    import torch
    from torch import nn

    def block(i, o, k=3, s=2):
        return nn.Sequential(nn.Conv2d(i, o, k, s, k // 2, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True))

    h, w_ = td.WORKING_SHAPE
    side = h
    for _ in range(4):  # the four stride-2 blocks below
        side = (side + 1) // 2

    class PhaseOrientationNet(nn.Module):
        def __init__(self):
            super().__init__()
            w = width
            self.phase_net = nn.Sequential(
                block(1, w, 5, 2),  # 15x15 from 30x30
                block(w, 2 * w),  # 8x8
                block(2 * w, 2 * w, 3, 1),
                block(2 * w, 4 * w),  # 4x4
                block(4 * w, 8 * w),  # 2x2
                nn.Flatten(),
                nn.Linear(8 * w * side * side, hidden),
                nn.ReLU(inplace=True),
                nn.Linear(hidden, n_phases),
            )
            # Fitted (PCA of the code-book templates), not trained: the codes are this
            # embedding of simulated patterns, so it must not move once they are made.
            self.register_buffer("embed", embed.clone())
            self.log_temperature = nn.Parameter(torch.tensor(float(np.log(0.03))))
            self.confidence = nn.Linear(3, 1)
            # The best score in each band geometry's code book is phase evidence too (fcc vs bcc).
            self.score_to_phase = nn.Linear(len(CODEBOOK_SOURCES), n_phases)

        def forward(self, flat, codes, neighbours, aligned, geometry_index):
            # Inputs are unit-norm rows: x sqrt(P) gives unit variance per pixel.
            logits = self.phase_net(flat.reshape(-1, 1, h, w_) * float(np.sqrt(h * w_)))
            e = flat @ self.embed
            e = e / torch.linalg.vector_norm(e, dim=1, keepdim=True).clamp_min(1e-8)
            # One MatMul per band geometry: (B, D) @ (G, D, K) -> (G, B, K). Gathers below index
            # the flattened tensor so the graph never copies it.
            per_geometry = torch.matmul(e, codes)
            g_count, batch, k_count = per_geometry.shape
            # TopK, not max/ArgMax: ONNX Runtime's ArgMax is scalar code, 6x slower than the MatMul here.
            top_values, top_cells = torch.topk(per_geometry, 1, dim=2)
            top_values, top_cells = top_values[..., 0], top_cells[..., 0]  # (G, B)
            every_geometry = torch.zeros(len(CODEBOOK_SOURCES), batch, dtype=top_values.dtype).scatter(
                0, geometry_index[:, None].expand(-1, batch), top_values)  # (G, B)
            logits = logits + self.score_to_phase(every_geometry.transpose(0, 1) * 10)
            geometry = top_values.argmax(dim=0)  # (B,) the pattern's band geometry, of those given
            row = geometry * batch + torch.arange(batch)  # (B,) row of (G*B, K)
            best = top_cells.reshape(-1).index_select(0, row)  # (B,) best cell
            top = top_values.reshape(-1).index_select(0, row)
            # The mean score over cells is the score of the mean code: no pass over (G, B, K).
            mean = (e[None] * codes.mean(dim=2)[:, None, :]).sum(-1).reshape(-1).index_select(0, row)
            nb = neighbours.index_select(0, best)  # (B, n)
            nb_scores = per_geometry.reshape(-1).index_select(0, (row[:, None] * k_count + nb).reshape(-1))
            temperature = self.log_temperature.clamp(float(np.log(1e-3)), 0.0).exp()
            weights = torch.softmax(nb_scores.reshape(nb.shape) / temperature, dim=1)
            q = (weights[..., None] * aligned.index_select(0, best)).sum(1)
            q = q / torch.linalg.vector_norm(q, dim=1, keepdim=True).clamp_min(1e-8)
            q = q * torch.where(q[:, :1] < 0, -1.0, 1.0)  # w >= 0, as the simulator's truth
            feats = torch.stack([top * 10, (top - mean) * 10, torch.softmax(logits, 1).max(dim=1).values], 1)
            return logits, q, self.confidence(feats)[:, 0]

    return PhaseOrientationNet()


def build_inference_model(net):
    """What is exported: (patterns, code book) -> (phase probabilities, quaternion, orientation confidence)."""
    import torch
    from torch import nn

    class Inference(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, flat, codes, neighbours, aligned, geometry_index):
            logits, q, conf = self.net(flat, codes, neighbours, aligned, geometry_index)
            return torch.softmax(logits, dim=1), q, torch.sigmoid(conf)

    return Inference().eval()


def quat_multiply(a, b):
    """Hamilton product, broadcasting; last axis (w, x, y, z)."""
    import torch

    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([aw * bw - ax * bx - ay * by - az * bz, aw * bx + ax * bw + ay * bz - az * by,
                        aw * by - ax * bz + ay * bw + az * bx, aw * bz + ax * by - ay * bx + az * bw], -1)


def symmetric_dot(q_pred, q_true, ops):
    """max over the 24 equivalents s * q_true of |<q_pred, s q_true>| (cos of half the disorientation)."""
    equivalents = quat_multiply(ops[None, :, :], q_true[:, None, :])  # (B, 24, 4)
    return (equivalents * q_pred[:, None, :]).sum(-1).abs().max(dim=1).values.clamp(max=1.0)


def symmetric_angle_deg(q_pred, q_true, ops):
    """Disorientation angle (deg) under the 24 proper cubic rotations (equivalents s * q_true)."""
    import torch

    equivalents = quat_multiply(ops[None, :, :], q_true[:, None, :])  # (B, 24, 4)
    dot = (equivalents * q_pred[:, None, :]).sum(-1).abs().max(dim=1).values.clamp(max=1.0)
    return torch.rad2deg(2.0 * torch.acos(dot))


def _epoch_inputs(clean: td.CleanSet, rng: np.random.Generator) -> np.ndarray:
    out = np.empty((len(clean), td.WORKING_SHAPE[0] * td.WORKING_SHAPE[1]), np.float32)
    for start in range(0, len(clean), 8192):
        frames = td.corrupt(clean.images[start:start + 8192], rng)
        out[start:start + 8192] = td.preprocess(frames)
    return out


def train(config: TrainConfig, out: Path, *, command: str = "") -> Path:
    """Simulate, train, write ``out/checkpoint.pt`` and ``out/train.json``; returns the checkpoint."""
    import torch

    set_one_core(torch)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log.info("rendering %d training patterns (seed %d)", config.n_train, config.seed)
    clean = td.render_clean(config.n_train, seed=config.seed, progress=True)
    val_clean = td.render_clean(config.n_val, seed=config.seed + 1_000_003)
    val_x = torch.from_numpy(td.preprocess(td.camera_frames(val_clean.images, np.random.default_rng(1), "moderate")))
    render_s = time.perf_counter() - t0
    log.info("rendered in %.0f s", render_s)
    codebook = build_codebook(config.cell_resolution, config.embed_dim)

    net = build_network(len(td.PHASES), config.width, config.hidden, embed=codebook["embed"])
    book = (codebook["codes"], codebook["neighbours"], codebook["aligned"], codebook["geometry_index"])
    ops = torch.from_numpy(cubic_operators())
    steps_per_epoch = len(clean) // config.batch
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch,
                                                pct_start=0.15)
    phase_t = torch.from_numpy(clean.phase)
    rot_t = torch.from_numpy(clean.rotations)
    history = [{"epoch": 0, **_validate(build_inference_model(net), val_x, val_clean, ops, book)}]
    log.info("before training: %s", history[0])
    for epoch in range(config.epochs):
        te = time.perf_counter()
        net.train()
        x_all = torch.from_numpy(_epoch_inputs(clean, rng))
        order = torch.from_numpy(rng.permutation(len(clean)))
        sums = np.zeros(4)
        for step in range(steps_per_epoch):
            idx = order[step * config.batch:(step + 1) * config.batch]
            logits, q, conf = net(x_all[idx], *book)
            dot = symmetric_dot(q, rot_t[idx], ops)
            # |q - s q_true| for the nearest equivalent and sign; the clamp keeps the gradient finite
            # (through acos it is infinite at zero error: epoch 2 of the first full run went NaN).
            dist = torch.sqrt((2.0 - 2.0 * dot).clamp_min(1e-8))
            angle = torch.rad2deg(2.0 * torch.acos(dot.detach().clamp(max=1.0)))
            ce = torch.nn.functional.cross_entropy(logits, phase_t[idx])
            bce = torch.nn.functional.binary_cross_entropy_with_logits(conf, (angle.detach() <= CONFIDENT_DEG).float())
            loss = ce + config.orientation_weight * dist.mean() + config.confidence_weight * bce
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            opt.step()
            sched.step()
            sums += [loss.item(), ce.item(), float(angle.detach().median()), bce.item()]
        val = _validate(build_inference_model(net), val_x, val_clean, ops, book)
        row = {"epoch": epoch + 1, "loss": sums[0] / steps_per_epoch, "ce": sums[1] / steps_per_epoch,
               "train_median_deg": sums[2] / steps_per_epoch, "bce": sums[3] / steps_per_epoch,
               "seconds": round(time.perf_counter() - te, 1), **val}
        history.append(row)
        log.info("epoch %d/%d: %s", epoch + 1, config.epochs, json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                                                         for k, v in row.items()}))
    path = out / "checkpoint.pt"
    torch.save({"state_dict": net.state_dict(), "config": asdict(config), "phases": list(td.PHASES),
                "temperature": float(net.log_temperature.detach().clamp(float(np.log(1e-3)), 0.0).exp())}, path)
    (out / "train.json").write_text(json.dumps({
        "config": asdict(config), "history": history, "render_seconds": round(render_s, 1),
        "train_seconds": round(time.perf_counter() - t0, 1), "command": command,
        "sources": [list(s) for s in td.TRAIN_SOURCES], "geometry_range": td.GeometryRange().to_json(),
        "variation": td.Variation().to_json(), "codebook_sources": [list(s) for s in CODEBOOK_SOURCES],
    }, indent=1))
    log.info("checkpoint %s after %.0f s", path, time.perf_counter() - t0)
    return path


def _validate(model, val_x, val_clean: td.CleanSet, ops, book) -> dict:
    import torch

    model.eval()
    with torch.no_grad():
        probs, q, conf = model(val_x, *book)
        angle = symmetric_angle_deg(q, torch.from_numpy(val_clean.rotations), ops)
    pred = probs.argmax(1).numpy()
    phase_ok = pred == val_clean.phase
    model.net.train()
    return {"val_phase_accuracy": float(phase_ok.mean()), "val_median_deg": float(angle.median()),
            "val_within3": float((angle <= 3).float().mean())}


def load_checkpoint(path: Path):
    """The exportable inference module of a checkpoint, and the checkpoint."""
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    net = build_network(len(ckpt["phases"]), ckpt["config"]["width"], ckpt["config"]["hidden"],
                        embed=ckpt["state_dict"]["embed"])
    net.load_state_dict(ckpt["state_dict"])
    net.net_config = ckpt["config"]
    model = build_inference_model(net)
    model.net_config = ckpt["config"]
    return model, ckpt

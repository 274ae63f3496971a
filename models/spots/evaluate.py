"""Evaluation sets of spot patterns and their scores, for tests and benchmarks.

``make_set`` renders independent patterns (each its own random orientation, or one near a
low-index zone axis, phase, thickness and beam-centre jitter) with the simulator's renderer;
``score_answers`` says how many are right: phase, disorientation, and disorientation modulo
the 180-degree turn about the beam that kinematical patterns cannot see.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from liveindex.models.crystal import disorientation_by_phase, quaternion_multiply

from .simulator import NOISE_LEVELS, SpotPatternRenderer, uniform_quaternions
from .templates import directions_to_matrices

# Rel-rod widths (1/angstrom) of the patterns: about 1/thickness for 20-40 nm thin foils.
EXCITATION_RANGE = (0.025, 0.05)
ZONE_AXES = np.array([[0, 0, 1], [0, 1, 1], [1, 1, 1], [0, 1, 2], [1, 1, 2], [0, 1, 3], [1, 2, 3]], float)


@dataclass
class EvaluationSet:
    frames: np.ndarray  # (N, H, W) uint16
    quaternions: np.ndarray  # (N, 4) truth
    phase_id: np.ndarray  # (N,) index into the renderer's phases
    centers: np.ndarray  # (N, 2) true beam centres


def make_set(phases, setup: dict, n: int, *, noise: str = "moderate", seed: int = 0, near_zone: float = 0.0,
             pattern_shape=(128, 128), phase_weights=None, center_jitter: bool = True) -> EvaluationSet:
    """``n`` patterns of ``phases`` (each at random, weights ``phase_weights``); a fraction
    ``near_zone`` within 3 degrees of a low-index zone axis, the rest at random orientations."""
    rng = np.random.default_rng(seed)
    renderer = SpotPatternRenderer(phases, setup, pattern_shape)
    q = uniform_quaternions(rng, n)
    zone = rng.random(n) < near_zone
    if zone.any():
        axes = ZONE_AXES[rng.integers(0, len(ZONE_AXES), zone.sum())]
        axes = axes / np.linalg.norm(axes, axis=1, keepdims=True)
        tilt = rng.normal(0, np.deg2rad(1.5), (zone.sum(), 3))
        axes = axes + tilt
        axes /= np.linalg.norm(axes, axis=1, keepdims=True)
        from .diffraction import matrices_to_quaternions

        base = matrices_to_quaternions(directions_to_matrices(axes))
        turn = rng.uniform(0, 2 * np.pi, zone.sum())
        rz = np.stack([np.cos(turn / 2), 0 * turn, 0 * turn, np.sin(turn / 2)], 1)
        q[zone] = quaternion_multiply(base, rz)
    q *= np.where(q[:, :1] < 0, -1.0, 1.0)
    phase = rng.choice(len(phases), n, p=phase_weights)
    width = rng.uniform(*EXCITATION_RANGE, n)
    h, w = pattern_shape
    level = NOISE_LEVELS[noise]
    spread = np.hypot(1.0, level.jitter) if center_jitter else 0.0
    centers = np.array([w / 2, h / 2]) + rng.normal(0, 1.0, (n, 2)) * spread
    frames = np.empty((n, h, w), np.uint16)
    for a in range(0, n, 200):
        sl = slice(a, a + 200)
        xy_all, inten_all = [], []
        for p in range(len(phases)):
            mine = np.flatnonzero(phase[sl] == p) + a
            if len(mine):
                xy, inten = renderer.spots(p, q[mine], width[mine])
                xy_all.append((mine, xy))
                inten_all.append(inten)
        size = max(i.shape[1] for i in inten_all)
        xy_page = np.zeros((len(phase[sl]), size, 2))
        inten_page = np.zeros((len(phase[sl]), size))
        for (mine, xy), inten in zip(xy_all, inten_all):
            xy_page[mine - a, :xy.shape[1]] = xy
            inten_page[mine - a, :inten.shape[1]] = inten
        frames[sl] = renderer.render(xy_page, inten_page, centers[sl], level, rng)
    return EvaluationSet(frames, q.astype(np.float32), phase.astype(np.int16), centers)


def score_answers(fields: dict, truth_q: np.ndarray, truth_phase: np.ndarray, phases) -> dict:
    """Right phase, disorientation (median, 95th percentile, within 3 deg), also modulo the
    180-degree turn about the beam; ``errors_mod180`` per point (NaN where the phase is wrong)."""
    phase = fields["phase_id"]
    q = fields["quaternion"].astype(np.float64)
    right = phase == truth_phase
    pid = np.where(right, phase, -1)
    d = disorientation_by_phase(q, truth_q, pid, phases)
    d180 = disorientation_by_phase(quaternion_multiply(q, np.array([0.0, 0.0, 0.0, 1.0])), truth_q, pid, phases)
    dm = np.fmin(d, d180)
    within = np.where(right, dm, np.inf) < 3.0
    return {"right_phase": float(right.mean()), "median_deg": float(np.nanmedian(d)) if right.any() else None,
            "median_mod180_deg": float(np.nanmedian(dm)) if right.any() else None,
            "p95_mod180_deg": float(np.nanpercentile(dm, 95)) if right.any() else None,
            "within3": float((np.where(right, d, np.inf) < 3).mean()), "within3_mod180": float(within.mean()),
            "errors_mod180": dm, "right": right & within}

"""How sure an answer is: a probability that the phase is right and the orientation within 3 deg.

The refined NCC alone cannot say it. A right answer on a noisy pattern and a wrong phase's
best fit on a clean one reach the same NCC (about 0.2: hcp Ti patterns fitted with nickel,
austenite fitted with ferrite), so a scan of a phase missing from the list came back
confident. What tells them apart is how much of the pattern's *structure* the answer
explains: after the fit, a right answer leaves white noise, a wrong one leaves Kikuchi bands
it could not place.

``explained_share`` measures that per pattern. The residual r = p - NCC·t (p the
preprocessed pattern, t the rendered answer, both unit norm) is split by a small Gaussian
blur L into white noise, of which a known share ``white`` survives the blur (measured once
per scan geometry by passing Poisson noise through the same preprocessing), and structure,
which survives almost whole:

    unexplained structure  U = max(<Lr, r> - white·|r|^2, 0) / (1 - white)
    explained share        E = NCC^2 / (NCC^2 + U)

E is near 1 for right answers at every noise level and 0.1-0.6 for a wrong phase's fit.
The confidence is a logistic in log NCC and log E, fitted by
benchmarks/calibrate_confidence.py on simulated scans that include phases absent from the
list (fcc/bcc/hcp in every pairing) and every noise level, so that points above 0.5 are
right (phase and within 3 deg) at least 99% of the time over all of them.
"""

from __future__ import annotations

import functools

import numpy as np

from .preprocess import Preprocessor, blur_matrix

EXPLAINED_BLUR = 1.0  # Gaussian sigma of L, working pixels: Kikuchi bands are 2-4 working pixels wide
# Fitted by benchmarks/calibrate_confidence.py: logistic regression over simulated scans at
# moderate and hard noise (right answers, and wrong-phase fits in every pairing of fcc, bcc
# and hcp, weighted 5x) and the real kikuchipy Ni scan (right answers: real patterns leave
# more structure unexplained than simulated ones, E about 0.43, and must not read as wrong).
COEF_LOG_NCC = 10.59
COEF_LOG_EXPLAINED = 9.28
INTERCEPT = 14.21
# With the reliability R (best template near the answer / best distinct one; models/ebsd/
# indexer.py _compare_solutions): coefficients of log NCC, log E, log R, and the intercept.
# R does not depend on how well the model renders the pattern (both templates are rendered
# alike), so real patterns, which leave more structure unexplained (E about 0.43 on
# kikuchipy's Ni scan), still read as right where one orientation stands out.
RELIABLE = (7.15, 8.84, 8.1, 7.68)
WHITE_NOISE_FRAMES = 64


# An answer must fit better than pure noise does. On small patterns the confidence's features
# are out of the range it was fitted on: Poisson noise of 8x8 pixels matched against a 2-degree
# dictionary reached confidence 0.93-0.99 (12x12: 170 of 300 noise frames above 0.5), since the
# best of 30 000 templates fits 64 pixels of anything well. Each scan's indexer therefore
# indexes NOISE_FRAMES frames of Poisson noise through its own path once, and an answer's
# confidence is multiplied by 1 - NOISE_RARITY * S(NCC), S the chance that a noise frame fits
# at least as well. The best of many correlations has a Gumbel tail, so S comes from a Gumbel
# law with the noise NCCs' mean and spread (a normal tail let 1-2 of 300 noise frames of 16x16
# through). With NOISE_RARITY 200 the factor is 0.5 where one noise frame in 400 fits as well
# and 0 at one in 200. Measured by benchmarks/noise_confidence.py: no noise
# frame of 8, 12, 16 or 24 px above 0.5 (of 300 each); simulated Ni 20x20 scans at 60x60 keep
# every confident point at moderate noise and 97-98% of them at hard (183 of 188, 167 of 170),
# where right answers' NCC (0.16-0.25) comes within a few noise widths of noise's (0.147 +- 0.012).
NOISE_FRAMES = 64
NOISE_RARITY = 200.0
EULER_GAMMA = 0.5772156649


def noise_frames(preprocess: Preprocessor, n: int = NOISE_FRAMES, seed: int = 1) -> np.ndarray:
    """(n, H, W) Poisson noise frames at the scan's input size, the same every time for a seed."""
    h, w = preprocess.input_shape
    return np.random.default_rng(seed).poisson(100.0, (n, h, w)).astype(np.float32)


def above_noise(score: np.ndarray, noise_scores: np.ndarray) -> np.ndarray:
    """(B,) refined NCC, the NCCs the scan's indexer gave noise frames -> (B,) in [0, 1]: the
    factor the confidence is multiplied by (1 well above noise, 0 where noise often fits as well)."""
    spread = max(float(np.std(noise_scores)), 1e-4) * np.sqrt(6.0) / np.pi  # Gumbel scale
    mode = float(np.mean(noise_scores)) - EULER_GAMMA * spread
    survival = -np.expm1(-np.exp(-(np.asarray(score, np.float64) - mode) / spread))
    return np.clip(1.0 - NOISE_RARITY * survival, 0.0, 1.0).astype(np.float32)


def white_noise_share(preprocess: Preprocessor) -> float:
    """The share of a white-noise pattern's energy that survives the blur L, after the scan's
    preprocessing (binning, background subtraction, mask): the floor of ``explained_share``."""
    noise = noise_frames(preprocess, WHITE_NOISE_FRAMES, seed=0)
    flat, valid = preprocess(noise, None)
    flat = flat[valid]
    return float(np.mean(_blurred_dot(preprocess, flat) / np.maximum((flat * flat).sum(1), 1e-12)))


def explained_share(preprocess: Preprocessor, patterns: np.ndarray, templates: np.ndarray, ncc: np.ndarray,
                    white: float) -> np.ndarray:
    """(B, P) preprocessed patterns, (B, P) rendered answers (unit norm), (B,) NCC -> (B,) E in (0, 1]."""
    residual = patterns - ncc[:, None].astype(np.float32) * templates
    energy = (residual * residual).sum(1)
    unexplained = np.maximum(_blurred_dot(preprocess, residual) - white * energy, 0.0) / (1.0 - white)
    explained = np.square(np.maximum(ncc, 0.0))
    return (explained / np.maximum(explained + unexplained, 1e-12)).astype(np.float32)


def confidence(ncc: np.ndarray, explained: np.ndarray, reliability: np.ndarray | None = None) -> np.ndarray:
    """Refined NCC, explained share and (where the point was matched) reliability -> confidence
    in [0, 1]. Rows with a reliability use the three-feature logistic, the others (the
    network's answers) the two-feature one."""
    logit = (COEF_LOG_NCC * np.log(np.maximum(ncc, 1e-3)) + COEF_LOG_EXPLAINED * np.log(np.maximum(explained, 1e-3))
             + INTERCEPT)
    if reliability is not None:
        known = np.isfinite(reliability) & (reliability > 0)  # 0: not matched (the network's answers)
        if known.any():
            logit = np.asarray(logit, np.float64).copy()
            logit[known] = (RELIABLE[0] * np.log(np.maximum(ncc[known], 1e-3))
                            + RELIABLE[1] * np.log(np.maximum(explained[known], 1e-3))
                            + RELIABLE[2] * np.log(np.maximum(reliability[known], 1e-3)) + RELIABLE[3])
    return (1.0 / (1.0 + np.exp(-np.clip(logit, -50, 50)))).astype(np.float32)


def _blurred_dot(preprocess: Preprocessor, flat: np.ndarray) -> np.ndarray:
    """<L x, x> for each row x of (B, P) working-size patterns (zero outside the signal mask);
    L as two small matrix products, as the preprocessing's own blur."""
    rows, columns = _blur_matrices(tuple(preprocess.working_shape))
    images = flat.reshape(len(flat), *preprocess.working_shape)
    return (np.matmul(rows, images @ columns.T) * images).reshape(len(flat), -1).sum(1)


@functools.lru_cache(maxsize=16)
def _blur_matrices(working_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    return blur_matrix(working_shape[0], EXPLAINED_BLUR), blur_matrix(working_shape[1], EXPLAINED_BLUR)

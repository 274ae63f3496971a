"""Confidence of a spot-pattern answer: a logistic function of its reliability and score.

Coefficients fitted by ``benchmarks/spots_side_by_side.py --calibrate`` on simulated sets
(three steel phases plus a phase absent from the list, three noise levels): see the README's
TEM section for the measured fraction right above 0.5.
"""

import numpy as np

# logit = A_RELIABILITY * reliability + A_SCORE * score + BIAS
A_RELIABILITY = 20.0
A_SCORE = 10.0
BIAS = -4.0


def confidence(reliability: np.ndarray, score: np.ndarray) -> np.ndarray:
    logit = A_RELIABILITY * np.asarray(reliability) + A_SCORE * np.asarray(score) + BIAS
    return (1.0 / (1.0 + np.exp(-logit))).astype(np.float32)

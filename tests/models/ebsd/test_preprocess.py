"""The Preprocessor's fast paths (binning by strided adds, blur as matrix products) against
the plain numpy/scipy operations they replace."""

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from liveindex.models.ebsd.preprocess import Preprocessor


def reference(patterns: np.ndarray, prep: Preprocessor) -> np.ndarray:
    h, w = prep.working_shape
    fy, fx = patterns.shape[1] // h, patterns.shape[2] // w
    x = patterns.astype(np.float64).reshape(len(patterns), h, fy, w, fx).mean(axis=(2, 4))
    x -= gaussian_filter(x, (0, prep.sigma, prep.sigma), truncate=2.0)
    flat = x.reshape(len(x), -1)
    flat -= flat.mean(axis=1, keepdims=True)
    return flat / np.linalg.norm(flat, axis=1, keepdims=True)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(60, 60), (96, 72)])
def test_frames_preprocess_as_the_plain_operations_do(dtype, shape):
    rng = np.random.default_rng(3)
    top = 250 if dtype == np.uint8 else 60000 if dtype == np.uint16 else 1.0
    patterns = (rng.random((7, *shape)) * top).astype(dtype)
    prep = Preprocessor.for_shape(shape)
    flat, valid = prep(patterns)
    assert flat.dtype == np.float32 and valid.all()
    np.testing.assert_allclose(flat, reference(patterns, prep), atol=2e-6)


def test_frames_with_nan_or_no_contrast_are_not_valid():
    patterns = np.random.default_rng(4).random((3, 60, 60)).astype(np.float32)
    patterns[1, 5, 7] = np.nan
    patterns[2] = 0.5
    flat, valid = Preprocessor.for_shape((60, 60))(patterns)
    assert valid.tolist() == [True, False, False]
    assert not flat[1:].any() and np.isfinite(flat).all()

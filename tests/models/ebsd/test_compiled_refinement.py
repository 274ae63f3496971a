"""The compiled refinement system against the ONNX graph, its gradient against its NCC, and the
fine steps at the frames' own resolution against the truth."""

import numpy as np
import onnxruntime as ort
import pytest

from liveindex.models.ebsd import refinement
from liveindex.models.ebsd.compiled_refinement import CompiledSystem
from liveindex.models.ebsd.geometry import DetectorGeometry
from liveindex.models.ebsd.refiner import SYSTEM, quaternion_multiply, rotation_vector_quaternions

GEOMETRY = DetectorGeometry((60, 60))


@pytest.fixture(scope="module")
def rotations():
    rng = np.random.default_rng(4)
    q = rng.normal(size=(16, 4))
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def disc(shape):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - (shape[0] - 1) / 2) ** 2 + (xx - (shape[1] - 1) / 2) ** 2 < (shape[0] / 2 - 1) ** 2


def noisy(rendered, mask, seed=1):
    """Rendered patterns plus noise, preprocessed as frames are (zero mean over the mask, unit norm)."""
    p = rendered + 0.05 * np.random.default_rng(seed).normal(size=rendered.shape).astype(np.float32)
    m = np.ones(p.shape[1], np.float32) if mask is None else mask.reshape(-1).astype(np.float32)
    p = (p - (p * m).sum(1, keepdims=True) / m.sum()) * m
    return (p / np.linalg.norm(p, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("shape, masked", [((30, 30), False), ((30, 30), True), ((15, 15), False)])
def test_the_compiled_system_is_the_graphs(rotations, shape, masked):
    """Render, NCC, JᵀJ and Jᵀr as the ONNX graph computes them, to float32 precision, with and
    without a signal mask."""
    mask = disc(shape) if masked else None
    sigma = shape[1] / 8
    graph = ort.InferenceSession(refinement.build_graph("ni", GEOMETRY, shape, sigma, mask).SerializeToString(),
                                 providers=["CPUExecutionProvider"])
    compiled = CompiledSystem("ni", GEOMETRY, shape, sigma, mask)
    rendered = compiled.render(rotations)
    patterns = noisy(rendered, mask)
    ncc, jtj, jtr, expected = graph.run(SYSTEM + ["rendered"], {"quats": rotations, "patterns": patterns})
    np.testing.assert_allclose(rendered, expected, atol=2e-4)
    got = compiled.run(SYSTEM, {"quats": rotations, "patterns": patterns})
    np.testing.assert_allclose(got[0], ncc, atol=1e-5)
    np.testing.assert_allclose(got[1], jtj, atol=2e-3 * np.abs(jtj).max())
    np.testing.assert_allclose(got[2], jtr, atol=5e-3 * np.abs(jtr).max())


def test_the_fine_systems_gradient_is_its_ncc_derivative(rotations):
    """Without the high-pass (the fine level), Jᵀr is still -d NCC / dθ of the NCC it reports:
    central differences 1 deg off the truth, where the gradient is large."""
    fine = CompiledSystem("ni", GEOMETRY, (60, 60), 60 / 8, high_pass=False)
    patterns = noisy(fine.render(rotations), None)
    start = quaternion_multiply(rotation_vector_quaternions(np.full((len(rotations), 3), np.radians(1 / np.sqrt(3)))),
                                rotations.astype(np.float64))
    _, jtj, jtr = fine.run(SYSTEM, {"quats": start, "patterns": patterns})
    h = np.radians(0.02)
    numeric = np.empty_like(jtr)
    for k in range(3):
        step = np.zeros((len(start), 3))
        step[:, k] = h
        up, down = (fine.run(SYSTEM, {"quats": quaternion_multiply(rotation_vector_quaternions(sign * step), start),
                                      "patterns": patterns})[0] for sign in (1, -1))
        numeric[:, k] = -(up - down) / (2 * h)
    cosine = (jtr * numeric).sum(1) / np.linalg.norm(jtr, axis=1) / np.linalg.norm(numeric, axis=1)
    assert (cosine > 0.998).all(), cosine  # float32 differences of 3600 pixels
    ratio = np.linalg.norm(jtr, axis=1) / np.linalg.norm(numeric, axis=1)
    assert ((ratio > 0.97) & (ratio < 1.03)).all(), ratio
    assert (np.linalg.eigvalsh(jtj.astype(np.float64)) > 0).all()


def test_the_fine_steps_bring_the_answers_closer_to_the_truth(moderate_scan):
    """60x60 frames: matched and refined at 30x30, then a step on every pixel; switched off (the
    working size's answer), the same scan's median error is at least 1.3x larger."""
    from liveindex.models.ebsd.indexer import ScanIndexer
    from liveindex.models.ebsd.master_patterns import disorientation_degrees

    frames = moderate_scan.render(0, moderate_scan.size)
    indexer = ScanIndexer(moderate_scan.geometry, ["ni"], progress=False, min_confidence=0.0)
    assert indexer.fine_preprocess is not None and indexer.fine_preprocess.working_shape == (60, 60)
    fine = indexer.index(frames, indexer.new_background())
    indexer.fine_preprocess = None
    working = indexer.index(frames, indexer.new_background())
    fine_error = np.median(disorientation_degrees(fine.quaternion, moderate_scan.truth))
    working_error = np.median(disorientation_degrees(working.quaternion, moderate_scan.truth))
    assert fine_error * 1.3 < working_error, (fine_error, working_error)
    np.testing.assert_array_equal(fine.phase_id, working.phase_id)
    np.testing.assert_array_equal(fine.score, working.score)  # the score stays the working size's NCC

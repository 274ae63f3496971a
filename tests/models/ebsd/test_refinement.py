"""The refinement graph against kikuchipy's renderer, and its gradient against the NCC it reports."""

import numpy as np
import onnxruntime as ort
import pytest

from liveindex.models.ebsd import refinement
from liveindex.models.ebsd.geometry import DetectorGeometry
from liveindex.models.ebsd.preprocess import Preprocessor
from liveindex.models.ebsd.refiner import SYSTEM, Refiner, quaternion_multiply, rotation_vector_quaternions

GEOMETRY = DetectorGeometry().with_shape((30, 30))


def session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def rotations():
    from orix.quaternion import Rotation

    np.random.seed(4)
    return Rotation.random(12).data.astype(np.float32)


def kikuchipy_patterns(rotations):
    from orix.quaternion import Rotation

    from liveindex.models.ebsd.master_patterns import master_pattern

    prep = Preprocessor.for_shape(GEOMETRY.pattern_shape)
    sim = master_pattern("ni").get_patterns(Rotation(rotations), GEOMETRY.kikuchipy_detector(),
                                            energy=GEOMETRY.energy_kv, compute=True, dtype_out=np.float32,
                                            show_progressbar=False)
    return prep, prep(np.asarray(sim.data))[0]


def test_the_graph_renders_as_kikuchipy_does(rotations):
    """Unblurred master: the graph's render of R and kikuchipy's get_patterns(R) are the same pattern."""
    prep, flat = kikuchipy_patterns(rotations)
    master = refinement.master_array("ni", GEOMETRY.energy_kv)
    graph = session(refinement.build_gauss_newton_graph(refinement.direction_cosines(GEOMETRY), master,
                                                         prep.working_shape, prep.sigma))
    ncc = graph.run(None, {"quats": rotations, "patterns": flat})[0]
    assert (ncc > 0.9999).all(), ncc


def test_rendered_patterns_score_as_the_graph_does(rotations):
    """Refiner.render's patterns (the page rescue screens grains with them): their dot product
    with a preprocessed frame is the NCC the graph reports for that frame."""
    prep, flat = kikuchipy_patterns(rotations)
    refiner = Refiner("ni", GEOMETRY, prep.working_shape, prep.sigma, providers=["CPUExecutionProvider"])
    rendered = refiner.render(rotations)
    assert rendered.shape == flat.shape
    np.testing.assert_allclose(np.linalg.norm(rendered, axis=1), 1.0, atol=1e-5)
    ncc = refiner.gn_session.run(["ncc"], {"quats": rotations, "patterns": flat})[0]
    np.testing.assert_allclose((rendered * flat).sum(axis=1), ncc, atol=1e-5)
    # Each frame matches its own orientation's pattern far better than the others'.
    assert (np.argmax(flat @ rendered.T, axis=1) == np.arange(len(flat))).all()


def test_gauss_newton_gradient_is_the_ncc_derivative(rotations):
    """Jᵀr = -d NCC / dθ (n is unit-norm, so Jᵀn = 0): checked by central differences of the NCC."""
    prep, flat = kikuchipy_patterns(rotations)
    graph = session(refinement.build_graph("ni", GEOMETRY, prep.working_shape, prep.sigma))

    def ncc(q):
        return graph.run(None, {"quats": q.astype(np.float32), "patterns": flat})[0]

    # Start 1 deg off the truth, where the gradient is large.
    start = quaternion_multiply(rotation_vector_quaternions(np.full((len(rotations), 3), np.radians(1 / np.sqrt(3)))),
                                rotations.astype(np.float64))
    _, jtj, jtr = graph.run(SYSTEM, {"quats": start.astype(np.float32), "patterns": flat})
    h = np.radians(0.02)
    numeric = np.empty_like(jtr)
    for k in range(3):
        step = np.zeros((len(start), 3))
        step[:, k] = h
        up, down = (ncc(quaternion_multiply(rotation_vector_quaternions(sign * step), start)) for sign in (1, -1))
        numeric[:, k] = -(up - down) / (2 * h)
    # The same vector to within 3%: the graph differentiates the very bilinear patches it
    # samples (measured: cosine 0.9996 or more, magnitudes 0.99-1.01).
    cosine = (jtr * numeric).sum(1) / np.linalg.norm(jtr, axis=1) / np.linalg.norm(numeric, axis=1)
    assert (cosine > 0.999).all(), cosine
    ratio = np.linalg.norm(jtr, axis=1) / np.linalg.norm(numeric, axis=1)
    assert ((ratio > 0.97) & (ratio < 1.03)).all(), ratio
    assert (np.linalg.eigvalsh(jtj.astype(np.float64)) > 0).all()  # JᵀJ positive definite


def test_a_signal_mask_is_applied_as_the_preprocessor_does(rotations):
    """With a circular signal mask, the graph's render still matches kikuchipy's pattern
    preprocessed with the mask, whatever the frames hold outside it."""
    yy, xx = np.mgrid[:30, :30]
    circle = (yy - 14.5) ** 2 + (xx - 14.5) ** 2 < 14 ** 2
    prep = Preprocessor.for_shape(GEOMETRY.pattern_shape, signal_mask=circle)
    _, flat_plain = kikuchipy_patterns(rotations)
    from orix.quaternion import Rotation

    from liveindex.models.ebsd.master_patterns import master_pattern

    raw = np.asarray(master_pattern("ni").get_patterns(Rotation(rotations), GEOMETRY.kikuchipy_detector(),
                                                       energy=GEOMETRY.energy_kv, compute=True, dtype_out=np.float32,
                                                       show_progressbar=False).data)
    junk = raw.copy()
    junk[:, ~circle] = np.random.default_rng(1).uniform(0, 5 * raw.max(), (len(raw), int((~circle).sum())))
    flat, _ = prep(raw)
    np.testing.assert_allclose(prep(junk)[0], flat, atol=1e-5)  # the outside never reaches the result
    assert (flat[:, ~circle.reshape(-1)] == 0).all()
    master = refinement.master_array("ni", GEOMETRY.energy_kv)
    graph = session(refinement.build_gauss_newton_graph(refinement.direction_cosines(GEOMETRY), master,
                                                         prep.working_shape, prep.sigma, prep.mask))
    ncc = graph.run(None, {"quats": rotations, "patterns": flat})[0]
    assert (ncc > 0.9999).all(), ncc
    assert not np.allclose(flat, flat_plain)  # the mask did change the preprocessing


def test_the_render_only_graph_renders_what_the_gauss_newton_graph_does(rotations):
    """Confidences and screenings render with the graph cut to the pattern (no derivatives): the
    same patterns as the Gauss-Newton graph's ``rendered`` output, with and without a signal mask."""
    prep = Preprocessor.for_shape(GEOMETRY.pattern_shape)
    mask = np.ones(GEOMETRY.pattern_shape, bool)
    mask[:4] = False
    for signal in (None, mask):
        full = session(refinement.build_graph("ni", GEOMETRY, prep.working_shape, prep.sigma, signal))
        render = session(refinement.build_graph("ni", GEOMETRY, prep.working_shape, prep.sigma, signal,
                                                render_only=True))
        assert [i.name for i in render.get_inputs()] == ["quats"]
        blank = np.zeros((len(rotations), prep.n_pixels), np.float32)
        expected = full.run(["rendered"], {"quats": rotations, "patterns": blank})[0]
        np.testing.assert_allclose(render.run(["rendered"], {"quats": rotations})[0], expected, atol=1e-6)

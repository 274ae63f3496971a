"""The matcher's shortlist (templates ranked by correlation energy before the in-plane angles)
keeps the answers of scoring every template over every angle."""

import numpy as np

from liveindex.models.spots.evaluate import make_set
from liveindex.models.spots.indexer import find_centers
from liveindex.models.spots.matcher import SHORTLIST, PolarMatcher, build_graph
from liveindex.models.spots.phases import phases_from_spec
from liveindex.models.spots.setup import check_setup
from liveindex.models.spots.templates import PolarGrid, build_library

SETUP = check_setup({"kv": 200.0, "calibration": 0.03, "precession": 1.0}, (128, 128))


def test_the_shortlist_keeps_the_full_search_answers(tmp_path):
    phases = phases_from_spec("ferrite,cementite")
    grid = PolarGrid.for_shape((128, 128))
    libraries = [build_library(p, SETUP, (128, 128), grid, 2.0) for p in phases]
    real = np.concatenate([lib.real for lib in libraries])
    imag = np.concatenate([lib.imag for lib in libraries])
    n = len(real)
    assert n > 4 * SHORTLIST  # the shortlist leaves most templates out
    matchers = {}
    for name, shortlist in (("full", n), ("short", SHORTLIST)):
        build_graph(tmp_path / f"{name}.onnx", real, imag, grid, (128, 128), SETUP["ellipticity"], shortlist=shortlist)
        matchers[name] = PolarMatcher(tmp_path / f"{name}.onnx", (128, 128), grid, SETUP["ellipticity"],
                                      providers="cpu", threads=1)
    ev = make_set(phases, SETUP, 64, noise="moderate", seed=3)
    frames = ev.frames.astype(np.float32)
    centers = find_centers(frames)
    full = matchers["full"].match(frames, centers)
    short = matchers["short"].match(frames, centers)
    # Measured (1200 moderate patterns of three phases, seeds 7 and 11): the best two templates and
    # their angles the same everywhere, the top 32 the same set in 97%; 64 instead of 384 changed
    # 13 answers.
    np.testing.assert_array_equal(short[1][:, :2], full[1][:, :2])
    np.testing.assert_array_equal(short[2][:, :2], full[2][:, :2])
    np.testing.assert_allclose(short[0][:, :2], full[0][:, :2], rtol=1e-5, atol=1e-6)
    same_set = np.mean([set(a) == set(b) for a, b in zip(short[1], full[1])])
    assert same_set >= 0.85, same_set
    np.testing.assert_array_equal(short[3], full[3])  # the polar images come before the shortlist


def test_the_compiled_polar_transform_is_the_front_graphs_bit_for_bit():
    import onnxruntime as ort

    from liveindex.models.spots.matcher import front_graph, polar_offsets, polar_transform

    grid = PolarGrid.for_shape((128, 128))
    ev = make_set(phases_from_spec("ferrite,cementite"), SETUP, 8, noise="moderate", seed=4)
    frames = ev.frames.astype(np.float32)
    # centres found, and some off the frame's middle: the polar grid leaves the frame (zero padding)
    centers = np.concatenate([find_centers(frames)[:5], [[20.3, 64.0], [64.0, 110.7], [3.5, 124.2]]])
    session = ort.InferenceSession(front_graph((128, 128), grid), providers=["CPUExecutionProvider"])
    for ellipticity in ((1.0, 0.0), (1.04, 30.0)):
        scale = np.array([2.0 / 127, 2.0 / 127])
        offsets = (polar_offsets(grid, ellipticity) * scale).astype(np.float32).reshape(-1, 2)
        centers_norm = (centers.astype(np.float32) * np.float32(2.0 / 127) - 1.0).astype(np.float32)
        sampling = np.empty((len(frames), len(offsets), 2), np.float32)
        np.add(offsets[None, :, 0], centers_norm[:, 0, None], out=sampling[:, :, 0])
        np.add(offsets[None, :, 1], centers_norm[:, 1, None], out=sampling[:, :, 1])
        expected = session.run(None, {"frames": frames, "grid": sampling.reshape(len(frames), len(grid.radii),
                                                                                 grid.angles, 2)})[0]
        found = np.empty_like(expected)
        polar_transform(frames, centers_norm, offsets, found)
        assert (expected[5:] == 0).any() and expected.max() > 1  # off the frame and on spots: a real comparison
        np.testing.assert_array_equal(found, expected)

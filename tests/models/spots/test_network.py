"""The spot networks: a tiny bundle trained for seconds (torch), exported to ONNX and run in ONNX
Runtime classifies simulated patterns far better than chance; its features do not change when
the pattern turns about the beam; the indexer uses a bundle only where it covers the scan; the
shipped bundle loads and says what it was trained for."""

import json
import logging
import subprocess
import sys

import numpy as np
import pytest

from liveindex.models.spots.evaluate import make_set
from liveindex.models.spots.network import DEFAULT_BUNDLE, Bundle, SpotNetworks, phase_fingerprint, spectrum_features
from liveindex.models.spots.phases import phases_from_spec
from liveindex.models.spots.setup import check_setup

SETUP = check_setup({"kv": 200.0, "calibration": 0.03, "precession": 1.0}, (128, 128))


@pytest.fixture(scope="module")
def phases():
    return phases_from_spec("ferrite,cementite")


@pytest.fixture(scope="module")
def tiny_bundle(phases, tmp_path_factory):
    pytest.importorskip("torch")
    from liveindex.models.spots.train import train_bundle

    out = tmp_path_factory.mktemp("spots") / "tiny"
    train_bundle(phases, SETUP, out, n_per_phase=600, epochs=6, n_val=0, hidden=64, batch=32)
    return out


def polar_of(frames, centers=None):
    from liveindex.models.spots.indexer import find_centers
    from liveindex.models.spots.templates import PolarGrid
    from liveindex.models.spots.train import PolarFront

    frames = frames.astype(np.float32)
    front = PolarFront((128, 128), PolarGrid.for_shape((128, 128)))
    return front(frames, find_centers(frames) if centers is None else centers)


def test_a_tiny_bundle_classifies_phases_in_onnx_runtime(phases, tiny_bundle):
    meta = json.loads((tiny_bundle / "bundle.json").read_text())
    assert [p["name"] for p in meta["phases"]] == ["ferrite", "cementite"]
    networks = SpotNetworks(Bundle.load(tiny_bundle), providers="cpu", threads=1)
    ev = make_set(phases, SETUP, 120, noise="moderate", seed=7)
    probs = networks.phase_probabilities(spectrum_features(polar_of(ev.frames)))
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    accuracy = (probs.argmax(1) == ev.phase_id).mean()
    assert accuracy >= 0.75, accuracy  # chance: about 0.5 (measured: 0.9+ after these seconds)
    directions = networks.direction_probabilities(1, spectrum_features(polar_of(ev.frames[:4])))
    assert directions.shape == (4, meta["phases"][1]["templates"])


def test_the_features_do_not_change_when_the_pattern_turns(phases):
    from liveindex.models.crystal import quaternion_multiply
    from liveindex.models.spots.simulator import NOISE_LEVELS, SpotPatternRenderer, uniform_quaternions

    rng = np.random.default_rng(3)
    renderer = SpotPatternRenderer(phases, SETUP, (128, 128))
    q = uniform_quaternions(rng, 6)
    turn = np.deg2rad(37.0)
    turned = quaternion_multiply(q, np.array([np.cos(turn / 2), 0, 0, np.sin(turn / 2)]))
    centers = np.tile([64.0, 64.0], (6, 1))
    frames = [renderer.render(*renderer.spots(0, qq, 0.04), centers, NOISE_LEVELS["clean"], rng) for qq in (q, turned)]
    a, b = (spectrum_features(polar_of(f, centers)) for f in frames)
    same = np.linalg.norm(a - b, axis=1)
    apart = np.linalg.norm(a - np.roll(a, 1, axis=0), axis=1)  # between different orientations: the scale
    assert np.all(same < 0.15), same
    assert np.median(same) < 0.3 * np.median(apart), (same, apart)


def test_the_indexer_uses_the_bundle_only_where_it_covers_the_scan(phases, tiny_bundle, caplog):
    from liveindex.models.spots.indexer import SpotIndexer

    with caplog.at_level(logging.INFO, logger="liveindex.models.spots.indexer"):
        other = check_setup({"kv": 200.0, "calibration": 0.025, "precession": 1.0}, (128, 128))
        assert SpotIndexer(other, phases, (128, 128), providers="cpu", threads=1, bundle=tiny_bundle).network is None
    assert "calibration 0.025" in caplog.text and "template matching alone" in caplog.text
    with caplog.at_level(logging.INFO, logger="liveindex.models.spots.indexer"):
        unknown = phases_from_spec("ferrite,austenite")  # the tiny bundle knows ferrite and cementite
        assert SpotIndexer(SETUP, unknown, (128, 128), providers="cpu", threads=1, bundle=tiny_bundle).network is None
    assert "does not know austenite" in caplog.text
    ferrite = phases_from_spec("ferrite")  # one of the bundle's phases: its classifier offers only that one
    assert SpotIndexer(SETUP, ferrite, (128, 128), providers="cpu", threads=1, bundle=tiny_bundle).network is not None
    indexer = SpotIndexer(SETUP, phases, (128, 128), providers="cpu", threads=1, bundle=tiny_bundle)
    assert indexer.network is not None and "networks" in indexer.model_name
    ev = make_set(phases, SETUP, 24, noise="moderate", seed=5)
    fields = indexer.index(ev.frames)
    assert (fields["phase_id"] == ev.phase_id).mean() >= 0.8


def test_the_inference_path_imports_no_torch(tiny_bundle):
    code = ("import sys, numpy as np\n"
            "from liveindex.models.spots.indexer import SpotIndexer\n"
            "from liveindex.models.spots.phases import phases_from_spec\n"
            "from liveindex.models.spots.setup import check_setup\n"
            "s = check_setup({'kv': 200.0, 'calibration': 0.03, 'precession': 1.0}, (128, 128))\n"
            f"ix = SpotIndexer(s, phases_from_spec('ferrite,cementite'), (128, 128), bundle={str(tiny_bundle)!r})\n"
            "assert ix.network is not None\n"
            "ix.index(np.random.default_rng(0).poisson(3, (4, 128, 128)).astype(np.uint16))\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"


def test_the_shipped_bundle_loads_and_says_what_it_covers():
    bundle = Bundle.load(DEFAULT_BUNDLE)
    assert bundle.phase_names == ["ferrite", "austenite", "cementite"]
    records = phases_from_spec("ferrite,austenite,cementite")
    assert [p["fingerprint"] for p in bundle.meta["phases"]] == [phase_fingerprint(r) for r in records]
    assert bundle.meta["setup"] == {"kv": 200.0, "calibration": 0.03, "precession": 1.0, "pattern_shape": [128, 128],
                                    "resolution_deg": 2.0}
    mapping, why = bundle.covers(SETUP, records, (128, 128), 2.0)
    assert mapping == [0, 1, 2] and why == ""
    mapping, why = bundle.covers(SETUP, records, (256, 256), 2.0)
    assert mapping == [None] * 3 and "patterns (256, 256)" in why
    figures = bundle.meta["validation"]
    assert figures["phase_accuracy"] > 0.9
    size = sum(f.stat().st_size for f in DEFAULT_BUNDLE.iterdir())
    assert size < 8e6, size
    networks = SpotNetworks(bundle, providers="cpu", threads=1)
    ev = make_set(records, SETUP, 60, noise="moderate", seed=7)
    probs = networks.phase_probabilities(spectrum_features(polar_of(ev.frames)))
    assert (probs.argmax(1) == ev.phase_id).mean() >= 0.85


def test_a_folder_that_is_no_spot_bundle_is_refused_in_one_line(tmp_path):
    from liveindex.models.errors import InputError

    with pytest.raises(InputError, match="no readable bundle.json"):
        Bundle.load(tmp_path)
    (tmp_path / "bundle.json").write_text(json.dumps({"format": 1, "name": "default"}))  # as EBSD's
    with pytest.raises(InputError, match="not a spot-pattern bundle"):
        Bundle.load(tmp_path)

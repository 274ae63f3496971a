"""The scan-adaptive basis: fitted on tile means, carried on the wire, the same embedding
for the same frame whatever page it comes in."""

import numpy as np
import pytest

from liveindex.models.errors import ProtocolError
from liveindex.models.latent.basis import LatentBasis, fit_basis, read_tiles, tile_starts


def _scan(ny=40, nx=40, p=100, weak=0.6, seed=0):
    """Two regions with very different mean features, and inside one of them round patches
    whose features differ by ``weak`` noise sigmas (a precipitate in a grain): features and
    labels (0, 1, 2)."""
    rng = np.random.default_rng(seed)
    a, b, d = rng.uniform(1, 2, p), rng.uniform(1, 2, p), rng.standard_normal(p)
    d *= weak / np.linalg.norm(d) * np.sqrt(p) * 0.05
    yy, xx = np.mgrid[0:ny, 0:nx]
    label = np.where(xx < nx // 2, 0, 1)
    label[((yy - 20) ** 2 + (xx - 30) ** 2) <= 36] = 2
    means = np.stack([a, b, b + d])
    x = means[label.ravel()] + rng.normal(0, 0.05, (ny * nx, p))
    return x.astype(np.float32), label.ravel()


def test_tiles_are_spread_and_seeded():
    starts = tile_starts((100, 100), 64)
    assert len(starts) == 64 and np.array_equal(starts, tile_starts((100, 100), 64))
    assert starts[:, 0].max() - starts[:, 0].min() > 50  # not only the first rows
    assert len(tile_starts((4, 4), 1000)) == 4  # a small scan: as many as fit


def test_basis_finds_a_weak_split_and_embeddings_do_not_depend_on_the_page():
    x, label = _scan(weak=3.0)
    tiles = read_tiles(lambda first, n: x[first:first + n], (40, 40), lambda f: f, 400)
    basis = fit_basis(tiles, (10, 10), dims=8)
    assert basis.dims == 8 and np.allclose(basis.components @ basis.components.T, np.eye(8), atol=1e-4)
    e = basis.embed(x).astype(np.float32)
    assert e.dtype == np.float32 and e.shape == (1600, 8)
    # The patch (3 sigma per point) stands out from the rest of its region in the embedding.
    m1, m2 = e[label == 1].mean(0), e[label == 2].mean(0)
    spread = np.std((e[label == 1] - m1) @ ((m2 - m1) / np.linalg.norm(m2 - m1)))
    assert np.linalg.norm(m2 - m1) / spread > 2.0
    # Any split of the frames into pages gives the same embedding.
    assert np.array_equal(basis.embed(x[:7]), basis.embed(x)[:7])
    assert np.array_equal(basis.embed(x[700:703]), basis.embed(x)[700:703])


def test_basis_round_trips_the_wire_and_maps_back():
    x, _ = _scan()
    basis = fit_basis(x[:400], (10, 10), dims=8)
    back = LatentBasis.from_wire(basis.to_wire())
    assert np.array_equal(back.embed(x[:5]), basis.embed(x[:5])) and back.feature_shape == (10, 10)
    # A frame in the span of the basis comes back from its embedding.
    inside = basis.reconstruct(basis.embed(x[:1]).astype(np.float32))
    assert inside.shape == (1, 100) and np.isfinite(inside).all()


@pytest.mark.parametrize("change, match", [
    (lambda w: w.update(v=9), "version"),
    (lambda w: w.update(dims=64), "dims"),
    (lambda w: w.update(components=w["components"][:-4]), "sizes"),
    (lambda w: w.update(mean=np.full(100, np.nan, "<f4").tobytes()), "non-finite"),
    (lambda w: w.pop("scale"), "scale"),
])
def test_a_malformed_basis_is_refused_in_one_line(change, match):
    x, _ = _scan()
    wire = fit_basis(x[:400], (10, 10), dims=8).to_wire()
    change(wire)
    with pytest.raises(ProtocolError, match=match):
        LatentBasis.from_wire(wire)


def test_frames_without_signal_embed_as_nan():
    x, _ = _scan()
    basis = fit_basis(x[:400], (10, 10), dims=8)
    bad = x[:3].copy()
    bad[1] = np.nan
    e = basis.embed(bad)
    assert np.isnan(e[1]).all() and np.isfinite(e[[0, 2]]).all()


def test_a_basis_from_few_tiles_keeps_its_width():
    x, _ = _scan()
    basis = fit_basis(x[:5], (10, 10), dims=16)
    assert basis.dims == 16 and np.allclose(basis.components @ basis.components.T, np.eye(16), atol=1e-4)

"""Training, export and adaptation of the latent maps' encoder networks (torch, CPU, offline).

``liveindex models train-encoder --modality ebsd|spots`` trains a small autoencoder on the
modality's latent features of simulated scans (models/ebsd/simulator.py SimulatedScan,
models/spots/simulator.py SimulatedSpotScan), and ``liveindex models adapt FILE`` fine-tunes
one on a scan's own frames. Both write one ONNX file (models/latent/encoder.py EncoderFile:
the encoder graph, the decoder in its metadata). Nothing on the inference path imports this.

What the network learns from (the same on simulations and on a scan's own frames):

- inputs: single frames' features, in the scan's noise sigmas (encoder.scan_normalisation:
  per feature, minus the median of the 3x3 tile means, over the median spread inside a tile;
  robust, and measured on the scan the encoder then embeds);
- targets: the mean of the frame's 3x3 tile (9 times less noisy): a denoising autoencoder,
  whose latent keeps what neighbouring frames share, as the PCA basis is fitted on tile means;
- spot patterns: the rotation-invariance constraint. Each batch also holds pairs of one
  pattern and a copy turned in plane (simulated: the spots themselves turned; a scan's own
  frames: the image turned about its centre) with their own noise; the loss adds the squared
  distance between the two latents over that between different patterns, so a turn does not
  move the latent (the features are invariant up to interpolation and noise; the loss makes
  the encoder ignore what is left). All of a spots encoder's dims are the invariant part.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from liveindex.models.errors import InputError

from .encoder import EncoderFile, LatentEncoder, scan_normalisation, scan_tiles

log = logging.getLogger(__name__)

HIDDEN = {"ebsd": (48, 32), "spots": (96, 48)}  # EBSD: 900 features in, about 350 kB for both graphs
DIMS = {"ebsd": 16, "spots": 24}  # the modalities' declared embedding widths
INVARIANCE_WEIGHT = 1.0
LATENT_PENALTY = 1e-3  # keeps the latent's scale bounded (the decoder could otherwise shrink it)
OPSET = 17


def _torch():
    try:
        import torch
    except ImportError:
        raise InputError("training an encoder needs torch: pip install -e '.[train]'") from None
    torch.set_num_threads(1)
    return torch


def build_model(n_features: int, dims: int, hidden, seed: int = 0):
    torch = _torch()
    torch.manual_seed(seed)  # the initial weights: a run with the same epochs makes the same file
    nn = torch.nn

    class AutoEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            h0, h1 = hidden
            self.encoder = nn.Sequential(nn.Linear(n_features, h0), nn.SiLU(), nn.Linear(h0, h1), nn.SiLU(),
                                         nn.Linear(h1, dims))
            self.decoder = nn.Sequential(nn.Linear(dims, h1), nn.SiLU(), nn.Linear(h1, h0), nn.SiLU(),
                                         nn.Linear(h0, n_features))

        def forward(self, x):
            z = self.encoder(x)
            return z, self.decoder(z)

    return AutoEncoder()


# -- data -------------------------------------------------------------------------------------


@dataclass
class TrainingData:
    """Normalised single-frame inputs, their tile-mean targets, and rotated pairs (spots)."""

    x: np.ndarray  # (N, P)
    target: np.ndarray  # (N, P)
    pairs: np.ndarray | None = None  # (M, 2, P): a pattern and its turned copy
    info: dict = field(default_factory=dict)


def _virtual_scans(tile_feats: np.ndarray, rng, rounds: int = 2):
    """(T, 9, P) tiles of one pattern each -> (x, target): the tiles shuffled and cut into
    virtual scans of 4 to 32 tiles, each normalised on its own tiles as a scan is at embedding
    time (its centre is then near its own few patterns, as a real scan's is); ``rounds``
    times, each with other company (the same frames under other normalisations)."""
    tile_feats = tile_feats[np.isfinite(tile_feats).all(axis=(1, 2))]
    xs, ts = [], []
    for _ in range(rounds):
        order = rng.permutation(len(tile_feats))
        at = 0
        while at < len(order) - 3:
            tiles = tile_feats[order[at:at + int(rng.integers(4, 33))]]
            at += len(tiles)
            centre, scale = scan_normalisation(tiles)
            target = np.repeat(tiles.mean(axis=1, keepdims=True), tiles.shape[1], axis=1)
            xs.append(((tiles - centre) * scale).reshape(-1, tiles.shape[-1]))
            ts.append(((target - centre) * scale).reshape(-1, tiles.shape[-1]))
    return np.concatenate(xs), np.concatenate(ts)


def ebsd_data(n_scans: int = 4, side: int = 60, seed: int = 100) -> TrainingData:
    """Virtual tiles of simulated EBSD patterns (60x60: 30x30 features): ``n_scans`` simulated
    scans of side x side points, grains of 9 points (Ni, or Ni, Fe or Ni3Al at random, and a
    Ni3Al precipitate pattern in each grain's orientation, cube-cube), laid out as 3x3 tiles of
    one of these patterns each (many orientations: an encoder of a few grains' patterns would not
    generalise); moderate and hard noise."""
    from liveindex.models.ebsd.latent import features
    from liveindex.models.ebsd.simulator import SimulatedScan

    xs, ts = [], []
    for k in range(n_scans):
        rng = np.random.default_rng(seed + k)
        noise = ("moderate", "hard")[k % 2]
        phase = ["ni", "fe", "ni3al"] if k % 2 else "ni"
        scan = SimulatedScan((side, side), phase=phase, precipitate="ni3al", noise=noise, seed=seed + k,
                             grain_size=3.0, precipitate_share=0.3, precipitate_radius=1.0)
        n_tiles = scan.size // 9
        tile_grain = rng.choice(len(scan._grain_patterns), n_tiles, replace=len(scan._grain_patterns) < n_tiles)
        scan.grain_of_point = np.repeat(tile_grain, 9)
        feats = features(scan.render(0, n_tiles * 9)).reshape(n_tiles, 9, -1)
        x, t = _virtual_scans(feats, rng)
        xs.append(x)
        ts.append(t)
        log.info("encoder data: EBSD patterns %d/%d (%s noise, %d tiles)", k + 1, n_scans, noise, n_tiles)
    return TrainingData(np.concatenate(xs), np.concatenate(ts),
                        info={"scans": n_scans, "side": side, "seed": seed, "pattern_shape": [60, 60]})


def spots_data(n_tiles: int = 1600, seed: int = 100, n_pairs: int = 1024) -> TrainingData:
    """Virtual tiles of simulated precession spot patterns (128x128, 200 kV, 1 deg, 0.03 1/A a
    pixel): each tile 9 frames of one grain (ferrite, austenite or cementite, a random
    orientation and thickness) turned in plane by random angles, or of amorphous film, with
    the direct beam jittered; moderate and hard noise; and turned pairs for the invariance loss."""
    from liveindex.models.spots.latent import SpotFeatures
    from liveindex.models.spots.phases import phases_from_spec
    from liveindex.models.spots.setup import check_setup
    from liveindex.models.spots.simulator import NOISE_LEVELS, SpotPatternRenderer, uniform_quaternions

    phases = phases_from_spec("ferrite,austenite,cementite")
    setup = check_setup({"kv": 200.0, "calibration": 0.03, "precession": 1.0}, (128, 128))
    feats_of = SpotFeatures(setup, (128, 128))
    renderer = SpotPatternRenderer(phases, setup, (128, 128))
    rng = np.random.default_rng(seed)
    xs, ts, pairs = [], [], []
    for noise_name in ("moderate", "hard"):
        noise = NOISE_LEVELS[noise_name]
        tiles = []
        for g in range(n_tiles // 2):
            amorphous = rng.random() < 0.08
            width = rng.uniform(0.015, 0.03)
            xy, inten = renderer.spots(int(rng.integers(0, len(phases))), uniform_quaternions(rng, 1), width)
            angle = rng.uniform(0, 2 * np.pi, 9)
            c, s = np.cos(angle)[:, None], np.sin(angle)[:, None]
            turned = np.stack([c * xy[..., 0] - s * xy[..., 1], s * xy[..., 0] + c * xy[..., 1]], -1)
            inten = np.repeat(inten, 9, axis=0) * (0.0 if amorphous else 1.0)
            centres = np.array([64.0, 64.0]) + rng.uniform(-2, 2, 2) + rng.normal(0, noise.jitter or 0.3, (9, 2))
            beam = np.full(9, 1.2 if amorphous else 0.5 + (width - 0.015) / 0.015 * 0.6)
            frames = renderer.render(turned, inten, centres, noise, rng, amorphous=np.full(9, amorphous), beam=beam)
            tiles.append(feats_of(frames))
            if g % 200 == 0:
                log.info("encoder data: spot tiles %d/%d (%s noise)", g, n_tiles // 2, noise_name)
        tiles = np.stack(tiles)
        x, t = _virtual_scans(tiles, rng)
        xs.append(x)
        ts.append(t)
        # Turned pairs, in the noise sigmas of these tiles: two frames of a tile (different angles).
        centre, scale = scan_normalisation(tiles)
        pairs.append((tiles[:, :2] - centre) * scale)
    pairs = np.concatenate(pairs)
    pairs = pairs[np.isfinite(pairs).all(axis=(1, 2))][:n_pairs]
    return TrainingData(np.concatenate(xs), np.concatenate(ts), pairs,
                        info={"tiles": n_tiles, "seed": seed, "pairs": int(len(pairs)), "pattern_shape": [128, 128]})


# -- training ---------------------------------------------------------------------------------


def losses(torch, model, x, target, pairs=None) -> dict:
    """Reconstruction (MSE against the tile means), the invariance ratio on turned pairs, the latent penalty."""
    z, back = model(x)
    out = {"reconstruction": torch.mean((back - target) ** 2), "latent": torch.mean(z ** 2)}
    if pairs is not None and len(pairs) > 1:
        za, zb = model.encoder(pairs[:, 0]), model.encoder(pairs[:, 1])
        same = torch.mean(torch.sum((za - zb) ** 2, 1))
        other = torch.mean(torch.sum((za - torch.roll(za, 1, 0)) ** 2, 1))
        out["invariance"] = same / (other + 1e-6)
    return out


def fit(model, data: TrainingData, *, seconds: float, batch: int = 256, lr: float = 2e-3, seed: int = 0,
        stop: threading.Event | None = None, max_epochs: int = 1000) -> dict:
    """Adam on the data for ``seconds`` (or ``max_epochs``, or until ``stop``); returns the history."""
    torch = _torch()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(np.ascontiguousarray(data.x, np.float32))
    t = torch.from_numpy(np.ascontiguousarray(data.target, np.float32))
    pairs = torch.from_numpy(np.ascontiguousarray(data.pairs, np.float32)) if data.pairs is not None else None
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    history = []
    start = said = time.perf_counter()
    epoch = 0
    while epoch < max_epochs and time.perf_counter() - start < seconds and not (stop is not None and stop.is_set()):
        order = torch.from_numpy(rng.permutation(len(x)))
        sums: dict[str, float] = {}
        steps = 0
        for i in range(0, len(x) - batch // 2, batch):
            idx = order[i:i + batch]
            p = pairs[torch.from_numpy(rng.integers(0, len(pairs), batch // 4))] if pairs is not None else None
            parts = losses(torch, model, x[idx], t[idx], p)
            loss = parts["reconstruction"] + LATENT_PENALTY * parts["latent"]
            if "invariance" in parts:
                loss = loss + INVARIANCE_WEIGHT * parts["invariance"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            steps += 1
            if time.perf_counter() - start > seconds or (stop is not None and stop.is_set()):
                break
        epoch += 1
        history.append({k: round(v / max(steps, 1), 5) for k, v in sums.items()})
        if time.perf_counter() - said > 15:
            said = time.perf_counter()
            log.info("encoder epoch %d (%.0f s): %s", epoch, said - start, history[-1])
    return {"epochs": epoch, "seconds": round(time.perf_counter() - start, 1), "history": history[-3:]}


def reconstruction_loss(encoder: LatentEncoder, feats: np.ndarray, targets: np.ndarray) -> float:
    """Mean squared error (in the encoder's normalised units) of the ONNX graphs on (N, P)
    features against (N, P) targets (tile means): what adapt lowers."""
    z = encoder.embed(feats).astype(np.float32)
    back = encoder.reconstruct(z)
    ok = np.isfinite(back).all(axis=1)
    return float(np.mean(((back[ok] - targets[ok]) * encoder.scale) ** 2))


# -- ONNX -------------------------------------------------------------------------------------


def export(model, modality: str, *, invariant_dims: int, provenance: dict, path=None,
           feature_shape=None) -> EncoderFile:
    """The two graphs as ONNX (the TorchScript exporter: named initializers, which adapt reads
    back); checked to load in ONNX Runtime and to match torch to 1e-4."""
    import io

    torch = _torch()
    model.eval()
    n_features = model.encoder[0].in_features
    dims = model.encoder[-1].out_features
    graphs = {}
    for name, net, width, inp, outp in (("encoder", model.encoder, n_features, "features", "latent"),
                                        ("decoder", model.decoder, dims, "latent", "features")):
        buf = io.BytesIO()
        torch.onnx.export(net, torch.zeros(2, width), buf, input_names=[inp], output_names=[outp],
                          dynamic_axes={inp: {0: "batch"}, outp: {0: "batch"}}, opset_version=OPSET, dynamo=False)
        graphs[name] = buf.getvalue()
    shape = tuple(feature_shape or FEATURE_SHAPES[modality])
    hidden = [model.encoder[0].out_features, model.encoder[2].out_features]
    out = EncoderFile(graphs["encoder"], graphs["decoder"], modality, shape, dims, invariant_dims,
                      {**provenance, "hidden": hidden})
    check_parity(model, out)
    if path is not None:
        out.save(path)
    model.train()
    return out


FEATURE_SHAPES = {"ebsd": (30, 30), "spots": (16, 8)}  # of the simulated training patterns


def check_parity(model, encoder_file: EncoderFile, tol: float = 1e-4) -> float:
    """Max difference between torch and ONNX Runtime on random inputs; InputError over ``tol``
    (relative to the output's scale)."""
    torch = _torch()
    rng = np.random.default_rng(0)
    p = model.encoder[0].in_features
    x = rng.normal(0, 2, (64, p)).astype(np.float32)
    enc = LatentEncoder(encoder_file, np.zeros(p, np.float32), np.ones(p, np.float32))
    with torch.no_grad():
        z_t = model.encoder(torch.from_numpy(x)).numpy()
        back_t = model.decoder(torch.from_numpy(z_t)).numpy()
    sess = enc._session("encoder")
    z_o = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    back_o = enc.reconstruct(z_t)
    worst = max(float(np.abs(z_o - z_t).max() / (np.abs(z_t).max() + 1e-6)),
                float(np.abs(back_o - back_t).max() / (np.abs(back_t).max() + 1e-6)))
    if worst > tol:
        raise InputError(f"the exported encoder differs from torch by {worst:.2e} (relative), over {tol:g}")
    log.info("encoder export: ONNX Runtime matches torch to %.1e (relative)", worst)
    return worst


def model_from_file(encoder_file: EncoderFile):
    """The torch autoencoder with the weights of an exported file (the initializers, by name)."""
    import onnx
    from onnx import numpy_helper

    torch = _torch()
    hidden = encoder_file.provenance.get("hidden") or HIDDEN[encoder_file.modality]
    p = encoder_file.feature_shape[0] * encoder_file.feature_shape[1]
    model = build_model(p, encoder_file.dims, hidden)
    state = {}
    for name, graph in (("encoder", encoder_file.encoder), ("decoder", encoder_file.decoder)):
        for init in onnx.load_from_string(graph).graph.initializer:
            state[f"{name}.{init.name}"] = torch.from_numpy(numpy_helper.to_array(init).copy())
    missing = set(model.state_dict()) - set(state)
    if missing:
        raise InputError(f"the encoder's graphs lack weights {sorted(missing)[:4]}: not one this version exported")
    model.load_state_dict({k: state[k] for k in model.state_dict()})
    return model


# -- the commands -----------------------------------------------------------------------------


def train_encoder(modality: str, out, *, seconds: float = 120.0, seed: int = 0, n_scans: int | None = None,
                  side: int | None = None, epochs: int | None = None, command: str = "") -> EncoderFile:
    """Simulate, train for ``seconds`` (or ``epochs``, whichever ends first: the epochs a
    file records make it again, the time alone depends on the machine), export to ``out``."""
    t0 = time.perf_counter()
    if modality == "ebsd":
        data = ebsd_data(n_scans or 4, side or 60, seed=100 + seed)
    elif modality == "spots":
        data = spots_data((n_scans or 4) * (side or 20) ** 2, seed=100 + seed)
    else:
        raise InputError(f"no encoder for modality {modality!r}: ebsd or spots")
    simulate_s = time.perf_counter() - t0
    model = build_model(data.x.shape[1], DIMS[modality], HIDDEN[modality], seed=seed)
    report = fit(model, data, seconds=seconds, seed=seed, max_epochs=epochs or 1_000_000)
    provenance = {"command": command, "trained_on": data.info, "frames": int(len(data.x)),
                  "simulate_s": round(simulate_s, 1), **report}
    return export(model, modality, invariant_dims=DIMS[modality] if modality == "spots" else 0,
                  provenance=provenance, path=out)


def _turned_frames(frames: np.ndarray, rng) -> np.ndarray:
    """The frames turned in plane by random angles about the image centre (bilinear)."""
    from scipy.ndimage import rotate

    out = np.empty(frames.shape, np.float32)
    for i, f in enumerate(frames):
        out[i] = rotate(f.astype(np.float32), float(rng.uniform(0, 360)), reshape=False, order=1, mode="nearest")
    return out


def scan_training_data(source, modality: str, features, *, tiles: int = 512, pairs: int = 256,
                       seed: int = 0) -> tuple[TrainingData, np.ndarray, np.ndarray]:
    """A scan's own frames as training data: ``tiles`` 3x3 tiles spread over it, each frame
    against its tile's mean, normalised as the scan_start's encoder will be; spots: ``pairs``
    frames and copies turned about the image centre. Returns (data, centre, scale)."""
    frame_tiles = scan_tiles(source.read, source.nav_shape, features, tiles)  # (T, 9, P)
    centre, scale = scan_normalisation(frame_tiles)
    ok = np.isfinite(frame_tiles).all(axis=(1, 2))
    frame_tiles = frame_tiles[ok]
    target = np.repeat(frame_tiles.mean(axis=1, keepdims=True), frame_tiles.shape[1], axis=1)
    x = (frame_tiles.reshape(-1, frame_tiles.shape[-1]) - centre) * scale
    t = (target.reshape(-1, frame_tiles.shape[-1]) - centre) * scale
    turned = None
    if modality == "spots" and pairs:
        rng = np.random.default_rng(seed)
        picks = np.sort(rng.choice(source.size, min(pairs, source.size), replace=False))
        frames = np.concatenate([source.read(int(i), 1) for i in picks])
        a, b = features(frames), features(_turned_frames(frames, rng))
        both = np.stack([a, b], 1)
        turned = (both[np.isfinite(both).all(axis=(1, 2))] - centre) * scale
    return TrainingData(x, t, turned, info={"tiles": int(len(frame_tiles))}), centre, scale


class Adapter(threading.Thread):
    """Fine-tunes an encoder on a scan's own frames in the background (its own thread, one
    torch thread: indexing goes on beside it). ``result`` is the adapted EncoderFile once done;
    ``stop()`` ends training early (what was learnt so far is kept); ``maybe_raise()`` raises
    its error."""

    def __init__(self, source, modality: str, features, *, encoder=None, out=None, seconds: float = 120.0,
                 tiles: int = 512, seed: int = 0, command: str = ""):
        super().__init__(name="encoder-adapt", daemon=True)
        self.source, self.modality, self.features = source, modality, features
        self.encoder_path = encoder
        self.out, self.seconds, self.tiles, self.seed, self.command = out, seconds, tiles, seed, command
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.result: EncoderFile | None = None
        self.report: dict = {}

    def stop(self) -> None:
        self.stop_event.set()

    def maybe_raise(self) -> None:
        if self.error is not None:
            raise self.error

    def run(self) -> None:
        try:
            self.result = self._adapt()
        except BaseException as exc:  # kept for the owner (maybe_raise)
            self.error = exc

    def _adapt(self) -> EncoderFile:
        from .encoder import default_encoder_path

        path = Path(self.encoder_path) if self.encoder_path else default_encoder_path(self.modality)
        start = EncoderFile.load(path)
        if start.modality != self.modality:
            raise InputError(f"encoder {path} is for {start.modality} patterns, not {self.modality}")
        data, centre, scale = scan_training_data(self.source, self.modality, self.features, tiles=self.tiles,
                                                 seed=self.seed)
        p = data.x.shape[1]
        if tuple(start.feature_shape) == _shape_of(self.source, self.modality) and p == np.prod(start.feature_shape):
            model = model_from_file(start)
            began = f"from {path}"
        else:  # another pattern size: a new encoder of this scan's features, trained on it alone
            model = build_model(p, start.dims, HIDDEN[self.modality])
            began = f"new ({p} features: {path} takes {start.feature_shape})"
        torch = _torch()
        with torch.no_grad():
            before = _loss_of(torch, model, data)
        report = fit(model, data, seconds=self.seconds, seed=self.seed, stop=self.stop_event, lr=1e-3)
        with torch.no_grad():
            after = _loss_of(torch, model, data)
        self.report = {"began": began, "loss_before": before, "loss_after": after, **report}
        log.info("encoder adapt: reconstruction %.4f -> %.4f on %d frames of the scan (%s)",
                 before["reconstruction"], after["reconstruction"], len(data.x), began)
        made = export(model, self.modality, invariant_dims=start.invariant_dims,
                      provenance={"command": self.command, "adapted": began, "scan_frames": int(len(data.x)),
                                  **self.report}, feature_shape=_shape_of(self.source, self.modality))
        if self.out is not None:
            made.save(self.out)
        return made


def _shape_of(source, modality: str) -> tuple[int, int]:
    if modality == "ebsd":
        from liveindex.models.ebsd.latent import feature_shape

        return feature_shape(source.pattern_shape)
    from liveindex.models.spots.latent import feature_shape

    return feature_shape()


def _loss_of(torch, model, data: TrainingData) -> dict:
    x = torch.from_numpy(np.ascontiguousarray(data.x, np.float32))
    t = torch.from_numpy(np.ascontiguousarray(data.target, np.float32))
    p = torch.from_numpy(np.ascontiguousarray(data.pairs, np.float32)) if data.pairs is not None else None
    return {k: round(float(v), 5) for k, v in losses(torch, model, x, t, p).items()}


def features_of(source, modality: str):
    """The modality's latent feature function for a source's frames."""
    if modality == "ebsd":
        from liveindex.models.ebsd.latent import features

        return features
    from liveindex.models.spots.latent import SpotFeatures

    return SpotFeatures(source.setup, source.pattern_shape)


def adapt(source, modality: str, *, encoder=None, out=None, seconds: float = 120.0, tiles: int = 512, seed: int = 0,
          command: str = "", wait: bool = True) -> Adapter:
    """Start fine-tuning the encoder (``encoder``: a file; default the modality's shipped one)
    on ``source``'s frames in a background thread; with ``wait`` (the command) join it and
    raise its error. The adapted file is written to ``out`` and kept as ``Adapter.result``."""
    adapter = Adapter(source, modality, features_of(source, modality), encoder=encoder, out=out, seconds=seconds,
                      tiles=tiles, seed=seed, command=command)
    adapter.start()
    if wait:
        adapter.join()
        adapter.maybe_raise()
    return adapter

"""The phase/orientation network at inference: a model bundle run by ONNX Runtime.

No torch here, nor anywhere this module imports (a test checks it): training and export
live in models/train.py and models/export.py.

A bundle is a folder with ``bundle.json``, ``network.onnx`` and ``embedding.npy``; the default
one ships in ``liveindex/models/bundles/default``. The graph's orientation code book (one code
per orientation cell and band geometry, models/codebook.py) is too large to ship; it is a
function of the bundle and the master patterns, built on first use (about 30 s, one core)
and cached, as template dictionaries are. The graph takes preprocessed patterns, exactly what
``stream.preprocess.Preprocessor`` gives a worker, (B, P) float32 rows, zero-mean and
unit-norm at the bundle's working shape, and returns, per pattern:

- ``phase_probabilities`` (B, n_phases), softmax;
- ``quaternion`` (B, 4), unit, w >= 0, orix convention (the convention kikuchipy simulates
  with: a pattern from ``EBSDMasterPattern.get_patterns(R, detector)`` is answered as R up
  to crystal symmetry; any of the 24 cubic equivalents may come back);
- ``orientation_confidence`` (B,), the network's estimate of P(error <= 3 deg), in [0, 1].
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path

import numpy as np

from liveindex.models.ebsd.geometry import DetectorGeometry
from liveindex.models.errors import InputError, LiveIndexError

log = logging.getLogger(__name__)

BUNDLE_FORMAT = 1
NETWORK_FILE = "network.onnx"
EMBEDDING_FILE = "embedding.npy"


def default_bundle_path() -> Path:
    return Path(str(resources.files("liveindex.models.ebsd") / "bundles" / "default"))


def quantize_code_scoring(model):
    """The exported graph made faster for the CPU: its code-book scoring (normalised embedding
    (B, D) @ codes (G, D, K), then the best cell) in int8.

    The embedding is quantized per call (DynamicQuantizeLinear), the codes once per scan with
    one symmetric scale (inputs ``codes_int8`` (G, D, K) and ``code_scale`` ()), the MatMul is
    an integer one, and the best cell is found on the integer dots by blocks
    (_best_cell_by_blocks): one scale for all, so their order is the scores'. Only the best
    value and the neighbours' dots are scaled back. The float ``codes`` input stays for the
    mean code. On CPUs with VNNI/AMX the graph runs in about a third of the float one's time;
    answers stay within a few hundredths of a degree of it at moderate noise
    (tests/models/test_network.py)."""
    from onnx import TensorProto, helper

    graph = model.graph
    (node,) = [n for n in graph.node if n.op_type == "MatMul" and list(n.input)[1:] == ["codes"]]
    embedding, (scores,) = node.input[0], node.output
    position = list(graph.node).index(node)
    graph.node.remove(node)
    # `scores` now holds the integer dots; its readers are Shape ops, the TopK (replaced below)
    # and one Gather of the neighbours' scores (scaled after it).
    replacement = [
        helper.make_node("DynamicQuantizeLinear", [embedding], ["emb_u8", "emb_scale", "emb_zero"]),
        helper.make_node("MatMulInteger", ["emb_u8", "codes_int8", "emb_zero"], [scores]),
        helper.make_node("Mul", ["code_scale", "emb_scale"], ["dot_scale"]),
    ]
    for offset, new in enumerate(replacement):
        graph.node.insert(position + offset, new)
    graph.input.extend([helper.make_tensor_value_info("codes_int8", TensorProto.INT8, ["geometries", "dim", "cells"]),
                        helper.make_tensor_value_info("code_scale", TensorProto.FLOAT, [])])
    readers = [n for n in graph.node if scores in n.input and n.op_type not in ("Shape", "TopK")]
    (flatten,) = readers
    (gather,) = [n for n in graph.node if flatten.output[0] in n.input]
    _scale_output(graph, gather, "neighbour")
    _best_cell_by_blocks(graph, scores)
    return model


def _scale_output(graph, node, tag: str) -> None:
    """Integer dots out of ``node`` -> scores: Cast and multiply by dot_scale, under the old name."""
    from onnx import TensorProto, helper

    (out,) = node.output
    node.output[0] = f"{tag}_dots"
    position = list(graph.node).index(node) + 1
    graph.node.insert(position, helper.make_node("Cast", [f"{tag}_dots"], [f"{tag}_dots_float"], to=TensorProto.FLOAT))
    graph.node.insert(position + 1, helper.make_node("Mul", [f"{tag}_dots_float", "dot_scale"], [out]))


def _best_cell_by_blocks(graph, scores: str) -> None:
    """Replace TopK(k=1) over the code dots (G, B, K) by a two-level argmax: the best of each
    block of CODE_BLOCK cells (ReduceMax, vectorised), the best block (ArgMax over K/64), the
    best cell in it. K must be a multiple of the block: the int8 code book is padded with
    zero codes (NetworkModel._int8_codes)."""
    from onnx import TensorProto, helper, numpy_helper

    (node,) = [n for n in graph.node if n.op_type == "TopK" and n.input[0] == scores]
    values, indices = node.output
    position = list(graph.node).index(node)
    graph.node.remove(node)
    graph.initializer.extend([numpy_helper.from_array(np.array([0, 0, -1, CODE_BLOCK], np.int64), "block_shape"),
                              numpy_helper.from_array(np.array([0, 1], np.int64), "block_lead"),
                              numpy_helper.from_array(np.array([1, CODE_BLOCK], np.int64), "block_tail"),
                              numpy_helper.from_array(np.array([3], np.int64), "block_axis"),
                              numpy_helper.from_array(np.array(CODE_BLOCK, np.int64), "block_size")])
    replacement = [
        helper.make_node("Reshape", [scores, "block_shape"], ["blocks"]),  # (G, B, K/64, 64)
        helper.make_node("ReduceMax", ["blocks"], ["block_max"], axes=[3], keepdims=0),  # (G, B, K/64)
        helper.make_node("ArgMax", ["block_max"], ["best_block"], axis=2, keepdims=1),  # (G, B, 1)
        helper.make_node("ReduceMax", ["block_max"], ["best_dots"], axes=[2], keepdims=1),
        helper.make_node("Cast", ["best_dots"], ["best_dots_float"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["best_dots_float", "dot_scale"], [values]),
        helper.make_node("Shape", ["blocks"], ["blocks_shape"]),
        helper.make_node("Gather", ["blocks_shape", "block_lead"], ["lead_dims"], axis=0),
        helper.make_node("Concat", ["lead_dims", "block_tail"], ["pick_shape"], axis=0),  # [G, B, 1, 64]
        helper.make_node("Unsqueeze", ["best_block", "block_axis"], ["best_block4"]),
        helper.make_node("Expand", ["best_block4", "pick_shape"], ["pick"]),
        helper.make_node("GatherElements", ["blocks", "pick"], ["best_block_dots"], axis=2),  # (G, B, 1, 64)
        helper.make_node("ArgMax", ["best_block_dots"], ["offset"], axis=3, keepdims=0),  # (G, B, 1)
        helper.make_node("Mul", ["best_block", "block_size"], ["block_start"]),
        helper.make_node("Add", ["block_start", "offset"], [indices]),
    ]
    for offset, new in enumerate(replacement):
        graph.node.insert(position + offset, new)


CODE_BLOCK = 64


class NetworkModel:
    """Phase and orientation from one pattern, by a network in ONNX Runtime.

    Capabilities, as the other indexers declare them (stream/indexer.py):
    """

    method = "nn"
    needs_geometry = False  # trained over a geometry range; see covers()
    gives_phase = True
    batch_hint = 256

    def __init__(self, folder: Path, bundle: dict, session, provider: str):
        from .training_data import GeometryRange

        self._book = None  # the orientation code book: built or loaded on first use
        self._codes = {}  # code-book subsets by band geometries
        self._quantized_codes = {}  # their int8 forms, for a quantized session
        self.quantized = False
        self.folder = folder
        self.bundle = bundle
        self.session = session
        self.provider = provider
        self.phases: list[str] = [p["name"] for p in bundle["phases"]]
        self.working_shape: tuple[int, int] = tuple(bundle["input"]["working_shape"])
        # The camera frame size the codes are made for (binned to working_shape as a worker does).
        self.frame_shape: tuple[int, int] = tuple(bundle["input"].get("trained_frame_shape", self.working_shape))
        self.n_pixels = int(self.working_shape[0] * self.working_shape[1])
        self.geometry_range = GeometryRange.from_json(bundle["geometry_range"])

    @classmethod
    def load(cls, path: str | Path | None = None, *, providers: str = "auto", threads: int = 1,
             quantized: bool | None = None) -> "NetworkModel":
        """Load a bundle folder (None: the default bundle shipped in the package).

        ``threads`` is ONNX Runtime's intra-op thread count (0: all cores). ``quantized``: score
        the code book in int8 (quantize_code_scoring); None: on the CPU provider, not on a GPU.
        """
        import onnxruntime as ort

        from liveindex.models.onnx_runtime import choose_providers, session_options

        folder = Path(path) if path is not None else default_bundle_path()
        meta = folder / "bundle.json"
        if not meta.exists():
            raise InputError(f"{folder} is not a model bundle (no bundle.json); make one with `liveindex models export`")
        bundle = json.loads(meta.read_text())
        if bundle.get("format") != BUNDLE_FORMAT:
            raise InputError(f"model bundle {folder} has format {bundle.get('format')}; this liveindex reads {BUNDLE_FORMAT}")
        chosen = choose_providers(providers)
        if quantized is None:
            quantized = chosen == ["CPUExecutionProvider"]
        graph = folder / bundle.get("network", NETWORK_FILE)
        if quantized:
            import onnx

            graph = quantize_code_scoring(onnx.load(str(graph))).SerializeToString()
        session = ort.InferenceSession(graph if quantized else str(graph), session_options(threads), providers=chosen)
        provider = session.get_providers()[0]
        model = cls(folder, bundle, session, provider)
        model.quantized = quantized
        log.info("network bundle %s (phases %s) on %s", folder, ",".join(model.phases), provider)
        return model

    def covers(self, geometry: DetectorGeometry) -> bool:
        """Whether the scan geometry lies inside the PC/tilt range the network was trained on
        (and its patterns preprocess to the network's working shape)."""
        return self.geometry_range.contains(geometry)

    def phase_indices(self, names) -> list[int]:
        names = [str(n).lower() for n in names]
        unknown = [n for n in names if n not in self.phases]
        if unknown:
            raise InputError(f"phase(s) {unknown} are not in the network bundle {self.folder} (it knows {self.phases})")
        return [self.phases.index(n) for n in names]

    def codebook(self) -> dict:
        """The orientation code book (models/codebook.py), from the cache or built now (~30 s, once)."""
        if self._book is None:
            from . import codebook

            embed = np.load(self.folder / self.bundle["orientation"]["embedding"])
            nominal = DetectorGeometry(pc=self.geometry_range.pc_centre, energy_kv=self.geometry_range.energy_kv,
                                       pattern_shape=self.frame_shape)
            book = codebook.load_or_build(self.folder, self.bundle["orientation"]["cell_resolution_deg"], nominal,
                                          lambda t: t @ embed)
            self._book = {k: np.ascontiguousarray(book[k]) for k in ("codes", "neighbours", "aligned")}
        return self._book

    def codebook_inputs(self, allowed=None) -> dict:
        """The graph's code-book inputs. With one ``allowed`` phase, only the band geometries that
        serve it (codebook.CODEBOOK_SERVES): a one-phase scan scores a third of the codes. Two or
        more phases need every geometry's best score, the phase evidence that tells them apart."""
        from .codebook import CODEBOOK_SERVES, CODEBOOK_SOURCES

        book = self.codebook()
        geometries = list(range(len(CODEBOOK_SOURCES)))
        if allowed is not None and len(set(allowed)) == 1:
            geometries = list(CODEBOOK_SERVES[self.phases[allowed[0]]])
        if len(geometries) < len(CODEBOOK_SOURCES):
            key = tuple(geometries)
            if key not in self._codes:  # a contiguous copy per choice, made once
                self._codes[key] = np.ascontiguousarray(book["codes"][geometries])
            codes = self._codes[key]
        else:
            codes = book["codes"]
        return {"codes": codes, "neighbours": book["neighbours"], "aligned": book["aligned"],
                "geometry_index": np.asarray(geometries, np.int64)}

    def _int8_codes(self, codes: np.ndarray, key: tuple) -> dict:
        """The code book in int8 with one symmetric scale (max/127), made once per subset,
        padded with zero codes to a whole number of CODE_BLOCKs (they score 0, below any real
        code's best; neighbours and aligned quaternions are padded alike, so even an all-zero
        pattern lands on a real index)."""
        if key not in self._quantized_codes:
            g, d, k = codes.shape
            padded = -(-k // CODE_BLOCK) * CODE_BLOCK
            scale = np.float32(max(float(np.abs(codes).max()), 1e-12) / 127.0)
            quantized = np.zeros((g, d, padded), np.int8)
            quantized[:, :, :k] = np.round(codes / scale)
            book = self.codebook()
            extra = padded - k
            self._quantized_codes[key] = {
                "codes_int8": quantized, "code_scale": np.asarray(scale, np.float32),
                "neighbours": np.concatenate([book["neighbours"], np.repeat(book["neighbours"][:1], extra, 0)]),
                "aligned": np.concatenate([book["aligned"], np.repeat(book["aligned"][:1], extra, 0)]),
            }
        return self._quantized_codes[key]

    def warm_up(self, rows: int = 256) -> None:
        """Run one page-sized batch so the first real page does not pay for allocation."""
        self.predict(np.zeros((rows, self.n_pixels), np.float32))

    def predict(self, flat: np.ndarray, *, allowed=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(B, P) float32 preprocessed patterns -> (phase_index (B,) int64, quaternion (B, 4) float32,
        phase_confidence (B,) float32, orientation_confidence (B,) float32).

        ``phase_index`` indexes ``self.phases``. ``phase_confidence`` is the softmax
        probability of the chosen phase; ``orientation_confidence`` is the network's estimate
        of P(disorientation <= 3 deg). ``allowed`` (phase names or indices), when given,
        restricts the answer to those phases (a scan's expected phases); the probabilities
        are renormalised over them. An all-zero row (a pattern the preprocessor found
        invalid) gets both confidences 0.
        """
        flat = np.asarray(flat)
        if flat.ndim != 2 or flat.shape[1] != self.n_pixels:
            raise InputError(f"network input of shape {flat.shape} does not match (B, {self.n_pixels}) "
                             f"(working shape {self.working_shape})")
        if flat.dtype != np.float32:
            flat = flat.astype(np.float32)
        idx = None
        if allowed is not None:
            idx = [a if isinstance(a, (int, np.integer)) else self.phase_indices([a])[0] for a in allowed]
        inputs = self.codebook_inputs(idx)
        if self.quantized:
            inputs.update(self._int8_codes(inputs["codes"], tuple(inputs["geometry_index"])))
        probs, quat, oconf = self.session.run(None, {"patterns": np.ascontiguousarray(flat), **inputs})
        if probs.shape[0] != flat.shape[0] or quat.shape != (flat.shape[0], 4):
            raise LiveIndexError(f"network returned {probs.shape[0]} rows for a batch of {flat.shape[0]}")
        if idx is not None:
            mask = np.zeros(probs.shape[1], bool)
            mask[idx] = True
            probs = np.where(mask, probs, 0.0)
            probs /= np.maximum(probs.sum(axis=1, keepdims=True), 1e-12)
        phase = probs.argmax(axis=1)
        pconf = probs[np.arange(len(phase)), phase].astype(np.float32)
        oconf = oconf.astype(np.float32).reshape(-1)
        empty = ~np.any(flat, axis=1)
        if empty.any():
            pconf[empty] = 0.0
            oconf[empty] = 0.0
        return phase.astype(np.int64), quat.astype(np.float32), pconf, oconf

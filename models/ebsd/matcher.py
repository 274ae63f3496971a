"""Indexers: turn preprocessed patterns into phase, orientation and confidence.

Every indexer shares one interface and declares its capabilities as class attributes, as
kikuchipy's similarity metrics do. Execution providers are chosen when an indexer is
built, never at import time, and the log says which one runs.
"""

from __future__ import annotations

import logging

import numpy as np

from liveindex.models.errors import LiveIndexError
from liveindex.models.onnx_runtime import choose_providers, session_options

log = logging.getLogger(__name__)


CPU_ROWS_PER_RUN = 64


class TemplateIndexer:
    """Global template matching: NCC against a simulated dictionary, as one ONNX graph."""

    method = "tm"
    needs_geometry = True  # the dictionary is simulated for one detector geometry
    gives_phase = True
    batch_hint = 256  # pages of this size keep MatMul efficient

    def __init__(self, dictionary, *, providers: str = "auto", threads: int = 0):
        import onnxruntime as ort

        self.dictionary = dictionary
        chosen = choose_providers(providers)
        on_cpu = chosen == ["CPUExecutionProvider"]
        # On the CPU the int8 matcher (4x faster, same ranking); on a GPU the float one.
        path = dictionary.quantized_matcher_path if on_cpu else None
        self.session = ort.InferenceSession(str(path or dictionary.matcher_path), session_options(threads),
                                            providers=chosen)
        self.quantized = path is not None
        # The principal-component first pass (CPU): ScanIndexer matches with it first and sends
        # what stays doubtful to the full matcher.
        coarse = dictionary.coarse_matcher_path if on_cpu else None
        self.coarse_session = (ort.InferenceSession(str(coarse), session_options(threads), providers=chosen)
                               if coarse is not None else None)
        self._int8 = None  # (N, P) int8 templates and their scale, loaded on the first exact_scores
        # On the CPU, runs of 64 rows: their scores (64 x 30k) stay in cache for the TopK,
        # 1.2x faster a pattern than pages of 256; a GPU takes the page whole.
        self.rows_per_run = CPU_ROWS_PER_RUN if on_cpu else None
        self.provider = self.session.get_providers()[0]
        log.info("template matcher %s: %d templates%s on %s", dictionary.spec.key, dictionary.size,
                 " (int8)" if self.quantized else "", self.provider)

    def warm_up(self, n_pixels: int) -> None:
        """Run one full run's batch so the first real page does not pay for allocation."""
        self.match(np.zeros((self.rows_per_run or self.batch_hint, n_pixels), np.float32))
        if self.coarse_session is not None:
            self.match(np.zeros((self.rows_per_run or self.batch_hint, n_pixels), np.float32), coarse=True)

    def exact_scores(self, patterns: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """(B, P) preprocessed patterns and (B, K) template indices -> (B, K) NCC of each pattern
        with those templates on every pixel (the int8 templates, as the full matcher scores
        them): what the coarse pass's approximate scores are re-ranked and compared by."""
        if self._int8 is None:
            from .dictionary import int8_templates

            folder = self.dictionary.matcher_path.parent
            self._int8 = int8_templates(folder, patterns.shape[1], self.dictionary.size)
        rows, scale = self._int8
        gathered = rows[candidates.reshape(-1)].reshape(*candidates.shape, -1)  # (B, K, P) int8
        return np.einsum("bkp,bp->bk", gathered.astype(np.float32), patterns) * np.float32(scale)

    def match(self, patterns: np.ndarray, *, coarse: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(B, P) preprocessed patterns -> top scores (B, k) and template indices (B, k);
        ``coarse``: on principal components (where the dictionary has them), else every pixel."""
        session = self.coarse_session if coarse and self.coarse_session is not None else self.session
        step = self.rows_per_run or len(patterns) or 1
        runs = [session.run(None, {"patterns": patterns[i:i + step]})
                for i in range(0, max(len(patterns), 1), step)]  # one run for an empty batch too
        scores, indices = (np.concatenate(parts) for parts in zip(*runs))
        if scores.shape[0] != patterns.shape[0]:
            raise LiveIndexError(f"matcher returned {scores.shape[0]} rows for a batch of {patterns.shape[0]}")
        return scores, indices

"""Index one scan's frames: preprocessing plus one template indexer per expected phase.

Workers and ``liveindex index`` both go through this class, so live and offline results
are the same for the same frames.
"""

from __future__ import annotations

import logging

import numpy as np

from liveindex.models.dictionary import DEFAULT_RESOLUTION, DictionarySpec, load_or_build
from liveindex.models.phases import check_phases

from .geometry import DetectorGeometry
from .indexer import IndexResult, TemplateIndexer
from .preprocess import Preprocessor

log = logging.getLogger(__name__)


class ScanIndexer:
    def __init__(self, geometry: DetectorGeometry, phases, *, resolution: float = DEFAULT_RESOLUTION,
                 providers: str = "auto", threads: int = 0, progress: bool = True, reason: str = ""):
        self.geometry = geometry
        self.phases = check_phases(phases)
        self.preprocess = Preprocessor.for_shape(geometry.pattern_shape)
        working = geometry.with_shape(self.preprocess.working_shape)
        self.indexers = []
        for phase_id, phase in enumerate(self.phases):
            dictionary = load_or_build(DictionarySpec(phase, working, resolution), reason=reason, progress=progress)
            indexer = TemplateIndexer(dictionary, phase_id=phase_id, providers=providers, threads=threads)
            indexer.warm_up(self.preprocess.n_pixels)
            self.indexers.append(indexer)

    @property
    def provider(self) -> str:
        return self.indexers[0].provider

    @property
    def model_name(self) -> str:
        """What answers, for the live page: the matchers and where they run."""
        return f"template matching {'+'.join(i.dictionary.spec.key for i in self.indexers)} on {self.provider}"

    def index(self, patterns: np.ndarray) -> IndexResult:
        """(B, H, W) raw patterns -> results; NaN/inf or blank patterns come back not indexed."""
        flat, valid = self.preprocess(patterns)
        best = None
        for indexer in self.indexers:
            result = indexer.index(flat, valid)
            if best is None:
                best = result
            else:  # the phase whose best template correlates most wins
                better = result.score > best.score
                for name in ("phase_id", "quaternion", "confidence", "method", "score"):
                    getattr(best, name)[better] = getattr(result, name)[better]
        return best if best is not None else IndexResult.empty(len(patterns))

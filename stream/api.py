"""``liveindex.index``: index patterns from Python (Jupyter) with the workers' own code path.

The options are the ``liveindex index`` command's, by the same names (``min_confidence``,
``resolution``, ``indexer``, ``refine_pc``...): they are parsed by the modality's own
argument parser, so the CLI and the API can never drift apart; the pages go through
``offline.index_source``, as ``liveindex index`` does.
"""

from __future__ import annotations

import argparse

from liveindex.models import modality as modalities
from liveindex.models.errors import InputError

from .offline import index_source
from .orientation_map import crystal_map
from .protocol import ScanStart


def index(patterns, detector=None, phases=("ni",), *, modality: str = "ebsd", step=None, progress: bool = True,
          threads: int = 0, providers: str = "auto", return_fields: bool = False, **options):
    """Index ``patterns`` and return an orix ``CrystalMap`` (phase, orientation, and every
    other result field as a property: confidence, method, score...).

    ``patterns``: (ny, nx, H, W) or (N, H, W) numpy or dask array (read a page at a time), or
    a kikuchipy ``EBSD`` signal (its detector, static background and step are used).
    ``detector``: kikuchipy ``EBSDDetector`` or a dict (``pc``, ``convention``,
    ``sample_tilt``, ``tilt``, ``binning``, ``px_size``, ``energy_kv``); required for arrays.
    ``phases``: built-in names, CIF or master-pattern paths, ``NAME=path``, or PhaseRecords.
    ``options``: as ``liveindex index`` takes them (``min_confidence=0.5``, ``indexer="templates"``).
    With ``return_fields`` the flat field arrays come back too: ``(xmap, fields)``.
    """
    mod = modalities.load(modality)
    source, carried = mod.python_source(patterns, setup=detector, phases=phases, step=step)
    args = _options_namespace(mod, {**carried, **options})
    fields, _ = index_source(source, threads=threads, providers=providers, progress=progress,
                             **mod.indexing_options(args))
    start = ScanStart.from_header({"scan": "python", **source.scan_start()})
    if not start.has_orientations:
        raise InputError(f"modality {modality} gives no orientations; use return_fields=True for its fields")
    xmap = crystal_map(fields, nav_shape=start.nav_shape, step=start.step, phases=start.phases,
                       prop_fields=[f.name for f in start.fields if f.name not in ("phase_id", "quaternion")
                                    and not f.shape])
    return (xmap, fields) if return_fields else xmap


def _options_namespace(mod, options: dict) -> argparse.Namespace:
    """The modality's ``index`` options with these values, as the command line would give them."""
    parser = argparse.ArgumentParser(prog="liveindex.index", add_help=False)
    mod.add_arguments(parser, role="index")
    args = parser.parse_args([])
    known = {a.dest for a in parser._actions}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"liveindex.index got unknown option(s) {unknown}; it takes {sorted(known - {'phases'})}")
    for name, value in options.items():
        setattr(args, name, value)
    return args

"""EBSD's own commands: ``liveindex models train|export|eval`` (the network bundle's life
cycle), ``liveindex calibrate FILE`` (the projection centre) and ``liveindex cache``.

The EBSD modality adds them (``EBSD.add_commands``); nothing here imports torch until
``train`` or ``export`` runs.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from pathlib import Path

log = logging.getLogger("liveindex")

DEFAULT_WORK = "models-work"


def _one_core() -> None:
    # Set before numpy/torch/numba start their pools (they read these once).
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    try:  # numpy's BLAS may already be loaded: limit its pool now
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:
        pass


def _command_line() -> str:
    return "liveindex " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def cmd_train(args) -> int:
    _one_core()
    from .train import TrainConfig, train

    config = TrainConfig(seed=args.seed, n_train=args.n_train, n_val=args.n_val, epochs=args.epochs,
                         width=args.width, embed_dim=args.embed_dim)
    path = train(config, Path(args.out), command=_command_line())
    print(f"liveindex models train: checkpoint {path}")
    return 0


def cmd_export(args) -> int:
    _one_core()
    from .export import export

    bundle = export(Path(args.checkpoint), Path(args.out), eval_n=args.eval_n, command=_command_line())
    from .evaluate import format_figures

    print(format_figures(bundle["validation"]))
    cost = bundle["inference_cost"]
    print(f"inference: {cost['per_pattern_ms_best']} ms per pattern at batch {cost['batch']}, "
          f"{cost['one_phase_ms_best']} ms for a one-phase ({cost['one_phase']}) scan ({cost['provider']}, 1 thread)")
    print(f"liveindex models export: bundle {args.out}")
    return 0


def cmd_eval(args) -> int:
    _one_core()
    from .evaluate import EVAL_SEED, evaluate, format_figures, inference_cost
    from .network import NetworkModel

    model = NetworkModel.load(args.bundle, providers="cpu", threads=1)
    recorded = model.bundle.get("validation")
    n = args.n or (recorded or {}).get("n_per_source") or 1000
    figures = evaluate(model, n, seed=args.seed if args.seed is not None else (recorded or {}).get("seed", EVAL_SEED))
    cost = inference_cost(model)
    print(format_figures(figures, recorded))
    rec_cost = model.bundle.get("inference_cost", {}).get("per_pattern_ms_best")
    print(f"inference: {cost['per_pattern_ms_best']} ms per pattern at batch {cost['batch']}, "
          f"{cost['one_phase_ms_best']} ms for a one-phase ({cost['one_phase']}) scan ({cost['provider']}, "
          f"1 thread; bundle: {rec_cost})")
    if args.json:
        Path(args.json).write_text(json.dumps({"figures": figures, "inference_cost": cost}, indent=1))
    return 0


CALIBRATION_FRAMES = 1024  # the scan's first points the PC is searched on, as `index --refine-pc`


def cmd_calibrate(args) -> int:
    from liveindex.models.errors import InputError

    from .files import load_file
    from .master_patterns import phases_from_spec, register
    from .modality import PC_CONVENTIONS, _indexing_options
    from .pc_fit import calibrate_pc, log_fit
    from .pc_search import MIN_PATTERNS

    if args.points < MIN_PATTERNS or args.frames < args.points:
        raise InputError(f"--points {args.points} --frames {args.frames}: the PC is fitted on at least {MIN_PATTERNS} "
                         "patterns, chosen among at least as many frames (defaults 48 and 1024)")
    source = load_file(args.file, phases=phases_from_spec(args.phases), pc=args.pc, pc_convention=args.pc_convention,
                       tilt=args.tilt, need_pc=False)
    args.file_static_background = source.file_setup.static_background
    options = _indexing_options(args)  # --static-background (else the file's) and --signal-mask, checked as index does
    frames = source.read(0, min(source.size, args.frames))
    fit = calibrate_pc(frames, source.geometry, [register(p) for p in source.phases],
                       signal_mask=options["signal_mask"], static_background=options["static_background"],
                       search_range=args.range, points=args.points, threads=args.threads)
    log_fit(fit)
    g = fit.geometry
    names = {"bruker": ("Bruker", "PCx PCy PCz"), "tsl": ("TSL/EDAX", "x* y* z*"), "oxford": ("Oxford", "PCx PCy DD"),
             "emsoft": ("EMsoft", "xpc ypc L")}
    print(f"liveindex calibrate: projection centre of {args.file}, searched within ±{fit.search_range:g} of "
          f"({', '.join(f'{v:.4f}' for v in fit.start.pc)}) (Bruker) on {fit.points} patterns in {fit.seconds:.1f} s:")
    for convention in ("bruker", "tsl", "oxford", "emsoft"):
        label, fields = names[convention]
        values = g.pc_in(convention)
        digits = 2 if convention == "emsoft" else 4
        note = (f"  (pixels of the unbinned detector, L in um, for a {g.px_size:g} um pixel and binning {g.binning})"
                if convention == "emsoft" else "")
        print(f"  {label:9s} {'  '.join(f'{n} {v:.{digits}f}' for n, v in zip(fields.split(), values))}{note}")
    print(f"  mean NCC of the patterns {fit.ncc_before:.3f} at the start, {fit.ncc_after:.3f} at the fitted PC")
    if fit.at_edge:
        print(f"  the fitted PC lies at the edge of the search: run again from it "
              f"(liveindex calibrate {args.file} --pc {' '.join(f'{v:.4f}' for v in g.pc)})")
    print(f"index with: liveindex index {args.file} --pc {' '.join(f'{v:.4f}' for v in g.pc)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"file": str(args.file), **fit.report(),
                                               **{f"pc_{c}": list(g.pc_in(c)) for c in PC_CONVENTIONS}}, indent=1))
    return 0


def cmd_cache(args) -> int:
    from . import cache

    if getattr(args, "cache_command", None) != "clear":
        print(cache.describe())
        return 0
    kinds = {kind for kind, flag in (("dictionaries", args.dictionaries), ("master_patterns", args.master_patterns),
                                     ("network_codebooks", args.codebooks), ("spot_templates", args.spot_templates))
             if flag or args.all}
    kinds = kinds or {"dictionaries"}
    removed, kept = cache.clear(kinds)
    freed = sum(e.size for e in removed) / 1e6
    print(f"liveindex cache clear: removed {len(removed)} item(s) ({', '.join(sorted(kinds))}), {freed:.1f} MB, from "
          f"{cache.cache_root()}" + (f"; kept {len(kept)} dictionar{'y' if len(kept) == 1 else 'ies'} in use by a "
                                     f"running process: {', '.join(e.path.name for e in kept)}" if kept else ""))
    return 0


def add_commands(sub) -> None:
    """Add ``models``, ``calibrate`` and ``cache`` to the top-level parser's subparsers."""
    from .modality import PC_CONVENTIONS
    from .pc_search import PATTERNS, SEARCH_RANGE

    c = sub.add_parser("calibrate", help="find a scan's projection centre (global search from a start up to 0.05 off)")
    c.add_argument("file", help="a saved scan: .npy or a pattern file kikuchipy reads")
    c.add_argument("--pc", nargs=3, metavar=("X", "Y", "Z"), type=float,
                   help="where to start (default: the file's PC, else the simulated detector's)")
    c.add_argument("--pc-convention", default="bruker", choices=list(PC_CONVENTIONS))
    c.add_argument("--tilt", type=float, help="sample tilt in degrees (default: the file's, else 70)")
    c.add_argument("--phases", default="ni", help="comma-separated expected phases, as index takes them (default: ni)")
    c.add_argument("--range", type=float, default=SEARCH_RANGE,
                   help=f"search each PC coordinate within the start ± this (default {SEARCH_RANGE})")
    c.add_argument("--points", type=int, default=PATTERNS, help=f"patterns the PC is fitted on (default {PATTERNS})")
    c.add_argument("--frames", type=int, default=CALIBRATION_FRAMES,
                   help=f"the scan's first points the patterns are chosen among (default {CALIBRATION_FRAMES})")
    c.add_argument("--static-background", metavar="FILE.npy", help="the detector's static background (default: the "
                                                                   "file's, else the mean of the frames)")
    c.add_argument("--signal-mask", metavar="FILE.npy", help="boolean (H, W) array, True where the detector carries "
                                                             "pattern")
    c.add_argument("--threads", type=int, default=0, help="CPU threads (0: all cores)")
    c.add_argument("--json", help="also write what the search found to this file")
    c.set_defaults(func=cmd_calibrate, min_confidence=0.0, no_refine=False, indexer="hybrid", bundle=None)

    k = sub.add_parser("cache", help="show the on-disk cache (dictionaries, master patterns, code books, spot "
                                     "templates) or clear it")
    ksub = k.add_subparsers(dest="cache_command")
    clear = ksub.add_parser("clear", help="remove cached files (default: the dictionaries); each is rebuilt when needed")
    clear.add_argument("--dictionaries", action="store_true", help="template dictionaries (the default)")
    clear.add_argument("--master-patterns", action="store_true", help="computed kinematical master patterns")
    clear.add_argument("--codebooks", action="store_true", help="the network's code books")
    clear.add_argument("--spot-templates", action="store_true", help="spot-pattern template libraries")
    clear.add_argument("--all", action="store_true", help="everything liveindex cached")
    k.set_defaults(func=cmd_cache)

    from liveindex.models.latent.cli import models_subparsers

    msub = models_subparsers(sub)

    t = msub.add_parser("train", help="simulate training data and train the network (torch, one CPU core)")
    t.add_argument("--out", default=DEFAULT_WORK, help=f"folder for checkpoint.pt and train.json (default {DEFAULT_WORK})")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--n-train", type=int, default=90_000, help="simulated training patterns (default 90000)")
    t.add_argument("--n-val", type=int, default=2_000, help="validation patterns watched during training")
    t.add_argument("--epochs", type=int, default=5)
    t.add_argument("--embed-dim", type=int, default=128, help="size of the orientation embedding")
    t.add_argument("--width", type=int, default=16, help="channels of the phase CNN's first convolution")
    t.set_defaults(func=cmd_train)

    e = msub.add_parser("export", help="ONNX graph and bundle.json (with validation figures) from a checkpoint")
    e.add_argument("--checkpoint", default=f"{DEFAULT_WORK}/checkpoint.pt")
    e.add_argument("--out", default="models/ebsd/bundles/default", help="bundle folder (default: the shipped one)")
    e.add_argument("--eval-n", type=int, default=1000, help="held-out patterns per source for the figures")
    e.set_defaults(func=cmd_export)

    v = msub.add_parser("eval", help="re-measure a bundle's validation figures on a fresh held-out set")
    v.add_argument("--bundle", help="bundle folder (default: the shipped one)")
    v.add_argument("--n", type=int, help="held-out patterns per source (default: as the bundle recorded)")
    v.add_argument("--seed", type=int, help="held-out seed (default: as the bundle recorded)")
    v.add_argument("--json", help="also write the figures to this file")
    v.set_defaults(func=cmd_eval)

    from .phases_cli import add_phases_command

    add_phases_command(sub)

"""The spot modality's ``liveindex models train --modality spots`` (train the networks and export
the bundle) and ``liveindex models eval --modality spots`` (re-measure a bundle's figures);
``Spots.add_commands`` adds them, as the EBSD modality adds its own (models/ebsd/cli.py).
torch is imported only when ``train`` runs."""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from pathlib import Path

DEFAULT_OUT = "models-work/spots-bundle"
DEFAULT_EPOCHS = 15
DEFAULT_PHASES = "ferrite,austenite,cementite"


def _one_core() -> None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:
        pass


def _setup(args):
    from .phases import phases_from_spec
    from .setup import check_setup

    size = int(args.pattern_size)
    setup = check_setup({"kv": args.kv, "calibration": args.calibration, "precession": args.precession}, (size, size))
    return phases_from_spec(args.phases or DEFAULT_PHASES), setup, (size, size)


def _print_figures(validation: dict) -> None:
    for name, figures in validation.get("per_phase", {}).items():
        print(f"{name}: phase {figures['phase_accuracy']:.1%}, beam direction within 3 deg "
              f"{figures['direction_within_3deg_top1']:.1%} (best of 4: {figures['direction_within_3deg_top4']:.1%})")


def cmd_train(args) -> int:
    _one_core()
    from .train import train_bundle

    logging.getLogger("liveindex.models.spots").setLevel(logging.INFO)
    phases, setup, shape = _setup(args)
    out = Path(args.out or DEFAULT_OUT)
    command = "liveindex " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    bundle = train_bundle(phases, setup, out, pattern_shape=shape, n_per_phase=args.n_train,
                          epochs=args.epochs, seed=args.seed, n_val=args.n_val, command=command)
    _print_figures(bundle.get("validation", {}))
    print(f"liveindex models train: spot bundle {out} ({bundle['training']['seconds']:.0f} s)")
    return 0


def cmd_eval(args) -> int:
    _one_core()
    from .network import Bundle
    from .phases import phases_from_spec
    from .setup import check_setup
    from .templates import PolarGrid
    from .train import VALIDATION_SEED, PolarFront, validate

    bundle = Bundle.load(args.bundle)
    trained = bundle.meta["setup"]
    shape = tuple(trained["pattern_shape"])
    setup = check_setup({k: trained[k] for k in ("kv", "calibration", "precession")}, shape)
    phases = phases_from_spec(",".join(bundle.phase_names))
    recorded = bundle.meta.get("validation", {})
    figures = validate(bundle.folder, phases, setup, shape, args.n or recorded.get("patterns_per_phase", 300),
                       VALIDATION_SEED if args.seed is None else args.seed, PolarFront(shape, PolarGrid.for_shape(shape)),
                       trained["resolution_deg"])
    _print_figures(figures)
    print(f"phase accuracy {figures['phase_accuracy']:.1%} (bundle.json: {recorded.get('phase_accuracy')})")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


def add_commands(sub) -> None:
    from liveindex.models.latent.cli import models_subparsers

    msub = models_subparsers(sub)
    t = msub.add_parser("train", help="simulate spot patterns and train the phase classifier and per-phase "
                                      "orientation networks (torch, one CPU core), exported as a bundle")
    t.add_argument("--modality", default="spots", choices=["spots"])
    t.add_argument("--phases", default=DEFAULT_PHASES, help=f"comma-separated phases, as index takes them (default "
                                                             f"{DEFAULT_PHASES})")
    t.add_argument("--out", default=DEFAULT_OUT, help=f"the bundle folder (default {DEFAULT_OUT}; the shipped one is "
                                                      "models/spots/bundles/default)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--n-train", type=int, default=None, help="simulated patterns a phase (default 30 a library "
                                                             "template, at least 20000)")
    t.add_argument("--n-val", type=int, default=300, help="held-out patterns a phase for the bundle's figures")
    t.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help=f"default {DEFAULT_EPOCHS}")
    t.add_argument("--calibration", type=float, default=0.03, help="1/angstrom per pixel (default 0.03)")
    t.add_argument("--kv", type=float, default=200.0, help="beam energy in kV (default 200)")
    t.add_argument("--precession", type=float, default=1.0, help="precession angle in degrees (default 1)")
    t.add_argument("--pattern-size", type=int, default=128, help="patterns are N x N (default 128)")
    t.set_defaults(func=cmd_train)

    v = msub.add_parser("eval", help="re-measure a spot bundle's validation figures on held-out simulated patterns")
    v.add_argument("--modality", default="spots", choices=["spots"])
    v.add_argument("--bundle", help="bundle folder (default: the shipped one)")
    v.add_argument("--n", type=int, help="held-out patterns a phase (default: as the bundle recorded)")
    v.add_argument("--seed", type=int, help="held-out seed (default: the bundle's)")
    v.add_argument("--json", help="also write the figures to this file")
    v.set_defaults(func=cmd_eval)

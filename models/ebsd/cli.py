"""``liveindex models train|export|eval``: the network bundle's life cycle.

The EBSD modality adds the ``models`` group (``EBSD.add_commands``); nothing here imports
torch until ``train`` or ``export`` runs.
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


def add_commands(sub) -> None:
    """Add ``models`` with its subcommands to the top-level parser's subparsers."""
    p = sub.add_parser("models", help="train, export and evaluate the phase/orientation network bundle")
    msub = p.add_subparsers(dest="models_command", required=True)

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

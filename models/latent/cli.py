"""``liveindex models train-encoder`` and ``liveindex models adapt``: the latent maps' encoder
networks (models/latent/train.py; torch, which only these commands import)."""

from __future__ import annotations

import json
import logging
import shlex
import sys
import time
from pathlib import Path

log = logging.getLogger("liveindex")


def models_subparsers(sub):
    """The ``models`` command's sub-commands (made once, whichever modality adds to it first)."""
    parser = sub.choices.get("models")
    if parser is None:
        parser = sub.add_parser("models", help="train, export and evaluate the model bundle and the latent encoders")
        parser._liveindex_commands = parser.add_subparsers(dest="models_command", required=True)
    return parser._liveindex_commands


def _command_line() -> str:
    return "liveindex " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def cmd_train_encoder(args) -> int:
    from liveindex.models.ebsd.cli import _one_core

    from .encoder import default_encoder_path
    from .train import train_encoder

    _one_core()
    out = Path(args.out) if args.out else default_encoder_path(args.modality)
    made = train_encoder(args.modality, out, seconds=args.minutes * 60, seed=args.seed, n_scans=args.scans,
                         side=args.side, epochs=args.epochs, command=_command_line())
    hist = made.provenance.get("history", [{}])[-1]
    print(f"liveindex models train-encoder: {out} ({out.stat().st_size / 1e3:.0f} kB, {made.dims} dims, "
          f"{made.provenance['frames']} frames, {made.provenance['epochs']} epochs in {made.provenance['seconds']} s; "
          f"last epoch {hist})")
    return 0


def cmd_adapt(args) -> int:
    from liveindex.models import modality as modalities
    from liveindex.models.ebsd.cli import _one_core

    from .train import adapt

    _one_core()
    modality = modalities.load(args.modality)
    source = modality.open_source(args, role="index")
    # Training runs in its own thread (Adapter); this command only waits for it, saying how
    # far it is, so a scan being indexed meanwhile (another process) is never held up.
    adapter = adapt(source, args.modality, encoder=args.encoder, out=Path(args.out), seconds=args.minutes * 60,
                    tiles=args.tiles, seed=args.seed, command=_command_line(), wait=False)
    t0 = time.monotonic()
    try:
        while adapter.is_alive():
            adapter.join(timeout=10.0)
            if adapter.is_alive():
                log.info("encoder adapt: %.0f s of at most %.0f", time.monotonic() - t0, args.minutes * 60)
    except KeyboardInterrupt:
        adapter.stop()  # keep what was learnt so far
        adapter.join()
    adapter.maybe_raise()
    r = adapter.report
    print(f"liveindex models adapt: {args.out}, reconstruction loss on the scan's frames "
          f"{r['loss_before']['reconstruction']} -> {r['loss_after']['reconstruction']} ({r['began']}, "
          f"{r['epochs']} epochs in {r['seconds']} s); use it with --latent encoder:{args.out}")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    return 0


def add_encoder_commands(sub, modality) -> None:
    """``models train-encoder`` and ``models adapt`` (with the chosen modality's file options)."""
    msub = models_subparsers(sub)
    t = msub.add_parser("train-encoder", help="train the latent maps' encoder network of a modality on simulated "
                                              "patterns (torch, one CPU core) and export it to ONNX")
    t.add_argument("--modality", default=modality.name, choices=["ebsd", "spots"])
    t.add_argument("--out", help="the .onnx file (default: the shipped one, models/latent/encoders/MODALITY.onnx)")
    t.add_argument("--minutes", type=float, default=2.0, help="training time after the simulation (default 2)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--scans", type=int, help="EBSD: simulated scans of patterns (default 4); spots: tiles = "
                                             "SCANS x SIDE^2 (default 4 x 20^2)")
    t.add_argument("--side", type=int, help="their side in points (default: EBSD 60, spots 20)")
    t.add_argument("--epochs", type=int, help="stop after this many epochs (the shipped files record theirs: with "
                                              "it, a run makes the same file on any machine that has the time)")
    t.set_defaults(func=cmd_train_encoder)

    a = msub.add_parser("adapt", help="fine-tune a latent encoder on a scan's own frames (in the background; "
                                      "then index with --latent encoder:OUT.onnx)")
    a.add_argument("file", help="the scan: any file index reads")
    a.add_argument("--encoder", metavar="IN.onnx", help="the encoder to start from (default: the modality's shipped one)")
    a.add_argument("--out", required=True, metavar="OUT.onnx")
    a.add_argument("--minutes", type=float, default=2.0, help="training time at most (default 2)")
    a.add_argument("--tiles", type=int, default=512, help="3x3 tiles of the scan trained on (default 512)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--json", help="also write the losses before and after to this file")
    a.add_argument("--modality", default=modality.name, choices=[modality.name],
                   help="the kind of patterns (put it first: the file options below are its)")
    modality.add_arguments(a, role="index")
    a.set_defaults(func=cmd_adapt)

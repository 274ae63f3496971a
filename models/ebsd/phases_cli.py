"""``liveindex phases show FILE``: what liveindex understood of a phase file (or a built-in name)."""

from __future__ import annotations


def add_phases_command(sub) -> None:
    p = sub.add_parser("phases", help="phases from files: show what liveindex understood")
    psub = p.add_subparsers(dest="phases_command", required=True)
    show = psub.add_parser("show", help="space group, Laue class, lattice, atoms and the reflectors used, of a CIF, "
                                        "a master-pattern .h5 or a built-in phase")
    show.add_argument("phases", help="as --phases takes them: ti.cif, NAME=master.h5, ni (comma-separated)")
    show.add_argument("--reflectors", type=int, default=12, help="reflector families listed (default 12)")
    show.set_defaults(func=cmd_show)


def cmd_show(args) -> int:
    from .master_patterns import describe_phase, phases_from_spec

    for record in phases_from_spec(args.phases):
        print(describe_phase(record, n_reflectors=args.reflectors))
    return 0

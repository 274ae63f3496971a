"""The spot modality's phases: built-in steel phases (CIFs shipped in ``data/``) or CIF files.

A phase is a ``PhaseRecord`` (models/crystal.py) with every atom of the cell: the kinematical
structure factors of its spots come from those atoms, so a record on the wire is all a worker
on another host needs.
"""

from __future__ import annotations

from pathlib import Path

from liveindex.models.crystal import PhaseRecord, record_from_cif
from liveindex.models.errors import InputError

DATA = Path(__file__).parent / "data"
BUILTIN = {
    "ferrite": "bcc iron, Im-3m, a = 2.8665 A",
    "austenite": "fcc iron, Fm-3m, a = 3.5975 A",
    "cementite": "Fe3C, Pnma, a = 5.0837, b = 6.7475, c = 4.5165 A (Wood et al. 2004)",
}
DEFAULT_PHASES = "ferrite,austenite,cementite"


def builtin_record(name: str) -> PhaseRecord:
    return record_from_cif(DATA / f"{name}.cif", name=name, source=f"builtin:{name}")


def phases_from_spec(spec) -> list[PhaseRecord]:
    """``--phases`` -> records: comma-separated built-in names (ferrite, austenite, cementite) or
    CIF paths, each optionally ``NAME=path``; a list of those or of PhaseRecords works too."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    records = []
    for item in items:
        if isinstance(item, PhaseRecord):
            records.append(item)
            continue
        item = str(item).strip()
        if not item:
            continue
        name, _, path = item.rpartition("=") if "=" in item else (None, "", item)
        if name is None and path.lower() in BUILTIN:
            records.append(builtin_record(path.lower()))
        elif Path(path).suffix.lower() == ".cif":
            records.append(record_from_cif(path, name=name or None))
        else:
            raise InputError(f"unknown phase {path!r} for spot patterns: give built-in names "
                             f"({', '.join(BUILTIN)}) or CIF files (NAME=path.cif), comma-separated")
    if not records:
        raise InputError(f"--phases {spec!r} names no phase; give built-in names ({', '.join(BUILTIN)}) or CIF files")
    names = [r.name for r in records]
    if len(set(names)) != len(names):
        raise InputError(f"phase names {names} repeat; name each one (--phases a=one.cif,b=two.cif)")
    for record in records:
        if not record.atoms:
            raise InputError(f"phase {record.name} has no atoms; spot intensities need the atom sites of a CIF")
    return records

"""EBSD's phases and the master patterns their templates are simulated from.

A phase is built in (ni, fe, ni3al), read from a CIF (a kinematical master pattern is
computed from its atoms and cached) or from a master-pattern file (EMsoft .h5: dynamical,
carried inside the record as its payload). It travels as a ``PhaseRecord``
(models/crystal.py) inside scan_start, so a worker on another host rebuilds the phase's
master pattern from the record alone. Within a process a phase is named by its key
(``phase_key``): the built-in name, or name and content hash for a phase from a file;
dictionaries, refiners and caches are keyed by it."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import time
import zlib
from pathlib import Path

import numpy as np

from liveindex.models.crystal import PhaseRecord, _element, full_cell, point_group_of, structure_factors
from liveindex.models.errors import InputError

log = logging.getLogger(__name__)

# name -> description.
KNOWN_PHASES = {
    "ni": "fcc nickel, Fm-3m; EMsoft dynamical master pattern shipped with kikuchipy (20 kV)",
    "fe": "bcc iron (ferrite), Im-3m; kinematical master pattern (kikuchipy KikuchiPatternSimulator, 20 kV)",
    "ni3al": "Ni3Al (gamma prime, L1_2 ordered), Pm-3m; kinematical master pattern (20 kV)",
}

# Crystal structures for the kinematical master patterns: (space group, cubic lattice
# parameter in angstrom, atoms as (element, fractional position), all positions of the cell).
STRUCTURES = {
    "ni": (225, 3.5236, [("Ni", (0, 0, 0)), ("Ni", (0.5, 0.5, 0)), ("Ni", (0.5, 0, 0.5)), ("Ni", (0, 0.5, 0.5))]),
    "fe": (229, 2.8665, [("Fe", (0, 0, 0)), ("Fe", (0.5, 0.5, 0.5))]),
    # L1_2: Al on the cube corner, Ni on the face centres. Its disordered parent is Ni (fcc).
    "ni3al": (221, 3.567, [("Al", (0, 0, 0)), ("Ni", (0.5, 0.5, 0)), ("Ni", (0.5, 0, 0.5)), ("Ni", (0, 0.5, 0.5))]),
}
# Reflectors of a kinematical master pattern: d >= KINEMATICAL_MIN_D, |F| >= KINEMATICAL_MIN_F of
# the strongest. 0.08 keeps Ni3Al's superlattice reflectors ({100}, {110}: |F| about 0.11 of
# the strongest with linear scaling); they are what tells it from disordered Ni.
KINEMATICAL_MIN_D = 0.8
KINEMATICAL_MIN_F = 0.08
KINEMATICAL_HALF_SIZE = 250  # 501 x 501 Lambert square, as EMsoft's
# 2: hexagonal and trigonal master patterns were wrong. orix's symmetrise returned some members
# of a family twice (-0 and 0), drawn doubly bright; diffsims gave each family its first member's
# structure factor, grouped by operators that for a trigonal cell join reflections the crystal
# does not, and computed it with the atoms moved (models/crystal.py structure_factors). Ti's
# patterns turned 120 deg about c correlated 0.89 with the originals (now 0.995).
# 3: the Lambert grid transposed (_compute_kinematical). Part of the phase key, so dictionaries
# built from older patterns are never used with the new ones.
KINEMATICAL_VERSION = 3
ENERGY_KV = 20.0


def check_phases(keys) -> list[str]:
    """Phase keys -> the same keys, lower-cased built-in names; InputError for a key that is
    neither built in nor registered (from a file or a record on the wire) in this process."""
    out = []
    for key in keys:
        key = str(key)
        if key.lower() in KNOWN_PHASES:
            out.append(key.lower())
        elif key in _REGISTERED:
            out.append(key)
        else:
            raise InputError(
                f"unknown phase {key!r}; liveindex has {', '.join(sorted(KNOWN_PHASES))} built in, and reads a "
                "phase from a CIF or a master-pattern file: --phases ti.cif, --phases Ti=path/to/ti_mp.h5")
    return out


# -- phase keys: one string per phase model, for caches and per-phase tables --------------------
# A built-in phase's key is its name; a phase from a file is "<name>-<hash of its structure and
# model>", so two files with the same content share dictionaries and two phases with one name
# but different content never do.
_REGISTERED: dict[str, PhaseRecord] = {}


def phase_key(record: PhaseRecord) -> str:
    """The key of a record: its built-in name, or name and content hash."""
    source = record.source or ""
    if source.startswith(BUILTIN_SOURCE) and source[len(BUILTIN_SOURCE):] in KNOWN_PHASES:
        return source[len(BUILTIN_SOURCE):]
    model = _payload_digest(record) or f"kinematical-v{KINEMATICAL_VERSION}"
    content = json.dumps([record.space_group, [round(v, 6) for v in record.lattice],
                          [[a[0], *(round(v, 6) for v in a[1:])] for a in record.atoms], model]).encode()
    slug = re.sub(r"[^a-z0-9]+", "_", record.name.lower()).strip("_")[:24] or "phase"
    return f"{slug}-{hashlib.sha256(content).hexdigest()[:12]}"


def register(record: PhaseRecord) -> str:
    """Make a record's phase known to this process (a worker gets records on the wire); its key."""
    key = phase_key(record)
    if key not in KNOWN_PHASES:
        _check_model(record)
        _REGISTERED[key] = record
    return key


def record_of(key: str) -> PhaseRecord:
    key = check_phases([key])[0]
    return phase_record(key) if key in KNOWN_PHASES else _REGISTERED[key]


def _check_model(record: PhaseRecord) -> None:
    """A record whose phase this modality can simulate: a master pattern in its payload, or atoms."""
    if _payload(record) is None and not record.atoms:
        raise InputError(f"phase {record.name} comes with neither atoms nor a master pattern (source "
                         f"{record.source!r}); give a CIF with atom sites or an EMsoft master-pattern .h5")


@functools.lru_cache(maxsize=8)
def master_pattern(key: str, kind: str = "best"):
    """The phase's master pattern (Lambert projection, upper hemisphere).

    ``kind``: "best" (the dynamical one where liveindex has it: built-in Ni and phases read
    from master-pattern files; else kinematical from the atoms), "dynamical" or "kinematical".
    Kinematical ones are computed once and cached on disk.
    """
    key = check_phases([key])[0]
    if kind not in ("best", "dynamical", "kinematical"):
        raise ValueError(f"master pattern kind {kind!r}; use best, dynamical or kinematical")
    record = record_of(key)
    payload = _payload(record)
    if kind in ("best", "dynamical") and key in DYNAMICAL:
        import kikuchipy as kp

        mp = kp.data.nickel_ebsd_master_pattern_small(projection="lambert", hemisphere="upper")
    elif kind in ("best", "dynamical") and payload is not None:
        mp = _master_pattern_from_payload(record, payload)
    elif kind == "dynamical":
        raise InputError(f"liveindex has no dynamical master pattern for {record.name}; give one as an EMsoft "
                         "master-pattern .h5 (--phases NAME=file.h5)")
    else:
        mp = kinematical_master_pattern(key)
    log.debug("loaded %s master pattern for %s: %s", kind, key, mp)
    return mp


DYNAMICAL = {"ni"}  # phases with a dynamical (EMsoft) master pattern


def _cache_dir() -> Path:
    # Same rule as models.dictionary.cache_dir (not imported: that module pulls in onnx).
    root = os.environ.get("LIVEINDEX_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "liveindex"
    return Path(root)


def crystal_phase(key: str):
    """orix Phase with every atom of the cell, as kinematical simulation needs."""
    return record_of(key).orix_phase()


def kinematical_master_pattern(key: str):
    """Kinematical master pattern (Lambert, upper hemisphere) from the phase's atoms, computed
    once and cached by the phase key (its content hash for phases from files)."""
    import kikuchipy as kp

    key = check_phases([key])[0]
    record = record_of(key)
    if not record.atoms:
        raise InputError(f"phase {record.name} has no atoms to simulate a kinematical master pattern from; "
                         "give a CIF with atom sites")
    path = _cache_dir() / "master_patterns" / f"{key}-kinematical-{ENERGY_KV:g}kv-v{KINEMATICAL_VERSION}.npy"
    phase = crystal_phase(key)
    if path.exists():
        data = np.load(path)
    else:
        log.info("computing the kinematical master pattern of %s (%s): one-off, cached in %s", record.name,
                 record.describe(), path.parent)
        t0 = time.perf_counter()
        data = _compute_kinematical(phase)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, data)
        os.replace(tmp, path)
        log.info("kinematical master pattern for %s: %.0f s, cached in %s", record.name, time.perf_counter() - t0, path)
    return kp.signals.EBSDMasterPattern(data, phase=phase, projection="lambert", hemisphere="upper")


def _unique_reflectors(phase):
    """The reflector families of a kinematical master pattern (one per family): d >=
    KINEMATICAL_MIN_D and |F| >= KINEMATICAL_MIN_F of the strongest; and their |F|."""
    from diffsims.crystallography import ReciprocalLatticeVector

    ref = ReciprocalLatticeVector.from_min_dspacing(phase, KINEMATICAL_MIN_D).unique(use_symmetry=True)
    f = np.abs(structure_factors(phase, ref.hkl))
    keep = f >= KINEMATICAL_MIN_F * f.max()
    return ref[keep], f[keep]


def reflectors(phase):
    """(hkl (N, 3) int, d in angstrom (N,), |F| relative to the strongest (N,)), strongest first:
    what ``liveindex phases show`` lists and the .ang's hkl families."""
    ref, f = _unique_reflectors(phase)
    order = np.argsort(-f, kind="stable")
    return np.asarray(ref.hkl)[order].round().astype(int), np.asarray(ref.dspacing)[order], (f / f.max())[order]


def _compute_kinematical(phase) -> np.ndarray:
    from diffsims.crystallography import ReciprocalLatticeVector
    from kikuchipy.simulations import KikuchiPatternSimulator

    # Every reflection within reach, each once and with its own structure factor: no symmetry
    # used, so the pattern has the crystal's own (orix's symmetrise returned members twice in
    # hexagonal cells, and diffsims gives a family its first member's F, grouped by orix's
    # operators, which for a trigonal cell joined reflections the crystal does not).
    every = ReciprocalLatticeVector.from_min_dspacing(phase, KINEMATICAL_MIN_D)
    hkl = np.unique(np.round(np.asarray(every.hkl, float)) + 0.0, axis=0)
    factors = structure_factors(phase, hkl)
    keep = np.abs(factors) >= KINEMATICAL_MIN_F * np.abs(factors).max()
    ref = ReciprocalLatticeVector(phase, hkl=hkl[keep])
    ref._structure_factor = factors[keep]  # diffsims has no setter; its own calculation is the one replaced
    ref.calculate_theta(ENERGY_KV * 1e3)
    stereo = KikuchiPatternSimulator(ref).calculate_master_pattern(half_size=KINEMATICAL_HALF_SIZE, hemisphere="upper")
    lambert = stereo.as_lambert(show_progressbar=False)
    # Transposed: kikuchipy's simulator stores the square Lambert grid with its axes swapped
    # against the convention its own (and liveindex's) projection reads, EMsoft's. Cubic patterns
    # are symmetric under the swap, so nothing showed for them; a monoclinic (b unique) phase
    # rendered with its two-fold axis along a instead of b, a trigonal one with its two-folds 30 deg
    # from the a axes, and hexagonal ones looked turned 30 deg against EMsoft's (EMsoft issue 162).
    # Transposed, all render with their own symmetry (models/ebsd/symmetry_check.py).
    return np.ascontiguousarray(np.swapaxes(np.asarray(lambert.data, dtype=np.float32), -1, -2))


BUILTIN_SOURCE = "builtin:"


def phase_record(name: str) -> PhaseRecord:
    """The record of a built-in phase (what travels in scan_start)."""
    name = str(name).lower()
    if name not in KNOWN_PHASES:
        check_phases([name])
    space_group, a, atoms = STRUCTURES[name]
    return PhaseRecord(name=name, space_group=space_group, lattice=(a, a, a, 90.0, 90.0, 90.0),
                       atoms=tuple((el, *xyz, 1.0) for el, xyz in atoms), source=f"{BUILTIN_SOURCE}{name}")


@functools.lru_cache(maxsize=64)
def point_group(key: str):
    """orix point group of a phase (from its space group)."""
    return point_group_of(record_of(key).space_group)


def disorientation_degrees(q, truth, phase: str = "ni"):
    """Angle between orientations and ground truth, reduced by the phase's symmetry."""
    from liveindex.models.crystal import disorientation_degrees as angles
    from liveindex.models.crystal import proper_operators

    return angles(q, truth, proper_operators(record_of(phase).space_group))


def describe_phase(record: PhaseRecord, *, n_reflectors: int = 12) -> str:
    """What liveindex understood of a phase: symmetry, lattice, atoms, its master pattern and
    (kinematical) the strongest reflector families, as ``liveindex phases show`` prints it."""
    a, b, c, alpha, beta, gamma = record.lattice
    key = phase_key(record)
    payload = _payload(record)
    lines = [f"phase {record.name} (key {key}, from {record.source})",
             f"  space group {record.space_group} ({record.orix_phase().space_group.short_name}), point group "
             f"{record.point_group_name}, Laue class {record.laue.name}, {record.crystal_system}",
             f"  lattice a={a:.4f} b={b:.4f} c={c:.4f} angstrom, alpha={alpha:.2f} beta={beta:.2f} gamma={gamma:.2f} deg",
             *([f"  setting: {record.setting}"] if record.setting else []),
             f"  {len(record.atoms)} atoms in the cell: " + ", ".join(
                 f"{el} ({x:.4f}, {y:.4f}, {z:.4f}){'' if occ == 1 else f' occ {occ:g}'}"
                 for el, x, y, z, occ in record.atoms[:8]) + (" ..." if len(record.atoms) > 8 else "")]
    if key in DYNAMICAL:
        lines.append("  master pattern: dynamical (EMsoft, shipped with kikuchipy)")
    elif payload is not None:
        shape = "x".join(str(v) for v in payload["shape"][1:])
        lines.append(f"  master pattern: dynamical ({shape} Lambert, {payload['energy_kv']:g} kV), from the file, "
                     "carried to the workers in the phase record")
    else:
        lines.append(f"  master pattern: kinematical from the atoms ({ENERGY_KV:g} kV, reflectors with d >= "
                     f"{KINEMATICAL_MIN_D} angstrom and |F| >= {KINEMATICAL_MIN_F} of the strongest)")
        hkl, d, f = reflectors(record.orix_phase())
        lines.append(f"  {len(hkl)} reflector families; the strongest {min(n_reflectors, len(hkl))}:")
        lines += [f"    {{{' '.join(str(v) for v in h)}}}  d={dd:.4f} A  |F|={ff:.2f}"
                  for h, dd, ff in zip(hkl[:n_reflectors], d, f)]
    return "\n".join(lines)


# -- phases from the command line and from files ------------------------------------------------
def phases_from_spec(spec) -> list[PhaseRecord]:
    """``--phases`` -> records: comma-separated built-in names, CIF paths, master-pattern files
    (EMsoft .h5, anything kikuchipy reads as a master pattern), each optionally ``NAME=path``;
    a list of those strings or of PhaseRecords works too."""
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
        if name is None and path.lower() in KNOWN_PHASES:
            records.append(phase_record(path.lower()))
        elif name is None and path in _REGISTERED:  # a key this process already knows
            records.append(_REGISTERED[path])
        else:
            records.append(phase_from_file(path, name=name or None))
    if not records:
        raise InputError(f"--phases {spec!r} names no phase; give built-in names ({', '.join(sorted(KNOWN_PHASES))}) "
                         "or files (ti.cif, NAME=master.h5), comma-separated")
    names = [r.name for r in records]
    if len(set(names)) != len(names):
        raise InputError(f"phase names {names} repeat; name each one (--phases alpha=ti.cif,beta=ti_beta.cif)")
    return records


def phase_from_file(path, *, name: str | None = None) -> PhaseRecord:
    """A phase from a CIF (kinematical master pattern from its atoms) or a master-pattern file."""
    from liveindex.models.crystal import record_from_cif

    path = Path(path)
    if not path.is_file():
        known = ", ".join(sorted(KNOWN_PHASES))
        raise InputError(f"unknown phase {str(path)!r}: neither built in ({known}) nor a file; give a CIF or an EMsoft "
                         "master-pattern .h5 path")
    if path.suffix.lower() == ".cif":
        return record_from_cif(path, name=name, source=f"cif:{path.name}")
    if path.suffix.lower() in (".h5", ".hdf5", ".hspy", ".zspy"):
        return _record_from_master_pattern_file(path, name=name)
    raise InputError(f"{path}: liveindex reads phases from .cif files and master-pattern files (.h5 from EMsoft, "
                     "or anything kikuchipy loads as an EBSDMasterPattern); this one is neither")


MASTER_PATTERN_ENERGY_KV = ENERGY_KV  # the energy taken from a multi-energy master-pattern file


def _record_from_master_pattern_file(path: Path, *, name: str | None) -> PhaseRecord:
    """A dynamical master pattern and its structure from a file, as a record that carries the
    pattern (float16, compressed: about 0.3 MB for 401x401) so a worker on another host needs no
    copy of the file."""
    import kikuchipy as kp

    try:
        mp = kp.load(path, projection="lambert", hemisphere="both", energy=MASTER_PATTERN_ENERGY_KV)
    except Exception as exc:  # readers raise many types for foreign files
        raise InputError(f"cannot read {path} as a master pattern ({type(exc).__name__}: {str(exc)[:200]}); give "
                         "an EMsoft EBSD master-pattern .h5 (EMEBSDmaster output) or a kikuchipy master pattern") from None
    if not isinstance(mp, kp.signals.EBSDMasterPattern):
        raise InputError(f"{path} holds {type(mp).__name__}, not an EBSD master pattern")
    upper, lower = mp._get_master_pattern_arrays_from_energy(MASTER_PATTERN_ENERGY_KV)
    same = upper is lower or np.allclose(upper, lower, atol=1e-5 * float(np.abs(upper).max()))
    data = np.stack([upper] if same else [upper, lower]).astype(np.float32)
    lo, hi = float(data.min()), float(data.max())
    scaled = ((data - lo) / max(hi - lo, 1e-12)).astype(np.float16)
    packed = zlib.compress(scaled.tobytes(), 6)
    phase = mp.phase
    structure = phase.structure
    if phase.space_group is None:
        raise InputError(f"{path} does not say the phase's space group; liveindex needs it for the symmetry")
    lattice = tuple(structure.lattice.abcABG())
    if max(lattice[:3]) < 1.0:  # EMsoft (and kikuchipy reading it) keep nm; a cell under 1 angstrom is none
        lattice = tuple(v * 10.0 for v in lattice[:3]) + lattice[3:]
    atoms = full_cell([(_element(a.element), *(float(v) for v in a.xyz), float(a.occupancy)) for a in structure],
                      int(phase.space_group.number))
    record_name = name or (phase.name if phase.name else "") or path.stem
    record_name = re.sub(r"[^A-Za-z0-9_.+()\- ]", "_", record_name)[:64]
    payload = {"master_pattern": packed, "shape": list(scaled.shape), "dtype": "float16",
               "energy_kv": float(MASTER_PATTERN_ENERGY_KV),
               "sha256": hashlib.sha256(packed).hexdigest()}
    return PhaseRecord(name=record_name, space_group=int(phase.space_group.number),
                       lattice=lattice, atoms=atoms, source=f"master:{path.name}",
                       extra={"payload": payload})


def _payload(record: PhaseRecord) -> dict | None:
    payload = record.extra.get("payload") if isinstance(record.extra, dict) else None
    if payload is None:
        return None
    try:
        shape = tuple(int(v) for v in payload["shape"])
        if len(shape) != 3 or shape[0] not in (1, 2) or shape[1] != shape[2] or not 16 <= shape[1] <= 4097:
            raise ValueError(f"shape {shape}")
        if not isinstance(payload["master_pattern"], (bytes, bytearray)):
            raise ValueError("master_pattern must be bytes")
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"phase {record.name}: its master-pattern payload is malformed ({exc}); send the phase "
                         "again from a master-pattern file") from None
    return payload


def _payload_digest(record: PhaseRecord) -> str:
    payload = _payload(record)
    return "" if payload is None else hashlib.sha256(bytes(payload["master_pattern"])).hexdigest()


def _master_pattern_from_payload(record: PhaseRecord, payload: dict):
    import kikuchipy as kp

    shape = tuple(int(v) for v in payload["shape"])
    try:
        raw = zlib.decompress(bytes(payload["master_pattern"]), bufsize=int(np.prod(shape)) * 2)
        data = np.frombuffer(raw, np.float16).reshape(shape).astype(np.float32)
    except (zlib.error, ValueError) as exc:
        raise InputError(f"phase {record.name}: its master pattern does not decode ({exc}); send it again") from None
    hemisphere = "upper" if shape[0] == 1 else "both"
    return kp.signals.EBSDMasterPattern(data[0] if shape[0] == 1 else data, phase=record.orix_phase(),
                                        projection="lambert", hemisphere=hemisphere)

"""EBSD's built-in phases, with the master patterns their templates are simulated from.

A phase travels as a ``PhaseRecord`` (models/crystal.py); its ``source`` ("builtin:ni")
says which master pattern a worker uses for it."""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import numpy as np

from liveindex.models.crystal import PhaseRecord, point_group_of
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
KINEMATICAL_VERSION = 1
ENERGY_KV = 20.0


def check_phases(names) -> list[str]:
    names = [str(n).lower() for n in names]
    unknown = [n for n in names if n not in KNOWN_PHASES]
    if unknown:
        raise InputError(
            f"unknown phase(s) {unknown}; liveindex knows {sorted(KNOWN_PHASES)}: "
            "name one of those (--phases ni) or add a master pattern for the phase in liveindex.models.ebsd.master_patterns"
        )
    return names


@functools.lru_cache(maxsize=8)
def master_pattern(name: str, kind: str = "best"):
    """The phase's master pattern (Lambert projection, upper hemisphere).

    ``kind``: "best" (the dynamical one where liveindex has it: Ni; else kinematical),
    "dynamical" or "kinematical". Kinematical ones are computed once and cached on disk.
    """
    check_phases([name])
    if kind not in ("best", "dynamical", "kinematical"):
        raise ValueError(f"master pattern kind {kind!r}; use best, dynamical or kinematical")
    if kind in ("best", "dynamical") and name in DYNAMICAL:
        import kikuchipy as kp

        mp = kp.data.nickel_ebsd_master_pattern_small(projection="lambert", hemisphere="upper")
    elif kind == "dynamical":
        raise InputError(f"liveindex has no dynamical master pattern for {name}; it has one for {sorted(DYNAMICAL)}")
    else:
        mp = kinematical_master_pattern(name)
    log.debug("loaded %s master pattern for %s: %s", kind, name, mp)
    return mp


DYNAMICAL = {"ni"}  # phases with a dynamical (EMsoft) master pattern


def _cache_dir() -> Path:
    # Same rule as models.dictionary.cache_dir (not imported: that module pulls in onnx).
    root = os.environ.get("LIVEINDEX_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "liveindex"
    return Path(root)


def crystal_phase(name: str):
    """orix Phase with every atom of the cell, as kinematical simulation needs."""
    return phase_record(name).orix_phase()


def kinematical_master_pattern(name: str):
    """Kinematical master pattern (Lambert, upper hemisphere), computed once and cached."""
    import kikuchipy as kp

    check_phases([name])
    path = _cache_dir() / "master_patterns" / f"{name}-kinematical-{ENERGY_KV:g}kv-v{KINEMATICAL_VERSION}.npy"
    phase = crystal_phase(name)
    if path.exists():
        data = np.load(path)
    else:
        data = _compute_kinematical(phase)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, data)
        os.replace(tmp, path)
        log.info("kinematical master pattern for %s cached in %s", name, path)
    return kp.signals.EBSDMasterPattern(data, phase=phase, projection="lambert", hemisphere="upper")


def _compute_kinematical(phase) -> np.ndarray:
    from diffsims.crystallography import ReciprocalLatticeVector
    from kikuchipy.simulations import KikuchiPatternSimulator

    ref = ReciprocalLatticeVector.from_min_dspacing(phase, KINEMATICAL_MIN_D)
    ref.sanitise_phase()
    ref = ref.unique(use_symmetry=True)
    ref.calculate_structure_factor()
    f = np.abs(ref.structure_factor)
    ref = ref[f >= KINEMATICAL_MIN_F * f.max()].symmetrise()
    ref.calculate_structure_factor()
    ref.calculate_theta(ENERGY_KV * 1e3)
    stereo = KikuchiPatternSimulator(ref).calculate_master_pattern(half_size=KINEMATICAL_HALF_SIZE, hemisphere="upper")
    lambert = stereo.as_lambert(show_progressbar=False)
    return np.asarray(lambert.data, dtype=np.float32)


BUILTIN_SOURCE = "builtin:"


def phase_record(name: str) -> PhaseRecord:
    """The record of a built-in phase (what travels in scan_start)."""
    name = check_phases([name])[0]
    space_group, a, atoms = STRUCTURES[name]
    return PhaseRecord(name=name, space_group=space_group, lattice=(a, a, a, 90.0, 90.0, 90.0),
                       atoms=tuple((el, *xyz, 1.0) for el, xyz in atoms), source=f"{BUILTIN_SOURCE}{name}")


def master_pattern_name(record: PhaseRecord) -> str:
    """The built-in master pattern a phase record asks for; InputError where it names none."""
    source = record.source or ""
    if source.startswith(BUILTIN_SOURCE) and source[len(BUILTIN_SOURCE):] in KNOWN_PHASES:
        return source[len(BUILTIN_SOURCE):]
    raise InputError(f"phase {record.name} comes with master-pattern source {record.source!r}, which this worker "
                     f"does not have; it knows {sorted(KNOWN_PHASES)} (--phases ni)")


@functools.lru_cache(maxsize=8)
def point_group(name: str):
    """orix point group of a built-in phase (from its space group)."""
    check_phases([name])
    return point_group_of(STRUCTURES[name][0])


def disorientation_degrees(q, truth, phase: str = "ni"):
    """Angle between orientations and ground truth, reduced by a built-in phase's symmetry."""
    from liveindex.models.crystal import disorientation_degrees as angles
    from liveindex.models.crystal import proper_operators

    check_phases([phase])
    return angles(q, truth, proper_operators(STRUCTURES[phase][0]))

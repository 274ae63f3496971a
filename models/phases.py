"""Phases liveindex knows, with the master patterns their templates are simulated from."""

from __future__ import annotations

import functools
import logging

from liveindex.stream.errors import InputError

log = logging.getLogger(__name__)

# name -> description; issue-by-issue more phases join (bcc Fe, Ni3Al).
KNOWN_PHASES = {
    "ni": "fcc nickel, Fm-3m; EMsoft dynamical master pattern shipped with kikuchipy (20 kV)",
}


def check_phases(names) -> list[str]:
    names = [str(n).lower() for n in names]
    unknown = [n for n in names if n not in KNOWN_PHASES]
    if unknown:
        raise InputError(
            f"unknown phase(s) {unknown}; liveindex knows {sorted(KNOWN_PHASES)}: "
            "name one of those (--phases ni) or add a master pattern for the phase in liveindex.models.phases"
        )
    return names


@functools.lru_cache(maxsize=4)
def master_pattern(name: str):
    """The phase's master pattern (Lambert projection, upper hemisphere)."""
    check_phases([name])
    import kikuchipy as kp

    if name == "ni":
        mp = kp.data.nickel_ebsd_master_pattern_small(projection="lambert", hemisphere="upper")
    log.debug("loaded master pattern for %s: %s", name, mp)
    return mp


# Laue/point group per phase, so symmetry is known without loading a master pattern
# (the sink needs it at scan_start, on its hot loop).
POINT_GROUPS = {"ni": "m-3m"}


@functools.lru_cache(maxsize=8)
def point_group(name: str):
    from orix.quaternion import symmetry

    check_phases([name])
    return {"m-3m": symmetry.Oh}[POINT_GROUPS[name]]


def disorientation_degrees(q, truth, phase: str = "ni"):
    """Angle between orientations and ground truth, reduced by the phase's symmetry."""
    import numpy as np
    from orix.quaternion import Orientation

    pg = point_group(phase)
    return Orientation(np.asarray(q), pg).angle_with(Orientation(np.asarray(truth), pg), degrees=True)


def orix_phase(name: str):
    """The orix Phase (structure and symmetry) for a phase name."""
    phase = master_pattern(name).phase.deepcopy()
    phase.name = name
    return phase

"""Ordering relatives of a phase: the crystals that band geometry cannot tell it from.

An ordered crystal and its disordered parent share their lattice, so one orientation fits
both; they differ only by weak superlattice bands (L1_2 Ni3Al against fcc Ni: {100} and
{110}, |F| about a tenth of the strongest). A scan of the one indexed with the other
comes back right in orientation and wrong in phase, at a fit as good as a right answer's, so
NCC, explained share and reliability all read it as sure. What can tell them apart is a
matched filter: the difference between the two kinematical patterns at the answer's
orientation is exactly the superlattice bands, and the pattern's projection on it says
whether they are there. benchmarks/ordering_separability.py measures how well: at moderate
noise a pattern's evidence is about 2.6 noise widths, too weak for a per-point confidence that
must be right 99% of the time, and a dynamical answer's misfit outweighs it (real Ni reads as
ordered); a cluster's mean pattern (issue 16's latent maps) has that evidence times the square
root of its size.

Relatives come from the phase's own cell, for any space group:

- its **disordered parent**, where the cell with every atom made one element gains a
  translation the ordered cell does not have (L1_2 -> fcc, B2 -> bcc, L1_0 -> fcc);
- its **ordered child**, where the cell has a centring translation (fcc, bcc, C-centred...):
  one atom of each centring orbit becomes a lighter element, which breaks the translation
  (fcc -> L1_2, bcc -> B2). The element only sets how strong the superlattice bands are;
  the test asks whether the pattern has such bands at all.

A primitive cell whose atoms carry no such translation (hcp Ti, cementite) has none. Both
relatives and the phase's own twin are P-1 records with every atom of the cell (kinematical patterns are centrosymmetric, and kikuchipy projects an upper-hemisphere master
pattern only with inversion), so that the patterns compared are simulated alike,
kinematically, whatever master pattern the phase itself is indexed with.
"""

from __future__ import annotations

import numpy as np

from liveindex.models.crystal import ELEMENTS, PhaseRecord

POSITION_TOLERANCE = 1e-3  # fractional; CIF coordinates carry 4-5 digits
ORDERING_Z_RATIO = 0.5  # the ordered child's lighter element: atomic number about half


def ordering_relatives(record: PhaseRecord) -> tuple[PhaseRecord, list[PhaseRecord]]:
    """(the phase's kinematical twin, its relatives), all P-1 records of the full cell; no
    relatives where the cell has none (or no atoms to build them from)."""
    cell = full_cell(record)
    twin = _p1(record, cell, f"{record.name[:50]} twin")
    if not cell:
        return twin, []
    relatives = []
    species_blind = _translations([(0, *atom[1:4]) for atom in cell])
    own = _translations([(atom[0], *atom[1:4]) for atom in cell])
    if len(species_blind) > len(own):  # ordered: merging the elements adds a translation
        majority = max({a[0] for a in cell}, key=lambda el: sum(a[4] for a in cell if a[0] == el))
        relatives.append(_p1(record, [(majority, *a[1:]) for a in cell], f"{record.name[:50]} disordered"))
    if own:  # centred: break the centring on one atom of each orbit
        relatives.append(_p1(record, _ordered(cell, own), f"{record.name[:50]} ordered"))
    return twin, relatives


def ordering_evidence(patterns: np.ndarray, answers: np.ndarray, ncc: np.ndarray, twin: np.ndarray,
                      relative: np.ndarray) -> np.ndarray:
    """How many noise widths of a relative's superlattice bands the answer leaves unexplained.

    (B, P) preprocessed patterns (unit norm), the (B, P) rendered answers and their (B,) NCC,
    and the kinematical twin's and relative's (B, P) renders at the answers' orientations.
    The residual r = p - NCC t is projected on u, the unit difference relative - twin (the
    superlattice bands the relative adds, or the ones it takes away), against the residual's
    own per-pixel noise: z ~ N(0, 1) where the answer's phase is right, larger where the
    relative's is. Pixels are taken as independent, which the preprocessing's blur is not:
    the benchmark measures the widths as they come."""
    residual = patterns - ncc[:, None].astype(np.float32) * answers
    u = relative - twin
    u /= np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
    noise = np.sqrt(np.maximum((residual * residual).sum(1), 1e-12) / patterns.shape[1])
    return ((residual * u).sum(1) / noise).astype(np.float32)


def full_cell(record: PhaseRecord) -> list[tuple]:
    """Every atom of the record's cell (records may hold the asymmetric unit)."""
    return list(record.cell_atoms())


def _translations(sites: list[tuple]) -> list[np.ndarray]:
    """Non-lattice translations t that map the labelled sites onto themselves."""
    positions = np.array([s[1:4] for s in sites], float)
    labels = [s[0] for s in sites]
    found = []
    for j in range(1, len(sites)):
        if labels[j] != labels[0]:
            continue
        t = (positions[j] - positions[0]) % 1.0
        if any(_same_position(t, u) for u in found):
            continue
        moved = (positions + t) % 1.0
        if all(any(labels[k] == labels[i] and _same_position(moved[i], positions[k]) for k in range(len(sites)))
               for i in range(len(sites))):
            found.append(t)
    return found


def _ordered(cell: list[tuple], translations: list[np.ndarray]) -> list[tuple]:
    """The cell with the lexicographically first atom of each centring orbit made lighter."""
    group = [np.zeros(3)] + translations
    lighter = set()
    seen = set()
    for i, atom in enumerate(cell):
        if i in seen:
            continue
        orbit = [k for k, other in enumerate(cell)
                 if any(_same_position((np.asarray(atom[1:4]) + t) % 1.0, np.asarray(other[1:4])) for t in group)]
        seen.update(orbit)
        lighter.add(min(orbit, key=lambda k: tuple(round(v, 3) for v in cell[k][1:4])))
    return [(_lighter_element(a[0]) if i in lighter else a[0], *a[1:]) for i, a in enumerate(cell)]


def _lighter_element(symbol: str) -> str:
    z = ELEMENTS.index(symbol) + 1 if symbol in ELEMENTS else 26
    return ELEMENTS[max(3, round(z * ORDERING_Z_RATIO)) - 1]


def _same_position(a: np.ndarray, b: np.ndarray) -> bool:
    d = np.abs((np.asarray(a) - np.asarray(b) + 0.5) % 1.0 - 0.5)
    return bool(np.all(d < POSITION_TOLERANCE))


def _p1(record: PhaseRecord, cell, name: str) -> PhaseRecord:
    return PhaseRecord(name=name, space_group=2, lattice=record.lattice, atoms=tuple(tuple(a) for a in cell),
                       source=f"relative:{record.source or record.name}")


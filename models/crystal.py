"""Phases and orientation maths, the same for every modality.

A phase is one record: name, space group, lattice, atoms, and where a modality finds its
simulation model (a built-in name, a file). It travels on the wire inside ``scan_start``
as a plain dict, so a sink or a worker on another host rebuilds it without any file. Its
symmetry comes from orix for every one of the 230 space groups (32 point groups, 11 Laue
classes).

Quaternions are (w, x, y, z) in the orix convention. The product and the disorientation
live here once; the runtime (sink, writers) and the modalities use these.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import re
from dataclasses import dataclass, field

import numpy as np

from liveindex.models.errors import InputError

log = logging.getLogger(__name__)

# Phase names become HDF5 group names, .ang header lines and legend text: keep them plain.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+()\- ]{0,63}$")


@dataclass(frozen=True)
class PhaseRecord:
    """One phase: what the sink needs to write it and a worker to simulate it.

    ``lattice``: a, b, c in angstrom, alpha, beta, gamma in degrees. ``atoms``: (element,
    x, y, z, occupancy), fractional, every atom of the cell (or the asymmetric unit where
    the modality expands it). ``source``: how the modality rebuilds its model of the phase,
    e.g. "builtin:ni"; opaque to the runtime.
    """

    name: str
    space_group: int
    lattice: tuple[float, float, float, float, float, float]
    atoms: tuple[tuple[str, float, float, float, float], ...] = ()
    source: str | None = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise InputError(f"phase name {self.name!r} must be 1-64 letters, digits, spaces or _.+-() "
                             "starting with a letter or digit; rename it (NAME=path on the command line)")
        if not isinstance(self.space_group, int) or isinstance(self.space_group, bool) \
                or not 1 <= self.space_group <= 230:
            raise InputError(f"phase {self.name}: space group {self.space_group!r} is not a number 1..230")
        lattice = tuple(float(v) for v in self.lattice)
        if len(lattice) != 6 or not all(math.isfinite(v) and v > 0 for v in lattice) \
                or not all(v < 180 for v in lattice[3:]):
            raise InputError(f"phase {self.name}: lattice {self.lattice!r} must be a, b, c (angstrom) and alpha, "
                             "beta, gamma (degrees, below 180), all positive")
        if min(lattice[:3]) < 1.0:
            raise InputError(f"phase {self.name}: lattice lengths {lattice[:3]} below 1 angstrom look like nanometres; "
                             "give a, b, c in angstrom (nickel: 3.524, not 0.3524)")
        object.__setattr__(self, "lattice", lattice)
        atoms = []
        for atom in self.atoms:
            if len(atom) != 5 or not isinstance(atom[0], str):
                raise InputError(f"phase {self.name}: atom {atom!r} must be (element, x, y, z, occupancy)")
            element, *numbers = atom
            numbers = [float(v) for v in numbers]
            if not all(math.isfinite(v) for v in numbers):
                raise InputError(f"phase {self.name}: atom {atom!r} has a non-finite coordinate")
            atoms.append((element, *numbers))
        object.__setattr__(self, "atoms", tuple(atoms))

    # -- the wire -------------------------------------------------------------------------
    def to_wire(self, *, payload: bool = True) -> dict:
        """The record as a plain dict. ``payload=False`` leaves out ``extra["payload"]`` (a
        modality's binary model of the phase, a master pattern say: it travels to workers in
        scan_start but has no place in JSON summaries and the live page)."""
        wire = {"name": self.name, "space_group": self.space_group, "lattice": list(self.lattice),
                "atoms": [list(a) for a in self.atoms], "point_group": self.point_group_name}
        if self.source is not None:
            wire["source"] = self.source
        extra = {k: v for k, v in self.extra.items() if payload or k != "payload"}
        if extra:
            wire["extra"] = extra
        return wire

    @classmethod
    def from_wire(cls, wire) -> "PhaseRecord":
        """A record from its wire dict; InputError (one line) for anything malformed."""
        if not isinstance(wire, dict):
            raise InputError(f"a phase must be a record (name, space_group, lattice, atoms), got {type(wire).__name__}")
        try:
            extra = wire.get("extra") or {}
            if not isinstance(extra, dict):
                raise TypeError("extra must be a map")
            return cls(name=wire["name"], space_group=wire["space_group"], lattice=tuple(wire["lattice"]),
                       atoms=tuple(tuple(a) for a in wire.get("atoms") or ()), source=wire.get("source"),
                       extra=extra)
        except InputError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"phase record {str(wire)[:200]} is malformed ({type(exc).__name__}: {exc}); it needs "
                             "name, space_group, lattice [a, b, c, alpha, beta, gamma]") from None

    # -- symmetry ---------------------------------------------------------------------------
    @property
    def point_group(self):
        """orix point group (proper and improper operations) of the space group."""
        return point_group_of(self.space_group)

    @property
    def point_group_name(self) -> str:
        return self.point_group.name

    @property
    def laue(self):
        return laue_of(self.space_group)

    @property
    def crystal_system(self) -> str:
        return self.point_group.system

    def orix_phase(self):
        """orix Phase with the structure (lattice and atoms), for writers and simulation.

        The lattice is built in orix's alignment (e1 || a, e3 || c*) before the atoms go in:
        orix re-aligns a diffpy lattice (e1 || a*) by keeping the atoms' Cartesian positions,
        which moved every atom of a hexagonal or trigonal cell ((1/3, 2/3, 1/4) became
        (0.577, 0.577, 0.25)); cubic, tetragonal and orthorhombic cells were unaffected."""
        from diffpy.structure import Atom, Lattice, Structure
        from orix.crystal_map import Phase

        lattice = Lattice(*self.lattice)
        base = _orix_aligned_base(lattice.base)
        structure = Structure(atoms=[Atom(el, (x, y, z), occupancy=occ) for el, x, y, z, occ in self.atoms],
                              lattice=Lattice(base=base))
        return Phase(self.name, space_group=self.space_group, structure=structure)

    def hkl_families(self, max_families: int = 8, min_dspacing: float = 0.5) -> list[tuple[tuple[int, int, int], float]]:
        """The phase's strongest reflector families, strongest first, as OIM lists them in an
        .ang header: [((h, k, l), relative intensity 0..100)], one (h, k, l) per family (unique
        by the point group), higher orders of a stronger family left out (they are its band).
        See ``hkl_families``."""
        return list(hkl_families(self.space_group, self.lattice, self.cell_atoms(), max_families, min_dspacing))

    def describe(self) -> str:
        a, b, c, al, be, ga = self.lattice
        return (f"{self.name}: space group {self.space_group}, point group {self.point_group_name}, Laue class "
                f"{self.laue.name} ({self.crystal_system}), a={a:g} b={b:g} c={c:g} A, "
                f"alpha={al:g} beta={be:g} gamma={ga:g} deg, {len(self.atoms)} atoms"
                + (f" ({self.setting})" if self.setting else ""))

    @property
    def setting(self) -> str | None:
        """How the cell was re-described to fit orix's crystal frame (``orix_setting``), or None."""
        note = self.extra.get("setting") if isinstance(self.extra, dict) else None
        return note if isinstance(note, str) and note else None

    def cell_atoms(self) -> tuple:
        """Every atom of the cell: the atoms as they are where the record says they are the whole
        cell (from a CIF, expanded by the file's own operators, which the space group's standard
        ones need not be: a Pbnm cell expanded again by Pnma's got 104 atoms for 28), else
        expanded by the space group's operators."""
        whole = isinstance(self.extra, dict) and bool(self.extra.get("full_cell"))
        return self.atoms if whole or self.setting else full_cell(self.atoms, self.space_group)


def record_from_cif(path, *, name: str | None = None, source: str | None = None) -> PhaseRecord:
    """A phase from a CIF: space group, lattice and every atom of the cell (diffpy.structure
    expands the asymmetric unit with the CIF's symmetry operations). The name is ``name``, else
    the file's stem; InputError (one line) for a file that is not a usable CIF."""
    import contextlib
    import io
    import warnings
    from pathlib import Path

    from diffpy.structure.parsers import p_cif

    path = Path(path)
    if not path.is_file():
        raise InputError(f"CIF {path} does not exist; give the path of a .cif file")
    parser = p_cif.P_cif()
    try:
        # PyCifRW prints its parser's complaints to stdout; the one-line error below says it all.
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            structure = parser.parseFile(str(path))
        # diffpy numbers the settings it knows beside the standard one 1000 + n, 2000 + n (R-3c on
        # rhombohedral axes: 1167); the number of the group is n.
        space_group = int(parser.spacegroup.number) % 1000
        rotations = [np.asarray(op.R, float) for op in parser.spacegroup.iter_symops()]
    except Exception as exc:  # diffpy raises StructureFormatError, ValueError, AttributeError...
        raise InputError(f"cannot read {path} as a CIF ({type(exc).__name__}: {str(exc)[:200]}); it needs a cell, "
                         "a space group (_symmetry_Int_Tables_number or the H-M symbol) and atom sites") from None
    if not len(structure):
        raise InputError(f"{path} has no atom sites (_atom_site_fract_x/y/z); a phase needs its atoms")
    atoms = tuple((_element(atom.element), *(float(v) % 1.0 for v in atom.xyz), float(atom.occupancy))
                  for atom in structure)
    name = name or re.sub(r"[^A-Za-z0-9_.+()\- ]", "_", path.stem)[:64] or "phase"
    origin_note = None
    if space_group in ORIGIN_CHOICE_2_SHIFT and _says_origin_choice_2(path):
        # diffpy.structure knows only origin choice 1 and expanded the sites with its operators:
        # the file's asymmetric unit again, moved to origin choice 1, expanded by them.
        shift = ORIGIN_CHOICE_2_SHIFT[space_group]
        unit = tuple((_element(a.element), *(float(x) + d for x, d in zip(a.xyz, shift)), float(a.occupancy))
                     for a in parser.asymmetric_unit)
        atoms = full_cell(unit, space_group)
        origin_note = (f"origin choice 2 (the file says so; it gives no symmetry operations) re-described in origin "
                       f"choice 1: atoms moved by ({', '.join(f'{d:g}' for d in shift)}); orientations are unchanged")
    cell = tuple(structure.lattice.abcABG())
    closest = closest_atoms(cell, atoms)
    if closest is not None and SAME_ATOM_DISTANCE < closest[0] < MIN_ATOM_DISTANCE:
        d, first, second = closest
        raise InputError(f"{path}: after expanding its sites with space group {space_group}'s operations, {first} and "
                         f"{second} atoms sit {d:.2f} angstrom apart: the file's setting or origin is not the one "
                         "assumed (origin choice 1 where the group has two), or a site on a special position has too "
                         "few digits (1/3 as 0.33); give the symmetry operations (_symmetry_equiv_pos_as_xyz), mark "
                         "origin choice 2 in the H-M symbol (for example 'F d -3 m :2'), or give such sites in full")
    # The file's own setting (diffpy's number for it is 1000 + n, 2000 + n...: Pbnm 2062) is kept
    # where orix's operators fit it; its atoms are the whole cell, expanded by the file's operators.
    try:
        lattice, atoms, setting = orix_setting(space_group, cell, atoms, rotations)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None
    setting = "; ".join(note for note in (origin_note, setting) if note) or None
    if setting:
        log.info("phase %s from %s: %s", name, path.name, setting)
    return PhaseRecord(name=name, space_group=space_group, lattice=lattice, atoms=atoms,
                       source=source or f"cif:{path.name}",
                       extra={"full_cell": True, **({"setting": setting} if setting else {})})


# -- origin choices -----------------------------------------------------------------------------
# The centrosymmetric groups that ITA gives in two origin choices. diffpy.structure has origin
# choice 1 only, so a CIF in origin choice 2 that lists no symmetry operations of its own (an
# 'F d -3 m :2' silicon, a spinel) was expanded with the wrong operators: 16 atoms in a silicon
# cell of 8, {222} strong. Origin 2 lies on an inversion centre of origin 1's group at this
# shift (x1 = x2 + shift); for the primitive groups the opposite sign is one too, and gives the
# same structure factor at every hkl (tests/models/test_crystal_origin.py checks both).
ORIGIN_CHOICE_2_SHIFT = {
    48: (1 / 4, 1 / 4, 1 / 4), 50: (1 / 4, 1 / 4, 0), 59: (1 / 4, 1 / 4, 0), 68: (0, 1 / 4, 1 / 4),
    70: (1 / 8, 1 / 8, 1 / 8), 85: (1 / 4, -1 / 4, 0), 86: (1 / 4, 1 / 4, 1 / 4), 88: (0, 1 / 4, 1 / 8),
    125: (1 / 4, 1 / 4, 0), 126: (1 / 4, 1 / 4, 1 / 4), 129: (1 / 4, -1 / 4, 0), 130: (1 / 4, -1 / 4, 0),
    133: (1 / 4, -1 / 4, 1 / 4), 134: (1 / 4, -1 / 4, 1 / 4), 137: (1 / 4, -1 / 4, 1 / 4),
    138: (1 / 4, -1 / 4, 1 / 4), 141: (0, -1 / 4, 1 / 8), 142: (0, -1 / 4, 1 / 8), 201: (1 / 4, 1 / 4, 1 / 4),
    203: (1 / 8, 1 / 8, 1 / 8), 222: (1 / 4, 1 / 4, 1 / 4), 224: (1 / 4, 1 / 4, 1 / 4), 227: (1 / 8, 1 / 8, 1 / 8),
    228: (3 / 8, 3 / 8, 3 / 8),
}
SYMMETRY_OPERATION_TAGS = re.compile(r"^\s*_(symmetry_equiv_pos_as_xyz|symmetry_equiv\.pos_as_xyz|"
                                     r"space_group_symop_operation_xyz|space_group_symop\.operation_xyz)\b",
                                     re.IGNORECASE | re.MULTILINE)
ORIGIN_2_MARKS = re.compile(r"^\s*_(symmetry_space_group_name_H-M|space_group_name_H-M_alt|space_group\.name_H-M_alt)"
                            r"\s+['\"]?[^'\"\n]*:\s*2\b|^\s*_space_group(_|\.)IT_coordinate_system_code\s+['\"]?2\b",
                            re.IGNORECASE | re.MULTILINE)
MIN_ATOM_DISTANCE = 0.5  # angstrom: two full atoms closer than this are a wrong expansion, not a crystal
SAME_ATOM_DISTANCE = 0.05  # angstrom: closer, one atom twice (a special position's imprecise digits), as before


def _says_origin_choice_2(path) -> bool:
    """Whether a CIF marks origin choice 2 (H-M symbol ending ':2', or coordinate system code 2)
    and lists no symmetry operations (with them, diffpy expands in the file's own setting)."""
    text = path.read_text(errors="replace")
    return bool(ORIGIN_2_MARKS.search(text)) and not SYMMETRY_OPERATION_TAGS.search(text)


def closest_atoms(lattice: tuple, atoms: tuple) -> tuple[float, str, str] | None:
    """(distance in angstrom, element, element) of the closest two atoms of the cell and its
    neighbours, among pairs whose occupancies add up to more than one (a mixed or split site's
    partial atoms may share a place); None for fewer than two such atoms."""
    from diffpy.structure import Lattice

    if len(atoms) < 2:
        return None
    base = Lattice(*lattice).base  # rows: a, b, c in angstrom
    xyz = np.array([a[1:4] for a in atoms], float)
    occupancy = np.array([a[4] for a in atoms], float)
    shifts = np.array(list(itertools.product((-1, 0, 1), repeat=3)), float)
    best = (np.inf, "", "")
    for i in range(len(atoms) - 1):
        delta = (xyz[i + 1:, None, :] - xyz[i] + shifts[None]) @ base  # (N-i-1, 27, 3)
        distance = np.linalg.norm(delta, axis=2).min(axis=1)
        distance[occupancy[i + 1:] + occupancy[i] <= 1.01] = np.inf
        j = int(np.argmin(distance))
        if distance[j] < best[0]:
            best = (float(distance[j]), atoms[i][0], atoms[i + 1 + j][0])
    return best if np.isfinite(best[0]) else None


# -- the crystal frame orix's operators assume -----------------------------------------------------
# orix keeps every point group's operators in one crystal frame (e1 || a, e3 || c*): a monoclinic
# group's two-fold along e3 (c unique), a trigonal group's three-fold along e3 (hexagonal axes).
# A cell in another setting (b unique, the monoclinic standard; a unique; rhombohedral axes) would
# be indexed with operators its patterns do not have: monoclinic ZrO2 (P2_1/c, b unique) rendered
# patterns that correlated 0.20 with themselves turned by orix's two-fold
# (models/ebsd/symmetry_check.py). Such a cell is re-described, atoms and all, in the setting
# those operators fit; orientations, Miller indices and the written lattice are then the
# re-described cell's, and the record (``PhaseRecord.setting``), the log and ``liveindex phases
# show`` say how it maps onto the file's.
TO_C_UNIQUE = {0: ((0, 1, 0), (0, 0, 1), (1, 0, 0)),  # rows: the new a, b, c in the old axes
               1: ((0, 0, 1), (1, 0, 0), (0, 1, 0))}
RHOMBOHEDRAL_TO_HEXAGONAL = ((1, -1, 0), (0, 1, -1), (1, 1, 1))  # obverse: a_H = a_R - b_R, c_H = a_R + b_R + c_R
RHOMBOHEDRAL_GROUPS = (146, 148, 155, 160, 161, 166, 167)
ANGLE_TOLERANCE = 1e-3  # degrees


def orix_setting(space_group: int, lattice: tuple, atoms: tuple, rotations) -> tuple[tuple, tuple, str | None]:
    """(lattice, every atom of the cell, how it was re-described or None) for a cell whose
    symmetry operations (``rotations``: (3, 3) matrices on fractional coordinates, the CIF's
    setting) put a monoclinic two-fold or a trigonal three-fold off the c axis."""
    alpha, beta, gamma = lattice[3:]
    if 3 <= space_group <= 15:
        unique = _monoclinic_unique_axis(rotations)
        if unique is None:
            return lattice, atoms, None
        # The cell's angles at its unique axis are 90 deg; where they are not, the operations are
        # another setting's (diffpy prefers a standard-setting number to the file's symbol).
        at_unique = {0: (4, 5), 1: (3, 5), 2: (3, 4)}[unique]
        if any(abs(lattice[i] - 90.0) > ANGLE_TOLERANCE for i in at_unique):
            raise InputError(f"the CIF's symmetry operations put the monoclinic two-fold along {'abc'[unique]}, but its "
                             f"cell angles (alpha, beta, gamma) = {tuple(round(v, 3) for v in lattice[3:])} do not; give "
                             "the operations of the cell's own setting (_symmetry_equiv_pos_as_xyz) or its "
                             "Hermann-Mauguin symbol without a standard-setting number")
        if unique == 2:
            return lattice, atoms, None
        new = _transformed(lattice, atoms, TO_C_UNIQUE[unique])
        old = "abc"[unique]
        labels = ", ".join(f"{n}'={o}" for n, o in zip("abc", "cab" if unique == 1 else "bca"))
        return (*new, f"monoclinic cell with {old} unique re-described with c unique ({labels}), as orix's 2/m "
                      "has its two-fold along c; orientations and Miller indices refer to the re-described cell")
    rhombohedral_axes = not (abs(alpha - 90) < ANGLE_TOLERANCE and abs(beta - 90) < ANGLE_TOLERANCE
                             and abs(gamma - 120) < ANGLE_TOLERANCE)
    if space_group in RHOMBOHEDRAL_GROUPS and rhombohedral_axes:
        new = _transformed(lattice, atoms, RHOMBOHEDRAL_TO_HEXAGONAL)
        return (*new, "rhombohedral axes re-described as hexagonal axes (a'=a-b, b'=b-c, c'=a+b+c, obverse), as "
                      "orix's trigonal groups have their three-fold along c; orientations and Miller indices refer "
                      "to the hexagonal cell")
    return lattice, atoms, None


def _monoclinic_unique_axis(rotations) -> int | None:
    """0, 1 or 2: the cell axis along which the operations' two-fold (or the mirror's normal) lies."""
    for r in rotations:
        proper = np.asarray(r, float) * np.sign(np.linalg.det(r))
        if round(float(np.trace(proper))) == -1:  # a two-fold: +1 along its axis, -1 across
            axes = [i for i in range(3) if round(float(proper[i, i])) == 1]
            if len(axes) == 1:
                return axes[0]
    return None


def _transformed(lattice: tuple, atoms: tuple, rows) -> tuple[tuple, tuple]:
    """The cell whose axes are ``rows`` (integer combinations of the old axes; determinant 1, or
    3 for rhombohedral to hexagonal) and every atom in it, each position once."""
    from diffpy.structure import Lattice

    m = np.asarray(rows, float)
    base = m @ Lattice(*lattice).base
    lengths = np.linalg.norm(base, axis=1)

    def angle(i, j):
        return math.degrees(math.acos(float(np.clip(base[i] @ base[j] / (lengths[i] * lengths[j]), -1.0, 1.0))))

    new_lattice = tuple(round(float(v), 6) for v in (*lengths, angle(1, 2), angle(0, 2), angle(0, 1)))
    inverse = np.linalg.inv(m)
    cell, seen = [], set()
    # The old lattice's translations that are not the new one's (a larger cell) place the copies.
    for element, x, y, z, occupancy in atoms:
        for shift in itertools.product((-1, 0, 1), repeat=3):
            xyz = ((np.array([x, y, z]) + shift) @ inverse) % 1.0
            key = (element, *(round(float(v), 4) % 1.0 for v in xyz))
            if key not in seen:
                seen.add(key)
                cell.append((element, *(float(v) for v in xyz), float(occupancy)))
    return new_lattice, tuple(cell)


ELEMENTS = ("H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As Se Br Kr "
            "Rb Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe Cs Ba La Ce Pr Nd Pm Sm Eu Gd Tb Dy Ho Er Tm Yb "
            "Lu Hf Ta W Re Os Ir Pt Au Hg Tl Pb Bi Po At Rn Fr Ra Ac Th Pa U Np Pu Am Cm Bk Cf Es Fm").split()


def _element(symbol) -> str:
    """'Ti1', 'Fe2+', 'O2-' -> 'Ti', 'Fe', 'O'; EMsoft's atomic numbers ('28') -> 'Ni' (the
    scattering factor tables know element symbols)."""
    text = str(symbol).strip()
    if text.isdigit() and 1 <= int(text) <= len(ELEMENTS):
        return ELEMENTS[int(text) - 1]
    match = re.match(r"[A-Z][a-z]?", text.capitalize())
    if not match:
        raise InputError(f"atom type {symbol!r} names no element; use element symbols in _atom_site_type_symbol")
    return match.group(0)


def full_cell(atoms, space_group: int) -> tuple:
    """Atoms (element, x, y, z, occupancy) of the asymmetric unit or of the whole cell -> every
    atom of the cell, by the space group's operations (diffpy), each position once, mod 1."""
    from diffpy.structure.spacegroups import GetSpaceGroup
    from diffpy.structure.symmetryutilities import ExpandAsymmetricUnit

    if not atoms:
        return ()
    expanded = ExpandAsymmetricUnit(GetSpaceGroup(int(space_group)), [a[1:4] for a in atoms])
    cell, seen = [], set()
    for (element, _, _, _, occupancy), positions in zip(atoms, expanded.expandedpos):
        for xyz in positions:
            xyz = tuple(float(v) % 1.0 for v in xyz)
            key = (element, *(round(v, 4) % 1.0 for v in xyz))  # a mixed site keeps each element
            if key not in seen:
                seen.add(key)
                cell.append((element, *xyz, float(occupancy)))
    return tuple(cell)


def _orix_aligned_base(base: np.ndarray) -> np.ndarray:
    """The structure matrix (rows a, b, c) turned so that a lies along e1 and c* along e3, as
    orix keeps it (orix's ``new_structure_matrix_from_alignment(x="a", z="c*")``)."""
    a, b, c = (np.asarray(v, float) for v in base)
    e1 = a / np.linalg.norm(a)
    c_star = np.cross(a, b)
    e3 = c_star / np.linalg.norm(c_star)
    e2 = np.cross(e3, e1)
    frame = np.stack([e1, e2, e3])  # rows: the new axes in the old coordinates
    return np.asarray(base, float) @ frame.T


@functools.lru_cache(maxsize=64)
def hkl_families(space_group: int, lattice: tuple, atoms: tuple, max_families: int = 8,
                 min_dspacing: float = 0.5) -> tuple:
    """((h, k, l), relative intensity) of a phase's strongest reflector families.

    Families are the point group's unique (hkl) with d >= ``min_dspacing`` angstrom (diffsims'
    ``ReciprocalLatticeVector``), scored by the kinematical structure factor |F| of every atom
    of the cell (``atoms``: the whole cell, ``PhaseRecord.cell_atoms``), with diffsims' X-ray
    atomic scattering factors at s = 1/(2d); a family that is a multiple n(hkl) of a stronger
    allowed family is left out (the same band: {222} beside {111}). Strongest first, ties by d (larger
    first); intensity as a percentage of the strongest. Without atoms: the reflections the
    space group's centring allows, largest d first (intensity 100).
    """
    from diffpy.structure import Atom
    from diffsims.crystallography import ReciprocalLatticeVector
    from diffsims.structure_factor.atomic_scattering_factor import get_kinematical_atomic_scattering_factor

    record = PhaseRecord("families", int(space_group), tuple(lattice), tuple(atoms))
    phase = record.orix_phase()
    vectors = ReciprocalLatticeVector.from_min_dspacing(phase, min_dspacing).unique(use_symmetry=True)
    hkl = np.rint(vectors.hkl).astype(int)
    d = np.asarray(vectors.dspacing, float)
    if record.atoms:
        s = 1.0 / (2.0 * d)
        f_total = np.zeros(len(hkl), complex)
        factors = {}  # (element, occupancy) -> f(s) of every family
        for element, x, y, z, occupancy in record.atoms:
            if (element, occupancy) not in factors:
                atom = Atom(element, occupancy=occupancy)
                factors[element, occupancy] = np.array([get_kinematical_atomic_scattering_factor(atom, si) for si in s])
            f_total += factors[element, occupancy] * np.exp(2j * np.pi * (hkl @ np.array([x, y, z])))
        strength = np.abs(f_total)
        allowed = strength > 1e-6 * max(strength.max(), 1e-12)
    else:
        strength = np.ones(len(hkl))
        allowed = np.asarray(vectors.allowed, bool) if hasattr(vectors, "allowed") else np.ones(len(hkl), bool)
    rows = np.flatnonzero(allowed)
    rows = rows[np.lexsort((-d[rows], -np.round(strength[rows], 9)))]
    # A higher order n (h'k'l') of a stronger allowed family is the same band: left out.
    row_of = {tuple(hkl[i]): i for i in rows}
    order = []
    for i in rows:
        if len(order) == max_families:
            break
        g = int(np.gcd.reduce(np.abs(hkl[i])))
        lower = [tuple(v) for n in range(2, g + 1) if g % n == 0
                 for v in np.rint(ReciprocalLatticeVector(phase, hkl=[hkl[i] // n]).symmetrise().hkl).astype(int)]
        if not any(row_of.get(v) is not None and strength[row_of[v]] >= strength[i] for v in lower):
            order.append(i)
    top = strength[order].max() if len(order) else 1.0
    return tuple((_display_hkl(phase, hkl[i]), float(100.0 * strength[i] / top)) for i in order)


def _display_hkl(phase, hkl) -> tuple[int, int, int]:
    """The symmetric equivalent of (hkl) with the most non-negative, then the largest, indices
    ((2, 0, 0) rather than (0, -2, 0))."""
    from diffsims.crystallography import ReciprocalLatticeVector

    equivalents = np.rint(ReciprocalLatticeVector(phase, hkl=[hkl]).symmetrise().hkl).astype(int)
    best = max(equivalents.tolist(), key=lambda v: (sum(x >= 0 for x in v), v))
    return tuple(int(x) for x in best)


def phases_from_wire(records) -> list[PhaseRecord]:
    if not isinstance(records, (list, tuple)) or not records:
        raise InputError("a scan needs at least one phase record")
    phases = [PhaseRecord.from_wire(r) for r in records]
    names = [p.name for p in phases]
    if len(set(names)) != len(names):
        raise InputError(f"phase names {names} repeat; give each phase its own name (NAME=path)")
    return phases


def structure_factors(phase, hkl, scattering_params: str = "xtables") -> np.ndarray:
    """Complex kinematical structure factors F of (N, 3) Miller indices, from the orix phase's full
    cell (as ``PhaseRecord.orix_phase`` builds it), each index on its own.

    diffsims' routine moves the atoms into "the Miller indices' frame" with the lattice's
    standard base, which is right only for a lattice in diffpy's standard orientation: for the
    hexagonal and trigonal cells orix aligns (e1 || a) it put the atoms elsewhere (corundum's
    forbidden 100 came out 16.9, its 006 weak). Fractional coordinates and Miller indices do not
    depend on the orientation, so the cell is handed over in the standard one."""
    from diffpy.structure import Atom, Lattice, Structure
    from diffsims.utils.sim_utils import _get_kinematical_structure_factor

    lattice = Lattice(*phase.structure.lattice.abcABG())
    standard = Structure(atoms=[Atom(a.element, a.xyz, occupancy=a.occupancy, Uisoequiv=a.Uisoequiv)
                                for a in phase.structure], lattice=lattice)
    hkl = np.asarray(hkl, float).reshape(-1, 3)
    return _get_kinematical_structure_factor(structure=standard, g_indices=hkl, g_hkls_array=lattice.rnorm(hkl),
                                             scattering_params=scattering_params)


@functools.lru_cache(maxsize=256)
def point_group_of(space_group: int):
    """The orix point group of a space group number (1..230)."""
    from orix.quaternion.symmetry import get_point_group

    return get_point_group(int(space_group), proper=False)


@functools.lru_cache(maxsize=256)
def laue_of(space_group: int):
    """The orix Laue group of a space group, one of the 11 named ones.

    orix's ``Symmetry.laue`` of point group m comes back unnamed (with repeated operations);
    the named Laue group with the same proper rotations is the same group, and the IPF key
    and the writers need the named one."""
    from orix.quaternion import symmetry

    laue = point_group_of(space_group).laue
    named = [symmetry.Ci, symmetry.C2h, symmetry.D2h, symmetry.C4h, symmetry.D4h, symmetry.S6, symmetry.D3d,
             symmetry.C6h, symmetry.D6h, symmetry.Th, symmetry.Oh]
    if laue.name in {g.name for g in named}:
        return laue
    rotations = _rotation_set(laue.proper_subgroup.data)
    return next(g for g in named if _rotation_set(g.proper_subgroup.data) == rotations)


def _rotation_set(quaternions: np.ndarray) -> frozenset:
    q = np.asarray(quaternions, float)
    q = q * np.where(q[:, :1] < 0, -1, 1)  # q and -q are one rotation
    return frozenset(tuple(np.round(row, 6) + 0.0) for row in q)


@functools.lru_cache(maxsize=256)
def proper_operators(space_group: int) -> np.ndarray:
    """(S, 4) float64 quaternions of the space group's proper rotations."""
    return np.asarray(point_group_of(space_group).proper_subgroup.data, np.float64)


# -- quaternion maths --------------------------------------------------------------------------
def quaternion_multiply(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Hamilton product of (..., 4) quaternions, broadcasting."""
    a1, b1, c1, d1 = np.moveaxis(p, -1, 0)
    a2, b2, c2, d2 = np.moveaxis(q, -1, 0)
    return np.stack([a1 * a2 - b1 * b2 - c1 * c2 - d1 * d2,
                     a1 * b2 + b1 * a2 + c1 * d2 - d1 * c2,
                     a1 * c2 - b1 * d2 + c1 * a2 + d1 * b2,
                     a1 * d2 + b1 * c2 - c1 * b2 + d1 * a2], -1)


def quaternion_conjugate(q: np.ndarray) -> np.ndarray:
    return q * np.array([1.0, -1.0, -1.0, -1.0], dtype=np.asarray(q).dtype)


def disorientation_degrees(q: np.ndarray, truth: np.ndarray, operators: np.ndarray) -> np.ndarray:
    """(N, 4) orientations and their (N, 4) truths -> (N,) angles in degrees, reduced by one
    phase's proper symmetry ``operators`` (S, 4), as orix's ``Orientation.angle_with``: the
    smallest rotation taking one to a symmetry equivalent of the other. In orix's convention
    the equivalents of an orientation q are s * q (checked against orix in the tests)."""
    q = np.asarray(q, np.float64)
    truth = np.asarray(truth, np.float64)
    ops = np.asarray(operators, np.float64)
    # The angle of s * q against t is 2 acos |<s * q, t>|; crystal symmetry on t's side adds
    # nothing to the minimum over s (s' * t against s * q is s'^-1 s * q against t).
    equivalents = quaternion_multiply(ops[None, :, :], q[:, None, :])  # (N, S, 4)
    dots = np.abs(np.einsum("nsk,nk->ns", equivalents, truth)).max(axis=1)
    return np.degrees(2 * np.arccos(np.clip(dots, 0.0, 1.0)))


def disorientation_by_phase(q: np.ndarray, truth: np.ndarray, phase_id: np.ndarray,
                            phases: list[PhaseRecord]) -> np.ndarray:
    """Each point's disorientation with its own phase's symmetry; NaN where phase_id < 0."""
    out = np.full(len(q), np.nan, np.float32)
    for pid, phase in enumerate(phases):
        mine = np.flatnonzero(phase_id == pid)
        if len(mine):
            out[mine] = disorientation_degrees(q[mine], truth[mine], proper_operators(phase.space_group))
    return out

"""CIFs in ITA's origin choice 2 without symmetry operations of their own: diffpy.structure
knows origin choice 1 only, so the sites are moved to it before they are expanded."""

import itertools

import numpy as np
import pytest

from liveindex.models.crystal import ORIGIN_CHOICE_2_SHIFT, closest_atoms, record_from_cif
from liveindex.models.errors import InputError

CUBIC_CIF = """data_{name}
_cell_length_a {a}
_cell_length_b {a}
_cell_length_c {a}
_cell_angle_alpha 90
_cell_angle_beta 90
_cell_angle_gamma 90
_symmetry_space_group_name_H-M '{symbol}'
_space_group_IT_number {number}
loop_
_atom_site_label
_atom_site_type_symbol
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
_atom_site_occupancy
{sites}
"""
HKL = np.array(list(itertools.product(range(-5, 6), repeat=3)))


def _cif(tmp_path, name, symbol, sites, a=5.4309, number=227):
    path = tmp_path / f"{name}.cif"
    lines = "\n".join(f"{el}{i} {el} {x} {y} {z} 1.0" for i, (el, x, y, z) in enumerate(sites))
    path.write_text(CUBIC_CIF.format(name=name, a=a, symbol=symbol, number=number, sites=lines))
    return record_from_cif(path)


def _structure_factors(record):
    """|F| at every hkl up to 5, each atom weighted by its atomic number's stand-in (its element)."""
    weight = {"Si": 14.0, "Mg": 12.0, "Al": 13.0, "O": 8.0}
    xyz = np.array([a[1:4] for a in record.atoms])
    w = np.array([weight[a[0]] for a in record.atoms])
    return np.abs(np.exp(2j * np.pi * HKL @ xyz.T) @ w)


def test_silicon_in_origin_choice_2_is_the_diamond_structure(tmp_path):
    origin_2 = _cif(tmp_path, "si2", "F d -3 m :2", [("Si", 0.125, 0.125, 0.125)])
    origin_1 = _cif(tmp_path, "si1", "F d -3 m", [("Si", 0.0, 0.0, 0.0)])
    assert len(origin_2.atoms) == len(origin_1.atoms) == 8  # it came out 16 before
    assert "origin choice 2" in origin_2.setting
    assert np.allclose(_structure_factors(origin_2), _structure_factors(origin_1), atol=1e-6)
    f = dict(zip(map(tuple, HKL), _structure_factors(origin_2)))
    assert f[(2, 2, 2)] < 1e-6 and f[(2, 0, 0)] < 1e-6 and f[(1, 1, 1)] > 50  # diamond's extinctions
    assert closest_atoms(origin_2.lattice, origin_2.atoms)[0] == pytest.approx(5.4309 * np.sqrt(3) / 4, rel=1e-4)


def test_spinel_in_either_origin_choice_gives_the_same_crystal(tmp_path):
    # MgAl2O4: origin 2 (Mg 8a at 1/8, Al 16d at 1/2, O 32e at u = 0.2624) and the same in origin 1.
    origin_2 = _cif(tmp_path, "sp2", "F d -3 m :2", [("Mg", 0.125, 0.125, 0.125), ("Al", 0.5, 0.5, 0.5),
                                                     ("O", 0.2624, 0.2624, 0.2624)], a=8.0806)
    origin_1 = _cif(tmp_path, "sp1", "F d -3 m", [("Mg", 0, 0, 0), ("Al", 0.625, 0.625, 0.625),
                                                  ("O", 0.3874, 0.3874, 0.3874)], a=8.0806)
    assert len(origin_2.atoms) == len(origin_1.atoms) == 56
    assert np.allclose(_structure_factors(origin_2), _structure_factors(origin_1), atol=1e-4)
    distance, *_ = closest_atoms(origin_2.lattice, origin_2.atoms)
    assert 1.8 < distance < 2.0  # the Al-O and Mg-O bonds, about 1.9 angstrom


@pytest.mark.parametrize("number", sorted(ORIGIN_CHOICE_2_SHIFT))
def test_each_shift_is_an_inversion_centre_of_origin_choice_1(number):
    from diffpy.structure.spacegroups import GetSpaceGroup

    shift = np.array(ORIGIN_CHOICE_2_SHIFT[number])
    group = GetSpaceGroup(number)

    def is_inversion_centre(point):  # x -> 2 point - x is one of origin 1's operations
        return any(np.allclose(op.R, -np.eye(3)) and np.allclose((op.t - 2 * point + 0.5) % 1 - 0.5, 0, atol=1e-9)
                   for op in group.iter_symops())

    assert is_inversion_centre(shift)  # origin choice 2 sits on an inversion centre
    # Where the opposite sign is an inversion centre too, it gives the same |F| at every hkl.
    from diffpy.structure.symmetryutilities import ExpandAsymmetricUnit

    sites = np.random.default_rng(number).random((2, 3))

    def amplitudes(sign):
        expanded = ExpandAsymmetricUnit(group, [tuple(s + sign * shift) for s in sites]).expandedpos
        xyz = np.unique(np.round(np.concatenate(expanded) % 1, 6) % 1, axis=0)
        return np.abs(np.exp(2j * np.pi * HKL @ xyz.T).sum(axis=1))

    if is_inversion_centre(-shift):
        assert np.allclose(amplitudes(1), amplitudes(-1), atol=1e-6)


def test_atoms_expanded_on_top_of_each_other_are_refused(tmp_path):
    # Two full atoms 0.2 angstrom apart after expansion: not a crystal but a wrong setting.
    path = tmp_path / "bad.cif"
    path.write_text(CUBIC_CIF.format(name="bad", a=4.0, symbol="P m -3 m", number=221,
                                     sites="Ni1 Ni 0 0 0 1.0\nNi2 Ni 0.05 0 0 1.0"))
    with pytest.raises(InputError, match="apart"):
        record_from_cif(path)

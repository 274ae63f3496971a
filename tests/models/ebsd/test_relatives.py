"""Ordering relatives come from a phase's own cell (models/ebsd/relatives.py)."""

from pathlib import Path

from liveindex.models.ebsd.master_patterns import phases_from_spec, record_of
from liveindex.models.ebsd.relatives import full_cell, ordering_relatives

DATA = Path(__file__).resolve().parents[2] / "data"


def _elements(record):
    return sorted(a[0] for a in record.atoms)


def test_a_centred_cell_gets_an_ordered_child_and_an_ordered_one_its_disordered_parent():
    twin, relatives = ordering_relatives(record_of("ni"))
    assert twin.space_group == 2 and _elements(twin) == ["Ni"] * 4
    assert [r.name for r in relatives] == ["ni ordered"] and _elements(relatives[0]) == ["Ni", "Ni", "Ni", "Si"]
    _, relatives = ordering_relatives(record_of("fe"))  # bcc -> B2
    assert _elements(relatives[0]) == ["Al", "Fe"]
    _, relatives = ordering_relatives(record_of("ni3al"))  # L1_2: not centred, its parent is fcc
    assert [r.name for r in relatives] == ["ni3al disordered"] and _elements(relatives[0]) == ["Ni"] * 4


def test_a_primitive_cell_without_extra_translations_has_no_relatives():
    ti = phases_from_spec(str(DATA / "ti.cif"))[0]
    assert len(full_cell(ti)) == 2
    assert ordering_relatives(ti)[1] == []

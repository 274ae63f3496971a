"""What the spot modality reports for each scan point (fields) and what answered it (methods)."""

from liveindex.models.modality import Field, Method

from .latent import DIMS

METHODS = (
    Method("refined", (40, 150, 220), "polar template matching, then refinement against the simulated spots"),
    Method("template", (230, 160, 40), "polar template matching only (--no-refine)"),
    Method("none", (0, 0, 0), "not indexed: no crystal pattern (amorphous, vacuum) or below --min-confidence"),
)
METHOD_CODES = {m.label: i for i, m in enumerate(METHODS)}
FIELDS = (
    Field("phase_id", "int16", (), -1, "index into the scan's phases; -1 not indexed"),
    Field("quaternion", "float32", (4,), [1.0, 0.0, 0.0, 0.0], "orientation, orix convention (w, x, y, z)"),
    Field("confidence", "float32", (), 0.0, "calibrated: above 0.5 right phase and within 3 deg (modulo 180 deg)"),
    Field("method", "uint8", (), METHOD_CODES["none"]),
    Field("reliability", "float32", (), 0.0, "1 - Q2/Q1 of the best and the best other solution (ASTAR's index)"),
    Field("ambiguous", "uint8", (), 0, "1: the answer turned 180 deg about the beam fits as well (kinematical)"),
    Field("score", "float32", (), 0.0, "correlation of the answer's spots with the pattern"),
    Field("explained", "float32", (), 0.0, "fraction of the pattern's spot energy at the answer's predicted spots"),
    # The latent maps' novelty reads this where a modality has it (stream/latent_map.py explained_of)
    # rather than the confidence, which is too conservative to tell unsure listed grains from a
    # phase missing from the list.
    Field("listed", "float32", (), 0.0, "calibrated chance that the pattern is of a listed phase (any orientation)"),
    Field("fit", "float32", (), 0.0, "1 - score where indexed (lower is better), NaN where not"),
    Field("iq", "float32", (), 0.0, "pattern sharpness: energy fraction in the brightest 1% of the polar image"),
    Field("vbf", "float32", (), 0.0, "virtual bright field: counts in the direct beam"),
    Field("center", "float32", (2,), 0.0, "direct-beam centre (x, y) in pixels, given or found"),
    # The latent maps' input (latent.py): the frame's rotation-invariant polar features in the
    # scan's basis, which the scan_start carries; NaN where there is none (--latent off). Fill 0
    # (a NaN fill would make the field unequal to itself on the wire), as EBSD's.
    Field("embedding", "float16", (DIMS,), 0.0, "the frame's rotation-invariant polar features in the scan's "
                                                        "latent basis, the sink's cluster/boundary/novelty maps"),
)

"""Fit and check the confidence (models/ebsd/confidence.py) on right and wrong-phase answers.

Sets (simulated, 25x25 points, grain size 2, moderate and hard noise): each built-in or test
phase indexed with itself (right answers) and with a phase that is not the scan's (fcc
austenite/Ni, bcc ferrite, hcp Ti in every pairing: wrong answers), plus the real kikuchipy Ni
scan (right answers, real patterns). Per point: refined NCC and the explained share E. Fits
a logistic in log NCC and log E (wrong points weighted 5x) on seed 1, reports on seed 2 per
set: how often confidence > 0.5, and over all sets how often a point above 0.5 is right
(phase and within 3 deg). Prints the constants to put in models/ebsd/confidence.py.

    .venv/bin/python benchmarks/calibrate_confidence.py
    .venv/bin/python benchmarks/calibrate_confidence.py --systems   # only the held-out report on
        trigonal corundum, orthorhombic forsterite (Pbnm) and monoclinic ZrO2 (b unique in its CIF),
        each indexed with itself and with another of them, with the constants in use (not fitted on)
"""

from __future__ import annotations

import numpy as np

from liveindex.models.ebsd import confidence as conf
from liveindex.models.ebsd.confidence import explained_share
from liveindex.models.ebsd.indexer import ScanIndexer
from liveindex.models.ebsd.master_patterns import disorientation_degrees, phases_from_spec, register
from liveindex.models.ebsd.simulator import SimulatedScan

DATA = __import__("pathlib").Path(__file__).resolve().parents[1] / "tests" / "data"
TARGET_PRECISION = 0.995


def features(indexer: ScanIndexer, frames: np.ndarray, background=None):
    """Per point: log NCC, log explained share, log reliability (template matching on, so every
    point has one)."""
    result = indexer.index(frames, indexer.new_background() if background is None else background)
    flat, valid = indexer.preprocess(frames, indexer.new_background())
    rendered = indexer.refiners[0].render(result.quaternion)
    explained = explained_share(indexer.preprocess, flat, rendered, result.score, indexer._white_share)
    return result, np.stack([np.log(np.maximum(result.score, 1e-3)), np.log(np.maximum(explained, 1e-3)),
                             np.log(np.where(result.reliability > 0, result.reliability, 1.0))], 1)


# Ordered and disordered crystals of one orientation (L1_2 Ni3Al and fcc Ni) differ only by
# weak superlattice bands: measured and reported, but not fitted on (see main).
ORDERED_DISORDERED = [("ni3al", "ni"), ("ni", "ni3al")]


def other_systems() -> list[tuple[str, str]]:
    """Right and wrong pairs of the crystal systems the fit never saw: trigonal, orthorhombic,
    monoclinic (from CIFs in the settings their authors use: R-3c hexagonal, Pbnm, P2_1/c b unique)."""
    corundum, forsterite, zro2 = (register(phases_from_spec(str(DATA / name))[0])
                                  for name in ("corundum.cif", "forsterite_pbnm.cif", "zro2_monoclinic.cif"))
    return [(corundum, corundum), (forsterite, forsterite), (zro2, zro2), (zro2, forsterite), (forsterite, corundum),
            (corundum, zro2)]


def simulated_sets(seed: int, pairs=None):
    ti = register(phases_from_spec(str(DATA / "ti.cif"))[0])
    fe = register(phases_from_spec(str(DATA / "ferrite.cif"))[0])
    pairs = pairs or [("ni", "ni"), ("fe", "fe"), (ti, ti), ("fe", "ni"), (ti, "ni"), ("ni", "fe"), ("ni", ti),
                      (ti, fe), (fe, ti), ("ni", fe)]
    indexers = {}
    for noise in ("moderate", "hard"):
        for scan_phase, listed in pairs:
            scan = SimulatedScan((25, 25), noise=noise, phase=scan_phase, seed=seed, grain_size=2)
            if listed not in indexers:
                indexers[listed] = ScanIndexer(scan.geometry, [listed], progress=False, indexer="templates")
            result, x = features(indexers[listed], scan.render(0, scan.size))
            right = (np.asarray(disorientation_degrees(result.quaternion, scan.truth, scan_phase)) < 3
                     if scan_phase == listed else np.zeros(scan.size, bool))
            name = f"{'right' if scan_phase == listed else 'wrong'} {_name(scan_phase)} as {_name(listed)} {noise}"
            yield name, x, right


def real_nickel():
    import kikuchipy as kp

    from liveindex.models.ebsd.files import python_source

    source, carried = python_source(kp.data.nickel_ebsd_small(), phases=["ni"])
    indexer = ScanIndexer(source.geometry, ["ni"], progress=False, static_background=carried["static_background"],
                          indexer="templates")
    _, x = features(indexer, source.read(0, source.size))
    return "right real Ni scan (kikuchipy)", x, np.ones(source.size, bool)


def report(sets) -> tuple[int, int]:
    """Print each set's share above confidence 0.5 (the constants in use) and how much of it is
    right; returns how many points were above 0.5 and how many of those were right."""
    sure = sure_right = 0
    for name, x, right in sets:
        above = conf.confidence(np.exp(x[:, 0]), np.exp(x[:, 1]), np.exp(x[:, 2])) > 0.5
        sure += int(above.sum())
        sure_right += int((above & right).sum())
        print(f"  {name:34s} confidence > 0.5: {above.mean():6.1%}   right: {right.mean():6.1%}")
    return sure, sure_right


def fit(x: np.ndarray, y: np.ndarray, weight: np.ndarray, LogisticRegression) -> tuple:
    """Logistic regression, then the intercept lowered until the training points above 0.5 are
    right at least TARGET_PRECISION of the time (the promise is 99%; the margin is for unseen
    data). Returns the coefficients and the intercept, rounded."""
    model = LogisticRegression(C=10, max_iter=5000).fit(x, y, sample_weight=weight)
    coefficients, intercept = model.coef_[0], model.intercept_[0]
    logit = x @ coefficients
    while intercept > -50:
        above = logit + intercept > 0
        if not above.any() or y[above].mean() >= TARGET_PRECISION:
            break
        intercept -= 0.05
    return tuple(round(float(v), 2) for v in (*coefficients, intercept))


def _name(key: str) -> str:
    return key.split("-")[0]


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", action="store_true",
                        help="only report on trigonal, orthorhombic and monoclinic phases (held out, seed 2)")
    if parser.parse_args(argv).systems:
        print("held-out seed, the constants in use, crystal systems the fit never saw:")
        sure, sure_right = report(simulated_sets(2, other_systems()))
        print(f"points above 0.5 that are right (phase and within 3 deg): {sure_right / max(sure, 1):.2%} of {sure}")
        return
    from sklearn.linear_model import LogisticRegression

    real = real_nickel()
    train = list(simulated_sets(1)) + [real]
    x = np.concatenate([s[1] for s in train])
    y = np.concatenate([s[2] for s in train])
    weight = np.concatenate([np.where(s[2], 60.0 if s is real else 1.0, 5.0) for s in train])
    for columns, name, in_use in (([0, 1], "network answers (log NCC, log E)",
                                   (conf.COEF_LOG_NCC, conf.COEF_LOG_EXPLAINED, conf.INTERCEPT)),
                                  ([0, 1, 2], "matched answers (log NCC, log E, log R): RELIABLE", conf.RELIABLE)):
        print(f"fitted for {name}: {fit(x[:, columns], y, weight, LogisticRegression)} (in use: {in_use})")
    print("held-out seed, the constants in use (every point matched, so the RELIABLE model):")
    sure, sure_right = report(list(simulated_sets(2)) + [real])
    print(f"points above 0.5 that are right (phase and within 3 deg): {sure_right / max(sure, 1):.2%} of {sure}")
    # Ordered/disordered: the same orientation, a phase told apart only by superlattice bands.
    # Not fitted on: NCC, explained share and reliability cannot see them (the latent maps are
    # for that); shown so that nobody reads the figure above as covering them.
    print("ordered / disordered (same orientation; the wrong phase's fit is as good as the right one's):")
    more, more_right = report(simulated_sets(2, ORDERED_DISORDERED))
    sure, sure_right = sure + more, sure_right + more_right
    print(f"with them: points above 0.5 that are right: {sure_right / max(sure, 1):.2%} of {sure}")


if __name__ == "__main__":
    main()

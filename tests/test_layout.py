"""The layout the modality contract promises: the runtime imports no modality, no heavy
science library at import time, and nothing under models/ imports the runtime."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("kikuchipy", "diffsims", "torch")
# Packages under models/ that are shared by every modality, not a modality: the runtime may
# name them (the sink's latent maps), lazily, as it names models/modality.py.
SHARED = ("liveindex.models.latent",)


def test_the_runtime_imports_no_modality_and_no_heavy_library():
    code = ("import sys, liveindex.stream.worker, liveindex.stream.sink, liveindex.stream.publisher, "
            "liveindex.stream.protocol, liveindex.stream.cli, liveindex.stream.offline, liveindex.stream.demo; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})); "
            "print(sorted(m for m in sys.modules if m.startswith('liveindex.models.') and m.count('.') > 2))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]", f"the runtime imported {out[0]}"
    assert out[1] == "[]", f"the runtime imported a modality package at import time: {out[1]}"


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_nothing_under_models_imports_the_runtime():
    offenders = [f"{p.relative_to(ROOT)}: {name}" for p in (ROOT / "models").rglob("*.py")
                 for name in _imports(p) if name.startswith("liveindex.stream")]
    assert not offenders, offenders


def test_the_runtime_names_no_modality_package():
    offenders = [f"{p.relative_to(ROOT)}: {name}" for p in (ROOT / "stream").rglob("*.py")
                 for name in _imports(p) if name.startswith("liveindex.models.") and name.count(".") > 2
                 and not name.startswith(SHARED)]
    assert not offenders, offenders

"""liveindex's spot indexer, as ``liveindex index`` runs it, from this tree and from another
checkout (with its own virtualenv), alternating, in fresh processes: patterns/s, CPU seconds,
the load beside each run, and whether the answers agree pattern by pattern.

Each run is a process of the tree's own Python (``--other-python``: the other checkout's
``.venv/bin/python``, started in ``--other-tree``), which renders (or reads from the cache
folder) the evaluation set of benchmarks/spots_side_by_side.py (ferrite, austenite, cementite,
moderate noise, the beam at the frame centre), warms up on 64 patterns, then indexes the set
once through stream/offline.py's index_source (``--threads`` pages at once on one-thread ONNX
sessions, the shipped spot networks first, no latent maps) and writes its fields. The other
checkout's numba cache goes to ``--cache``, not into its tree.

    .venv/bin/python benchmarks/spots_against_tree.py --other-tree /work/main \\
        --other-python /work/main/.venv/bin/python --n 1200 --seed 7 --repeats 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def worker(args) -> None:
    """One timed run in this process, of whichever tree the interpreter imports liveindex from."""
    from liveindex.models import modality as modalities
    from liveindex.models.arrays import ArraySource
    from liveindex.models.spots.evaluate import make_set
    from liveindex.models.spots.phases import phases_from_spec
    from liveindex.models.spots.setup import check_setup
    from liveindex.stream.offline import index_source

    phases = phases_from_spec("ferrite,austenite,cementite")
    setup = check_setup({"kv": 200.0, "calibration": 0.03, "precession": 1.0}, (128, 128))
    cached = Path(args.cache) / f"set_{args.noise}_{args.seed}_{args.n}.npy"
    if cached.is_file():
        frames = np.load(cached)
    else:
        frames = make_set(phases, setup, args.n, noise=args.noise, seed=args.seed, center_jitter=False).frames
        np.save(cached, frames)

    def source(patterns):
        made = ArraySource(patterns, modality=modalities.load("spots"), setup=setup, phases=phases, name="set")
        made.fit_latent = False
        return made

    options = {"resolution": 2.0, "refine": True, "latent": False, "bundle": "default"}
    index_source(source(frames[:64]), threads=args.threads, providers="cpu", progress=False, **options)  # warm-up
    load = " ".join(open("/proc/loadavg").read().split()[:3])
    cpu = time.process_time()
    fields, seconds = index_source(source(frames), threads=args.threads, providers="cpu", progress=False, **options)
    np.savez(args.out, **fields)
    print(json.dumps({"patterns_per_s": round(len(frames) / seconds, 1), "seconds": round(seconds, 2),
                      "cpu_s": round(time.process_time() - cpu, 2), "load_before": load,
                      "load_after": " ".join(open("/proc/loadavg").read().split()[:3])}))


def differ(a, b) -> dict:
    return {"phase": int((a["phase_id"] != b["phase_id"]).sum()),
            "quaternion_over_1e-5": int((np.abs(a["quaternion"] - b["quaternion"]).max(1) > 1e-5).sum()),
            "quaternion_max_difference": float(np.abs(a["quaternion"] - b["quaternion"]).max()),
            "confidence_over_1e-6": int((np.abs(a["confidence"] - b["confidence"]) > 1e-6).sum()),
            "reliability_over_1e-6": int((np.abs(a["reliability"] - b["reliability"]) > 1e-6).sum()),
            "score_over_1e-6": int((np.abs(a["score"] - b["score"]) > 1e-6).sum()),
            "explained_over_1e-6": int((np.abs(a["explained"] - b["explained"]) > 1e-6).sum()),
            "ambiguous": int((a["ambiguous"] != b["ambiguous"]).sum())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--other-tree", required=False, help="the other checkout (its liveindex is imported there)")
    p.add_argument("--other-python", help="the other checkout's Python (default: its .venv/bin/python)")
    p.add_argument("--n", type=int, default=1200)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--noise", default="moderate", choices=["clean", "moderate", "hard"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=4, help="runs of each tree, alternating (default 4)")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "spots_against_tree"),
                   help="the rendered set and the other tree's numba cache")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    Path(args.cache).mkdir(parents=True, exist_ok=True)
    if args.worker:
        worker(args)
        return
    if not args.other_tree:
        p.error("--other-tree is required")
    other = Path(args.other_tree).resolve()
    trees = {"this tree": (sys.executable, HERE.parent, {}),
             str(other): (args.other_python or str(other / ".venv" / "bin" / "python"), other,
                          {"NUMBA_CACHE_DIR": str(Path(args.cache) / "numba_other"), "PYTHONDONTWRITEBYTECODE": "1"})}
    common = ["--n", str(args.n), "--seed", str(args.seed), "--noise", args.noise, "--threads", str(args.threads),
              "--cache", args.cache]
    runs = {name: [] for name in trees}
    for _ in range(args.repeats):
        for i, (name, (python, cwd, env)) in enumerate(trees.items()):
            out = Path(args.cache) / f"fields_{i}_{args.seed}.npz"
            done = subprocess.run([python, str(HERE / "spots_against_tree.py"), "--worker", "--out", str(out), *common],
                                  cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True, check=True)
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(name, runs[name][-1], flush=True)
    fields = [np.load(Path(args.cache) / f"fields_{i}_{args.seed}.npz") for i in range(2)]
    report = {"set": {"n": args.n, "seed": args.seed, "noise": args.noise, "threads": args.threads},
              **{name: {"patterns_per_s": [r["patterns_per_s"] for r in rs], "cpu_s": [r["cpu_s"] for r in rs],
                        "load_before": [r["load_before"] for r in rs]} for name, rs in runs.items()},
              "differ": differ(*fields)}
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()

#!/bin/bash
PY=/work/main/.venv/bin/python
r() { timeout 400 $PY refine.py "$@" 2>&1 | grep -v Warn; }
for k in 2 3; do r --side 30 --res 3 --method gn --iters 3 --blur 1.75 --topk $k --noise hard; done
r --side 30 --res 4 --method gn --iters 3 --blur 1.75 --topk 3
r --side 30 --res 3 --method gn --iters 3 --blur 1.75 --topk 3 --noise clean,moderate

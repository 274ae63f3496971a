#!/bin/bash
# The sweep behind the report's tables; results in results.jsonl
PY=/work/main/.venv/bin/python
r() { timeout 400 $PY refine.py "$@" 2>&1 | grep -v Warn; }
r --side 30 --res 3 --method none --blur 1.75
r --side 60 --res 3 --method none --blur 1
r --side 30 --res 3 --method gn --iters 2 --blur 1.75
r --side 30 --res 3 --method gn --iters 3 --blur 1.75
r --side 60 --res 3 --method gn --iters 2 --blur 1
r --side 60 --res 3 --method gn --iters 3 --blur 1
r --side 30 --res 4 --method gn --iters 3 --blur 1.75
r --side 30 --res 5 --method gn --iters 3 --blur 1.75
r --side 30 --res 6 --method gn --iters 3 --blur 1.75
r --side 60 --res 5 --method gn --iters 3 --blur 1
r --side 30 --res 3 --method ls --iters 8 --blur 1.75
r --side 30 --res 3 --method ls --iters 14 --blur 1.75
for k in 2 3 5; do r --side 30 --res 3 --method gn --iters 3 --blur 1.75 --topk $k --noise hard; done
r --side 30 --res 5 --method gn --iters 3 --blur 1.75 --topk 3

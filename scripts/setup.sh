#!/usr/bin/env bash
# One-off set-up on a fresh machine: a virtual environment in .venv with liveindex and
# its test tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"

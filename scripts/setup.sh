#!/usr/bin/env bash
# One-off set-up on a fresh machine: a virtual environment in .venv with liveindex, its test
# tools and torch (CPU) for training the network bundle. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned: the CPU build; resolved later through an extra, pip could pull a CUDA one (GBs).
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[test,train,detectors]"
# The live-page test drives Debian's chromium (playwright uses it; it downloads no browser).
# Installed when missing and this user may; without it that one test is skipped, and says so.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "setup: could not install chromium; the live-page browser test will be skipped" >&2
fi

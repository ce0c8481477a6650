#!/bin/sh
# Create (or reuse) .venv and install aioshm with the given extras. Used by demo.sh and test.sh.
set -eu
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$1]"

#!/bin/sh
# Create (or reuse) .venv and install aioshm into it, editable, with the extras given as the
# first argument ("test", "test,ray"); with none, only the runtime dependencies (numpy, anyio).
# Used by demo.sh and test.sh.
set -eu
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
spec=.
if [ -n "${1:-}" ]; then
    spec=".[$1]"
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e "$spec"

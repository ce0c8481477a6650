#!/bin/sh
# The main job: set up .venv with aioshm's runtime dependencies only (numpy, anyio), then run
# the demo (`aioshm demo --help` lists its options). Arguments go to the demo.
set -eu
cd "$(dirname "$0")/.."
sh scripts/setup.sh
exec .venv/bin/python -m aioshm demo "$@"

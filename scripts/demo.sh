#!/bin/sh
# The main job: set up .venv, then run the aioshm demo. Arguments go to the demo.
set -eu
cd "$(dirname "$0")/.."
sh scripts/setup.sh test
exec .venv/bin/python -m aioshm demo "$@"

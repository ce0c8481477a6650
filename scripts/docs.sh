#!/bin/sh
# The documentation site: install the `docs` extra into .venv, then build docs/ and the API
# reference (from the docstrings) with `mkdocs build --strict`, so any warning fails the build.
# Usage: sh scripts/docs.sh [OUTPUT_DIR]   (default: site/, which git ignores)
set -eu
cd "$(dirname "$0")/.."
sh scripts/setup.sh docs
NO_MKDOCS_2_WARNING=1 exec .venv/bin/mkdocs build --strict --site-dir "${1:-site}"

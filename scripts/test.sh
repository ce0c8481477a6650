#!/bin/sh
# The whole test suite: ruff (lint + format), mypy, then pytest. Arguments go to pytest.
# Every stage runs even if an earlier one failed; the exit status is non-zero if any failed.
set -eu
cd "$(dirname "$0")/.."

failed=""
stage() {
    printf '\n========== %s ==========\n' "$1"
}
run() {  # run NAME CMD...: run one stage, remember it if it fails
    name=$1
    shift
    stage "$name"
    if "$@"; then
        echo "-- $name: ok"
    else
        status=$?
        echo "-- $name: FAILED (exit $status)" >&2
        failed="$failed $name"
    fi
}

stage "setup: .venv with aioshm[test]"
sh scripts/setup.sh test

lint_dirs=""
for d in aioshm tests benchmarks examples; do
    if [ -d "$d" ]; then lint_dirs="$lint_dirs $d"; fi
done
# shellcheck disable=SC2086  # lint_dirs is a space-separated list of plain names
run "ruff-check" .venv/bin/ruff check $lint_dirs
run "ruff-format" .venv/bin/ruff format --check aioshm
run "mypy" .venv/bin/mypy

stage "pytest $*"
status=0
.venv/bin/python -m pytest "$@" || status=$?
if [ "$status" -eq 0 ]; then
    echo "-- pytest: ok"
elif [ "$status" -eq 5 ]; then
    echo "-- pytest: FAILED: no tests were collected (exit 5)" >&2
    failed="$failed pytest"
else
    echo "-- pytest: FAILED (exit $status)" >&2
    failed="$failed pytest"
fi

if [ -n "$failed" ]; then
    printf '\ntest.sh: FAILED stages:%s\n' "$failed" >&2
    exit 1
fi
printf '\ntest.sh: all stages passed\n'

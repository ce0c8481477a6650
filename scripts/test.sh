#!/bin/sh
# The whole test suite: ruff (lint + format), mypy, the public API's types (mypy --strict and
# pyright), the docs build, then pytest. Arguments go to pytest.
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
    started=$(date +%s)
    if "$@"; then
        echo "-- $name: ok ($(($(date +%s) - started)) s)"
    else
        status=$?
        echo "-- $name: FAILED (exit $status, $(($(date +%s) - started)) s)" >&2
        failed="$failed $name"
    fi
}

stage "setup: .venv with aioshm[test,ray]"
started=$(date +%s)
sh scripts/setup.sh test,ray
echo "-- setup: ok ($(($(date +%s) - started)) s)"

lint_dirs=""
for d in aioshm tests benchmarks examples; do
    if [ -d "$d" ]; then lint_dirs="$lint_dirs $d"; fi
done
# shellcheck disable=SC2086  # lint_dirs is a space-separated list of plain names
run "ruff-check" .venv/bin/ruff check $lint_dirs
run "ruff-format" .venv/bin/ruff format --check aioshm
run "mypy" .venv/bin/mypy

# What a user's type checker sees of the public API: tests/typing and the README's quickstart,
# checked by mypy --strict and by pyright (files and settings in [tool.pyright] of
# pyproject.toml).
# PYRIGHT_PYTHON_IGNORE_WARNINGS: pyright asks PyPI for a newer version otherwise.
typing_stage() {
    typing_start=$(date +%s)
    typing_status=0
    .venv/bin/mypy --strict tests/typing/test_public_types.py tests/typing/test_pool_types.py \
        examples/quickstart.py ||
        typing_status=1
    PYRIGHT_PYTHON_IGNORE_WARNINGS=1 .venv/bin/pyright || typing_status=1
    echo "typing: $(($(date +%s) - typing_start)) s"
    return "$typing_status"
}
run "typing" typing_stage

# The documentation site and its API reference, built with warnings as errors into a
# temporary directory (scripts/docs.sh installs the docs extra).
docs_out=$(mktemp -d)
run "docs" sh scripts/docs.sh "$docs_out"
rm -rf "$docs_out"

stage "pytest $*"
status=0
started=$(date +%s)
# tests/test_ray.py runs in its own stage below (it also skips itself without AIOSHM_IN_NETNS).
# CPython's own mp suite (tests/test_cpython_suite.py) runs its spawn flavour here, on 3.11,
# and its forkserver flavour in the 3.14 stage: both flavours on both versions would take CI
# to 25 minutes (a run with three of the four, 3.11 forkserver and both on 3.14, took 23.6 min
# on the shared 2-CPU host: 3.11 stages 9.4, 3.14 stage 14.2; the 3.14 build has no PGO, its
# flavours took 234 s and 155 s, 3.11's forkserver 87 s). Sound
# because each version still runs every test of its own suite once; forkserver, whose stdlib
# behaviour changed (the server imports the main script from 3.13.8) and which is the default
# from 3.14, runs where it changed; and aioshm's own tests run spawn, forkserver and fork
# children on both versions (the fork-server main-script tests included).
AIOSHM_CPYTHON_SUITE_METHODS=spawn .venv/bin/python -m pytest --ignore=tests/test_ray.py "$@" || status=$?
if [ "$status" -eq 0 ]; then
    echo "-- pytest: ok ($(($(date +%s) - started)) s)"
elif [ "$status" -eq 5 ]; then
    echo "-- pytest: FAILED: no tests were collected (exit 5)" >&2
    failed="$failed pytest"
else
    echo "-- pytest: FAILED (exit $status, $(($(date +%s) - started)) s)" >&2
    failed="$failed pytest"
fi

# The Ray backend's tests, in a loopback-only network namespace: Ray listens on every
# interface otherwise, and parallel runs would see each other's clusters.
ray_stage() {
    unshare -n sh -c 'ip link set lo up && AIOSHM_IN_NETNS=1 .venv/bin/python -m pytest tests/test_ray.py -q'
}
stage "pytest tests/test_ray.py (Ray backend, in unshare -n)"
if [ "$(id -u)" -ne 0 ]; then
    echo "-- ray: SKIPPED: needs root for 'unshare -n' (not root)"
elif ! command -v unshare >/dev/null 2>&1 || ! command -v ip >/dev/null 2>&1; then
    echo "-- ray: SKIPPED: 'unshare' or 'ip' is missing"
else
    ray_start=$(date +%s)
    if ray_stage; then
        echo "-- ray: ok ($(($(date +%s) - ray_start)) s)"
    else
        status=$?
        echo "-- ray: FAILED (exit $status, $(($(date +%s) - ray_start)) s)" >&2
        failed="$failed ray"
    fi
fi

# The same suite on CPython 3.14 (scripts/py314.sh: the interpreter from shared/toolchains, its
# own .venv-3.14 with aioshm[test], no Ray). Exit 5 (nothing collected) fails it too.
# CPython's mp suite: forkserver flavour only here (see the 3.11 pytest stage).
run "py314-pytest" env AIOSHM_CPYTHON_SUITE_METHODS=forkserver sh scripts/py314.sh \
    --ignore=tests/test_ray.py "$@"

# The clean install: the wheel, with only its declared dependencies, in a fresh venv, runs the
# README's examples and the CLI (scripts/smoke.sh; .venv has the test extra, which hides a
# dependency the package uses but does not declare).
run "smoke" sh scripts/smoke.sh

if [ -n "$failed" ]; then
    printf '\ntest.sh: FAILED stages:%s\n' "$failed" >&2
    exit 1
fi
printf '\ntest.sh: all stages passed\n'

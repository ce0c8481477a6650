#!/bin/sh
# The clean-install check: build the wheel, install it with ONLY its declared dependencies into
# a fresh venv, and run scripts/smoke.py (the README's examples) and the CLI there, outside the
# source tree. Catches a dependency the package uses but does not declare (the test extra's
# trio brings sniffio into .venv, for one). Exit status: non-zero if any step fails.
set -eu
cd "$(dirname "$0")/.."
repo=$(pwd)
python=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/aioshm-smoke.XXXXXX")
trap 'rm -rf "$work"' EXIT
trap 'exit 130' INT TERM  # exit runs the EXIT trap

echo "smoke: fresh venv in $work ($($python --version))"
$python -m venv "$work/venv"
pip="$work/venv/bin/python -m pip --disable-pip-version-check"
$pip wheel -q --no-deps -w "$work/dist" "$repo"
set -- "$work"/dist/aioshm-*.whl
echo "smoke: built $(basename "$1")"
$pip install -q "$1"
echo "smoke: installed: $($pip list --format=freeze 2>/dev/null | grep -v '^pip=' | tr '\n' ' ')"

# Run from an empty directory, so that the source tree cannot shadow the installed package.
mkdir "$work/run"
cd "$work/run"
"$work/venv/bin/python" "$repo/scripts/smoke.py"
"$work/venv/bin/aioshm" --version
"$work/venv/bin/python" -m aioshm info >/dev/null
"$work/venv/bin/aioshm" bench --quick --only transfer >/dev/null
"$work/venv/bin/aioshm" demo --quick >/dev/null
echo "smoke: CLI ok (aioshm --version, info, bench --quick --only transfer, demo --quick)"

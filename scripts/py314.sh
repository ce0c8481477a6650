#!/bin/sh
# The test suite on CPython 3.14, from the relocatable test interpreter in shared/toolchains
# (see its README.md). Run from anywhere; arguments go to pytest.
#
# The archive is looked for in $AIOSHM_TOOLCHAINS, then ../shared/toolchains (where CI lays
# shared/ beside its clone), then /work/shared/toolchains (a developer's worktree). It is
# unpacked once into .cache/cpython-3.14.7 (a stamp file names the archive's sha256), the
# stdlib is byte-compiled once (without that, every spawn/forkserver child compiles it again
# when bytecode writing is off, up to 4x slower), and .venv-3.14 gets aioshm[test].
# Without the archive (a user's machine) the stage is skipped with a message; under CI=true
# (CI lays shared/ beside its clone) a missing archive fails it.
# No ray extra: Ray publishes no wheels for 3.14; tests/test_ray.py skips itself without it.
set -eu
cd "$(dirname "$0")/.."

archive_name=cpython-3.14.7-linux-x86_64.tar.xz
sha256=84fab9fba794a1c98e11ada006c346c3e912c908323dd97715734933f8b54b38
py314=.cache/cpython-3.14.7
venv=.venv-3.14

archive=""
for dir in ${AIOSHM_TOOLCHAINS:+"$AIOSHM_TOOLCHAINS"} ../shared/toolchains /work/shared/toolchains; do
    if [ -f "$dir/$archive_name" ]; then
        archive="$dir/$archive_name"
        break
    fi
done

if [ "$(cat "$py314/.archive-sha256" 2>/dev/null)" != "$sha256" ]; then
    if [ -z "$archive" ]; then
        where="\$AIOSHM_TOOLCHAINS, ../shared/toolchains or /work/shared/toolchains"
        if [ "${CI:-}" = true ]; then  # CI lays shared/ beside its clone: missing is a failure
            echo "py314.sh: $archive_name not found in $where" >&2
            exit 2
        fi
        # a user's fresh machine has no test interpreter: say so, and leave it to CI
        echo "py314.sh: SKIPPED: $archive_name is not in $where (CI runs this stage;" \
            "set AIOSHM_TOOLCHAINS to a folder holding it to run it here)"
        exit 0
    fi
    echo "$sha256  $archive" | sha256sum -c --quiet -
    rm -rf "$py314" "$py314.part"
    mkdir -p "$py314.part"
    tar -xJf "$archive" -C "$py314.part"
    mv "$py314.part/cpython-3.14.7" "$py314"
    rmdir "$py314.part"
    "$py314/bin/python3.14" -m compileall -q -j0 "$py314/lib/python3.14" >/dev/null
    echo "$sha256" >"$py314/.archive-sha256"
    rm -rf "$venv"
fi
[ -x "$venv/bin/python" ] || "$py314/bin/python3.14" -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]"
"$venv/bin/python" -c 'import sys; print("py314.sh:", sys.version.split()[0], sys.executable)'
exec "$venv/bin/python" -m pytest "$@"

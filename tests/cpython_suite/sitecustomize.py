"""Re-apply the ``multiprocessing`` alias in every fresh interpreter of a CPython-suite run.

Only active when ``AIOSHM_MP_DROPIN`` is set (the harness sets it; ``PYTHONPATH`` points here).
Spawn children, the forkserver and the resource tracker start from a clean interpreter that
runs ``from multiprocessing.spawn import spawn_main`` (or similar); this file makes that
``multiprocessing`` the drop-in as well.

A failure here must not be silent: ``site`` would only print one line and go on with the plain
stdlib, and the run would quietly test the wrong module. So the traceback is printed and the
interpreter exits with status 3.
"""

from __future__ import annotations

import os

if os.environ.get("AIOSHM_MP_DROPIN"):
    import sys

    # The suite checks the drop-in as installed without extras. With the optional cloudpickle
    # extra, aioshm sends lambdas by value, so test_unpickleable_result's lambda result would
    # no longer be a MaybeEncodingError: a documented extension (see DESELECTED.md).
    sys.modules.setdefault("cloudpickle", None)
    try:
        import mp_alias
    except BaseException:  # any failure must stop this child loudly
        import sys
        import traceback

        traceback.print_exc()
        sys.stderr.write(
            "sitecustomize: could not alias multiprocessing to "
            f"{os.environ['AIOSHM_MP_DROPIN']!r}; exiting\n"
        )
        sys.stderr.flush()
        os._exit(3)

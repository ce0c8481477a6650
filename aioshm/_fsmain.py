"""Fork-server preload: import the parent's ``__main__`` once in the server (anyio-free).

CPython before 3.13 never preloads ``__main__`` in the fork server, although it means to
(``ForkServer.ensure_running`` looks for a ``main_path`` key that ``get_preparation_data`` calls
``init_main_from_path``; gh-126631). Every forkserver child then re-runs the main script and
re-imports what it imports (numpy: ~50 ms). aioshm puts this module in the preload list and
passes the path in ``AIOSHM_FORKSERVER_MAIN``; children whose ``__main__`` already has that
``__file__`` skip the re-run.
"""

from __future__ import annotations

import contextlib
import os
from multiprocessing import process, spawn

_path = os.environ.get("AIOSHM_FORKSERVER_MAIN")
if _path and os.path.isfile(_path):
    current = process.current_process()
    current._inheriting = True  # type: ignore[attr-defined]
    try:
        # a main script that fails to import must not take the fork server down
        with contextlib.suppress(Exception):
            spawn.import_main_path(_path)
    finally:
        current._inheriting = False  # type: ignore[attr-defined]

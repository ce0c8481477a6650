"""Fork-server preload: import the parent's ``__main__`` once in the server (anyio-free).

CPython before 3.13.8 never imports ``__main__`` in the fork server, although it means to
(``ForkServer.ensure_running`` looked for a ``main_path`` key where ``get_preparation_data``
says ``init_main_from_path``; gh-126631), and ignores the ``sys.path`` it hands over. Every
forkserver child then re-runs the main script and re-imports what it imports (numpy: ~50 ms).
CPython 3.13.8 and 3.14 import it, but unguarded: a main script that raises on import kills the
server, and every later start fails with a connection error.

aioshm puts this module in the preload list and :func:`aioshm._procutil.ensure_forkserver`
passes the path (with the parent's ``sys.path`` and ``sys.argv``) in
``AIOSHM_FORKSERVER_MAIN``; where the stdlib imports the script itself
(:func:`aioshm._procutil.stdlib_forkserver_imports_main`), that launch leaves ``__main__`` out
of the preload list, so the import here, which catches the script's failures, is the only one.
Children whose ``__main__`` already has that ``__file__`` skip the re-run. The variable is
removed from the server's environment, so no child inherits it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from multiprocessing import process

from ._procutil import FORKSERVER_MAIN_ENV, stdlib_spawn

_main = json.loads(os.environ.pop(FORKSERVER_MAIN_ENV, "{}"))
if _main and os.path.isfile(_main["path"]):
    sys.path[:] = _main["sys_path"]  # what a child's prepare() sets before it runs the script
    sys.argv[:] = _main["argv"]
    current = process.current_process()
    current._inheriting = True  # type: ignore[attr-defined]
    try:
        # a main script that fails to import (or exits: argparse at its top level) must not
        # take the fork server down; its children then re-run it, as the stdlib's do
        with contextlib.suppress(Exception, SystemExit):
            stdlib_spawn().import_main_path(_main["path"])
    finally:
        current._inheriting = False  # type: ignore[attr-defined]

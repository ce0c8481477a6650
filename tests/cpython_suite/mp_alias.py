"""Make ``import multiprocessing`` resolve to a drop-in module (normally ``aioshm.multiprocessing``).

Used only by the CPython-suite harness (``tests/test_cpython_suite.py``). Importing this module
installs the alias when the environment variable :data:`ENV_VAR` names a drop-in; with the
variable unset it does nothing, so the same harness runs the plain stdlib as a control.
``sitecustomize.py`` next to this file imports it in every fresh interpreter (spawn children,
the forkserver, the resource tracker), so children see the same alias as the parent.

The three traps (see the project's reliability notes, section 1.2) and how they are handled:

1. Stdlib code does lazy relative imports (``from .popen_spawn_posix import Popen``) that
   would resolve through the aliased module. Every stdlib submodule is therefore imported
   *before* the alias is installed and stays in ``sys.modules`` under its ``multiprocessing.X``
   name.
2. Stdlib code does ``from . import resource_sharer``, i.e. an attribute lookup on the aliased
   module. Every stdlib submodule the drop-in does not define is set as an attribute of the
   drop-in.
3. Fresh interpreters must re-apply the alias: done by ``sitecustomize.py``.

``sys.modules["multiprocessing.X"]`` is re-pointed only where the drop-in provides its *own*
module object for ``X``. The drop-in may be a plain module without ``__path__``; it then gets
an empty ``__path__`` plus a meta-path finder that serves ``import multiprocessing.X`` (for a
submodule not imported yet) from the stdlib directory. Nothing is changed inside ``aioshm``'s
source; all of this lives in the harness process only.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import json
import os
import pkgutil
import sys
import types
from collections.abc import Sequence

ENV_VAR = "AIOSHM_MP_DROPIN"
REPORT_ENV_VAR = "AIOSHM_CPYTHON_SUITE_REPORT"
_SKIP = frozenset({"popen_spawn_win32"})

_stdlib: types.ModuleType | None = None
_dropin: types.ModuleType | None = None


class _StdlibSubmoduleFinder(importlib.abc.MetaPathFinder):
    """Find ``multiprocessing.X`` in the stdlib directory while ``multiprocessing`` is aliased."""

    def __init__(self, search_path: Sequence[str]) -> None:
        self._search_path = list(search_path)

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith("multiprocessing.") or fullname.count(".") != 1:
            return None
        return importlib.machinery.PathFinder.find_spec(fullname, self._search_path, target)


def stdlib_submodule_names(stdlib: types.ModuleType) -> list[str]:
    return sorted(
        info.name for info in pkgutil.iter_modules(stdlib.__path__) if info.name not in _SKIP
    )


def install(dropin_name: str) -> types.ModuleType:
    """Alias ``multiprocessing`` to *dropin_name* in this process. Idempotent."""
    global _stdlib, _dropin
    if _dropin is not None:
        if _dropin.__name__ != dropin_name:
            raise RuntimeError(f"multiprocessing already aliased to {_dropin.__name__!r}")
        return _dropin

    current = sys.modules.get("multiprocessing")
    if current is not None and current.__name__ != "multiprocessing":
        raise RuntimeError(f"multiprocessing is already replaced by {current.__name__!r}")
    import multiprocessing as stdlib

    # Trap 1: load the whole stdlib package while relative imports still resolve to it.
    names = stdlib_submodule_names(stdlib)
    subs = {name: importlib.import_module("multiprocessing." + name) for name in names}

    dropin = importlib.import_module(dropin_name)
    if dropin is stdlib:
        raise RuntimeError(f"{dropin_name!r} is the stdlib multiprocessing itself")

    # Trap 2: `from . import X` and `multiprocessing.X` attribute access on the drop-in.
    for name, mod in subs.items():
        if not hasattr(dropin, name):
            setattr(dropin, name, mod)

    sys.modules["multiprocessing"] = dropin

    # Re-point a submodule only where the drop-in has its own module object for it.
    for name, mod in subs.items():
        own = sys.modules.get(f"{dropin_name}.{name}")
        attr = getattr(dropin, name, None)
        if isinstance(attr, types.ModuleType) and attr is not mod:
            own = attr
        if isinstance(own, types.ModuleType) and own is not mod:
            sys.modules["multiprocessing." + name] = own

    # `import multiprocessing.X` for an X that is not loaded yet needs a parent __path__.
    if not hasattr(dropin, "__path__"):
        dropin.__path__ = []  # type: ignore[attr-defined]
        sys.meta_path.insert(0, _StdlibSubmoduleFinder(stdlib.__path__))

    _stdlib, _dropin = stdlib, dropin
    return dropin


def active_name() -> str:
    """Name of the module that ``import multiprocessing`` gives in this process."""
    return sys.modules["multiprocessing"].__name__


def expected_name() -> str:
    return os.environ.get(ENV_VAR) or "multiprocessing"


def write_report(key: str) -> None:
    """Record which module ``multiprocessing`` is here, for the outer test to check."""
    path = os.environ.get(REPORT_ENV_VAR)
    if not path:
        return
    line = json.dumps({"who": key, "pid": os.getpid(), "multiprocessing": active_name()})
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def child_probe(start_method: str) -> None:
    """Target for a child process: report and exit 0 only if the alias holds there too."""
    write_report(f"child:{start_method}")
    sys.exit(0 if active_name() == expected_name() else 17)


if os.environ.get(ENV_VAR):
    install(os.environ[ENV_VAR])

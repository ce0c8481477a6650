"""``import aioshm.multiprocessing as mp``: a drop-in for :mod:`multiprocessing`.

Everything of the stdlib module is here (``__all__`` is a superset of the stdlib's), with
aioshm's reducers active so ndarrays in shared memory travel as handles, plus torch's extras:
``spawn``, ``start_processes``, ``ProcessContext``, ``ProcessRaisedException``,
``ProcessExitedException``, ``ENV_VAR_PARALLEL_START``, the sharing-strategy functions and
``_set_thread_name``/``_get_thread_name``.

``Queue``, ``JoinableQueue``, ``SimpleQueue``, ``Pipe`` and ``Pool`` (module-level and on every
context from ``get_context``) build aioshm's own objects: the stdlib blocking API and
semantics, carrying shared-memory fds in-band, with no feeder or resource-sharer thread.
Start-method state is shared with the stdlib module, so the default start method is the
stdlib's: on Linux ``fork`` up to Python 3.13, ``forkserver`` from 3.14. This module never
imports anyio.

The stdlib package's submodules are attributes here too (``mp.reduction.ForkingPickler``,
``mp.connection.wait``, ``mp.shared_memory.SharedMemory``…), imported on first use: they are
the stdlib's own modules, with aioshm's reducers registered in ``mp.reduction``. The one
exception is ``spawn``, which is torch's ``spawn`` function here, as in ``torch.multiprocessing``.
"""

from __future__ import annotations

import importlib as _importlib
import multiprocessing as _stdlib_mp
import pkgutil as _pkgutil
import sys as _sys
from multiprocessing import *
from typing import Any

from . import _procutil, _reduction
from ._connection import Connection
from ._context import default_context as _default_context
from ._exceptions import ProcessException, ProcessExitedException, ProcessRaisedException
from ._shm import get_all_sharing_strategies, get_sharing_strategy, set_sharing_strategy
from ._spawn import ENV_VAR_PARALLEL_START, ProcessContext, spawn, start_processes

_set_thread_name = _procutil._set_thread_name
_get_thread_name = _procutil._get_thread_name
register_after_fork = _procutil.register_after_fork

# Like the stdlib's __init__: module-level names are the default context's bound methods.
globals().update((_name, getattr(_default_context, _name)) for _name in _stdlib_mp.__all__)


#: The stdlib package's submodules, attributes of this module as of ``multiprocessing``.
_SUBMODULES = frozenset(m.name for m in _pkgutil.iter_modules(_stdlib_mp.__path__)) - {
    "spawn",  # torch's function
    *(["popen_spawn_win32"] if _sys.platform != "win32" else []),  # imports msvcrt
}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        try:
            module = _importlib.import_module(f"multiprocessing.{name}")
        except ImportError as exc:  # another platform's module (popen_spawn_win32)
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from exc
        globals()[name] = module
        return module
    if name == "SpawnContext":  # torch's deprecated alias
        import warnings

        warnings.warn("SpawnContext is renamed to ProcessContext", DeprecationWarning, stacklevel=2)
        return ProcessContext
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted((set(globals()) - {"Any", "annotations"}) | _SUBMODULES)


__all__ = [
    *_stdlib_mp.__all__,
    "Connection",
    "ENV_VAR_PARALLEL_START",
    "ProcessContext",
    "ProcessException",
    "ProcessExitedException",
    "ProcessRaisedException",
    "get_all_sharing_strategies",
    "get_sharing_strategy",
    "set_sharing_strategy",
    "spawn",
    "start_processes",
]

_reduction.init_reductions()
_procutil.raise_fd_limit()

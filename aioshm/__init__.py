"""aioshm: multiprocessing for numpy arrays in shared memory, with an awaitable face.

``import aioshm`` is the async-first face: ``await aioshm.spawn(fn, nprocs=4)``, processes,
queues and pipes whose blocking stdlib methods have awaitable ``*_async`` twins, and ndarrays
that cross process boundaries as shared-memory handles. ``import aioshm.multiprocessing as mp``
is the synchronous drop-in for :mod:`multiprocessing`; both hand out the same classes.

Default start method of this face: ``forkserver`` on Linux (numpy and aioshm preloaded in the
server), ``spawn`` elsewhere; ``fork`` only on request.
"""

from __future__ import annotations

import multiprocessing as _stdlib_mp
from types import ModuleType as _ModuleType
from typing import TYPE_CHECKING, Any

from . import _procutil, _reduction
from ._connection import Connection, Pipe
from ._context import DEFAULT_START_METHOD
from ._context import async_contexts as _async_contexts
from ._exceptions import (
    AioshmError,
    BrokenPool,
    FdLimitError,
    InvalidHandle,
    PoolClosed,
    ProcessException,
    ProcessExitedException,
    ProcessRaisedException,
    ProtocolError,
    QueueShutDown,
    RemoteTraceback,
    SharedMemoryError,
    SharedMemoryFull,
    TaskCancelled,
)
from ._queues import JoinableQueue, Queue, SimpleQueue
from ._reduction import get_share_threshold, set_share_threshold
from ._shm import (
    cleanup_orphans,
    empty,
    empty_like,
    full,
    full_like,
    get_all_sharing_strategies,
    get_sharing_strategy,
    is_shared,
    ones,
    ones_like,
    set_pool_limit,
    set_sharing_strategy,
    share,
    zeros,
    zeros_like,
)
from ._shm import trim as trim_pool
from ._version import __version__ as __version__

if TYPE_CHECKING:
    # The names ``__getattr__`` loads on first use, for type checkers. At run time they stay
    # lazy: ``import aioshm`` does not import anyio, and ``aioshm.multiprocessing`` never does.
    import sys

    from ._backend import Backend, LocalBackend, local_backend
    from ._group import AsyncProcessContext, spawn, start_processes
    from ._group import AsyncProcessContext as ProcessContext
    from ._pool._pool import Pool
    from ._pool._results import (
        AsyncResult,
        IMapIterator,
        MapResult,
        PoolStatistics,
        ProgressEvent,
    )
    from ._pool._run_sync import current_default_pool, run_sync
    from ._ray import RayBackend

    # ``aioshm.Process`` is the default start method's class (see ``Process`` below)
    if sys.platform == "linux":
        from ._process import ForkServerProcess as Process
    else:
        from ._process import SpawnProcess as Process

__all__ = (
    "DEFAULT_START_METHOD",
    "AioshmError",
    "AsyncProcessContext",
    "AsyncResult",
    "Backend",
    "BrokenPool",
    "Connection",
    "FdLimitError",
    "IMapIterator",
    "InvalidHandle",
    "JoinableQueue",
    "LocalBackend",
    "MapResult",
    "Pipe",
    "Pool",
    "PoolClosed",
    "PoolStatistics",
    "Process",
    "ProcessContext",
    "ProcessException",
    "ProcessExitedException",
    "ProcessRaisedException",
    "ProgressEvent",
    "ProtocolError",
    "Queue",
    "QueueShutDown",
    "RayBackend",
    "RemoteTraceback",
    "SharedMemoryError",
    "SharedMemoryFull",
    "SimpleQueue",
    "TaskCancelled",
    "cleanup_orphans",
    "current_default_pool",
    "empty",
    "empty_like",
    "full",
    "full_like",
    "get_all_sharing_strategies",
    "get_context",
    "get_share_threshold",
    "get_sharing_strategy",
    "is_shared",
    "local_backend",
    "ones",
    "ones_like",
    "run_sync",
    "set_pool_limit",
    "set_share_threshold",
    "set_sharing_strategy",
    "share",
    "spawn",
    "start_processes",
    "trim_pool",
    "zeros",
    "zeros_like",
)

_LAZY = {
    # the async process-group face imports anyio: load it on first use, so that
    # ``import aioshm.multiprocessing`` and children stay anyio-free
    "AsyncProcessContext": "AsyncProcessContext",
    "ProcessContext": "AsyncProcessContext",
    "spawn": "spawn",
    "start_processes": "start_processes",
}
_LAZY_BACKEND = {
    "Backend": "Backend",
    "LocalBackend": "LocalBackend",
    "local_backend": "local_backend",
}
_LAZY_POOL = {
    "AsyncResult": "_results",
    "IMapIterator": "_results",
    "MapResult": "_results",
    "Pool": "_pool",
    "PoolStatistics": "_results",
    "ProgressEvent": "_results",
    "run_sync": "_run_sync",
    "current_default_pool": "_run_sync",
}


class _RayMissing:
    """``aioshm.RayBackend`` when Ray is not installed: the name exists (``from aioshm import *``
    works), making one raises an ImportError that names the extra."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise ModuleNotFoundError(
            "aioshm.RayBackend needs Ray, which is not installed: pip install 'aioshm[ray]'",
            name="ray",
        )


def _lazy_attribute(name: str) -> Any:
    """``aioshm.NAME`` for the names loaded on first use (the module's ``__getattr__``)."""
    if name in _LAZY:
        from . import _group

        value = getattr(_group, _LAZY[name])
        globals()[name] = value
        return value
    if name in _LAZY_BACKEND:
        from . import _backend

        value = getattr(_backend, _LAZY_BACKEND[name])
        globals()[name] = value
        return value
    if name == "RayBackend":
        try:
            from ._ray import RayBackend  # type: ignore[import-not-found,import-untyped,unused-ignore]
        except ModuleNotFoundError as exc:
            if exc.name != "ray" and not (exc.name or "").startswith("ray."):
                raise
            return _RayMissing  # not cached: Ray may be installed later in this process
        globals()[name] = RayBackend
        return RayBackend
    if name in _LAZY_POOL:
        import importlib

        value = getattr(importlib.import_module(f"aioshm._pool.{_LAZY_POOL[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if not TYPE_CHECKING:  # checkers see the imports above, and an unknown name is an error
    __getattr__ = _lazy_attribute


def __dir__() -> list[str]:
    """``dir(aioshm)``: the public API (lazily loaded names included) and the public
    submodules, not the helpers this module imports."""
    names = set(__all__) | {name for name in globals() if name.startswith("__")}
    names.update(
        name
        for name, value in globals().items()
        if isinstance(value, _ModuleType) and not name.startswith("_")
    )
    return sorted(names)


def get_context(method: str | None = None) -> Any:
    """The context for ``method`` (default: :data:`DEFAULT_START_METHOD`).

    Its ``Process``, ``Queue``, ``Pipe``, ``Pool``… build aioshm objects with awaitable twins.
    """
    try:
        return _async_contexts[method or DEFAULT_START_METHOD]
    except KeyError:
        raise ValueError(f"cannot find context for {method!r}") from None


if not TYPE_CHECKING:
    #: ``aioshm.Process(target=f, args=…)``: a process of the async face's default start
    #: method (``Process[R]``: ``await p`` gives the target's return value, an ``R``).
    Process = get_context().Process


def _preload_forkserver() -> None:
    """Let the fork server import numpy and aioshm once, so forked children start warm."""
    from multiprocessing import forkserver

    server = forkserver._forkserver
    if getattr(server, "_forkserver_pid", None) is None:
        modules = [
            "__main__",
            "numpy",
            "aioshm._spawn",
            "aioshm._process",
            "aioshm.multiprocessing",
            "aioshm._fsmain",  # the parent's main script: see _procutil.ensure_forkserver
        ]
        current = list(getattr(server, "_preload_modules", ["__main__"]))
        _stdlib_mp.set_forkserver_preload(current + [m for m in modules if m not in current])


if DEFAULT_START_METHOD == "forkserver":
    _preload_forkserver()
_reduction.init_reductions()
_procutil.raise_fd_limit()

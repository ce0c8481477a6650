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
from typing import Any

from . import _procutil, _reduction
from ._connection import Connection, Pipe
from ._context import DEFAULT_START_METHOD
from ._context import concrete_contexts as _concrete_contexts
from ._exceptions import (
    AioshmError,
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

__all__ = (
    "DEFAULT_START_METHOD",
    "AioshmError",
    "AsyncProcessContext",
    "AsyncResult",
    "Backend",
    "Connection",
    "FdLimitError",
    "InvalidHandle",
    "JoinableQueue",
    "LocalBackend",
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
    "AsyncResult": "AsyncResult",
    "Pool": "Pool",
    "PoolStatistics": "PoolStatistics",
    "ProgressEvent": "ProgressEvent",
    "run_sync": "run_sync",
    "current_default_pool": "current_default_pool",
}


class _RayMissing:
    """``aioshm.RayBackend`` when Ray is not installed: the name exists (``from aioshm import *``
    works), making one raises an ImportError that names the extra."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise ModuleNotFoundError(
            "aioshm.RayBackend needs Ray, which is not installed: pip install 'aioshm[ray]'",
            name="ray",
        )


def __getattr__(name: str) -> Any:
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
        from . import _apool

        value = getattr(_apool, _LAZY_POOL[name])
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_context(method: str | None = None) -> Any:
    """The context for ``method`` (default: :data:`DEFAULT_START_METHOD`).

    Its ``Process``, ``Queue``, ``Pipe``, ``Pool``… build aioshm objects with awaitable twins.
    """
    return _concrete_contexts[method or DEFAULT_START_METHOD]


#: ``aioshm.Process(target=f, args=…)``: a process of the async face's default start method.
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

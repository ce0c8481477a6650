"""``aioshm.run_sync``: one call in a worker of the event loop's default pool (made on first
use, its workers started on demand, retired after :data:`WORKER_MAX_IDLE_TIME` idle, and
stopped when the loop ends).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar, TypeVarTuple

import anyio
import anyio.lowlevel

from .._backend import resolve
from ._pool import WORKER_MAX_IDLE_TIME, Pool

if TYPE_CHECKING:
    from .._backend import Backend

R = TypeVar("R")
Ts = TypeVarTuple("Ts")

__all__ = ("current_default_limiter", "current_default_pool", "run_sync")

# --------------------------------------------------------------------------- run_sync

_default_pool: anyio.lowlevel.RunVar[Pool] = anyio.lowlevel.RunVar("aioshm_default_pool")
_default_limiter: anyio.lowlevel.RunVar[anyio.CapacityLimiter] = anyio.lowlevel.RunVar(
    "aioshm_default_limiter"
)


def _kill_at_loop_end(pool: Pool) -> None:
    """Stop ``pool``'s workers when the event loop ends (anyio.to_process does the same)."""
    from .._transport._waits import current_async_library

    if current_async_library() == "trio":
        import trio

        async def guard_trio() -> None:
            try:
                await trio.sleep_forever()
            finally:
                pool._shutdown_now()

        trio.lowlevel.spawn_system_task(guard_trio)
    else:
        import asyncio

        async def guard_asyncio() -> None:
            try:
                await asyncio.sleep(math.inf)
            finally:
                pool._shutdown_now()

        # asyncio.run / anyio.run cancel the tasks left at the end of the loop
        pool._guard = asyncio.get_running_loop().create_task(guard_asyncio())


def current_default_pool() -> Pool:
    """The pool ``run_sync`` uses in this event loop (made on first use)."""
    try:
        return _default_pool.get()
    except LookupError:
        pool = Pool(os.cpu_count() or 1, _lazy=True)
        _default_pool.set(pool)
        _kill_at_loop_end(pool)
        return pool


def current_default_limiter() -> anyio.CapacityLimiter:
    """``run_sync``'s default capacity limiter: ``os.cpu_count()`` calls at once."""
    try:
        return _default_limiter.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(os.cpu_count() or 1)
        _default_limiter.set(limiter)
        return limiter


async def run_sync(  # type: ignore[return]  # (a CancelScope could swallow, mypy thinks)
    func: Callable[[*Ts], R],
    *args: *Ts,
    cancellable: bool = False,
    limiter: anyio.CapacityLimiter | None = None,
    backend: Backend | None = None,
) -> R:
    """Run ``func(*args)`` in a worker process of the loop's default pool and return its value.

    ``anyio.to_process.run_sync`` semantics: at most ``limiter`` calls at once (default: CPU
    count), workers reused and retired after 5 minutes idle, keyword arguments through
    :func:`functools.partial`; arrays travel as shared-memory handles both ways. With
    ``cancellable=False`` (the default) the call is shielded from cancellation until it
    finishes; with ``True``, cancelling kills the worker running it. ``backend`` runs the
    call elsewhere (e.g. an :class:`aioshm.RayBackend`).
    """
    engine = resolve(backend)
    if engine is not None:
        return await engine.run_sync(func, *args, cancellable=cancellable, limiter=limiter)  # type: ignore[no-any-return]
    pool = current_default_pool()
    _retire_idle(pool)
    async with limiter or current_default_limiter():
        result = pool.apply_async(func, args, cancellable=cancellable)
        if cancellable:
            return await result
        with anyio.CancelScope(shield=True):
            return await result


def _retire_idle(pool: Pool) -> None:
    cutoff = time.monotonic() - WORKER_MAX_IDLE_TIME
    with pool._mutex:
        for worker in pool._sched.idle_since_before(cutoff):
            pool._send_exit(worker)

"""The engine-neutral backend interface behind aioshm's public calls.

A backend runs the work that ``aioshm.spawn``, ``aioshm.Pool``, ``aioshm.run_sync`` and
``aioshm.Queue`` describe. The local process backend (:class:`LocalBackend`, the default) uses
aioshm's own processes, pools and queues; :class:`aioshm.RayBackend` runs the same calls on a
Ray cluster. A Dask backend would implement the same five methods; the public API does not
change::

    class Backend(Protocol):
        async def start(self) -> None                      # connect / start a cluster
        async def aclose(self) -> None                     # shut down what start() started
        def spawn(fn, args, nprocs, *, daemon, start_method) -> awaitable context
        def Pool(processes, initializer, initargs, maxtasksperchild) -> pool
        async def run_sync(fn, *args, cancellable, limiter) -> Any
        def Queue(maxsize) -> queue: put/get, put_async/get_async, shutdown, async for
        def JoinableQueue(maxsize) -> the same plus task_done, join, join_async  (optional)
        async def put_array(a) -> handle;  async def get_array(handle) -> ndarray

Every public call takes ``backend=None`` (the local backend) or a backend object, resolved once
by :func:`resolve`: ``None`` for the local backend, else the backend itself. A backend that
lacks what was asked for (say, a ``JoinableQueue``) raises ``NotImplementedError`` naming it,
never hands out something else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, Self, runtime_checkable

__all__ = ("Backend", "LocalBackend", "engine_queue", "local_backend", "resolve")


@runtime_checkable
class Backend(Protocol):
    """What a backend provides (see the module docstring)."""

    name: str

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    def spawn(
        self,
        fn: Callable[..., object],
        args: Sequence[object],
        nprocs: int,
        *,
        daemon: bool = False,
        start_method: str | None = None,
    ) -> Any: ...

    def Pool(
        self,
        processes: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: Sequence[object] = (),
        maxtasksperchild: int | None = None,
    ) -> Any: ...

    async def run_sync(
        self, fn: Callable[..., Any], *args: Any, cancellable: bool = False, limiter: Any = None
    ) -> Any: ...

    def Queue(self, maxsize: int = 0) -> Any: ...

    async def put_array(self, a: Any) -> Any: ...

    async def get_array(self, handle: Any) -> Any: ...


def resolve(backend: object) -> Backend | None:
    """``None`` for the local backend (``None`` or a :class:`LocalBackend`), else ``backend``,
    checked once to be a :class:`Backend`."""
    if backend is None or isinstance(backend, LocalBackend):
        return None
    if not isinstance(backend, Backend):
        raise TypeError(
            f"backend must be None, aioshm.local_backend or a backend such as "
            f"aioshm.RayBackend(...), got {backend!r}"
        )
    return backend


def engine_queue(backend: object, maxsize: int, *, joinable: bool) -> Any:
    """The queue ``aioshm.Queue(maxsize, backend=backend)`` (or ``JoinableQueue``) stands for
    on another engine, or ``None`` when ``backend`` is the local one."""
    engine = resolve(backend)
    if engine is None:
        return None
    kind = "JoinableQueue" if joinable else "Queue"
    factory = getattr(engine, kind, None)
    if factory is None:
        raise NotImplementedError(f"the {engine.name!r} backend has no {kind}")
    return factory(maxsize)


class LocalBackend:
    """The default backend: aioshm's own processes, pools and queues on this machine."""

    name = "local"

    async def start(self) -> None:
        """Nothing to start: processes start with the work."""

    async def aclose(self) -> None:
        """Nothing to stop: each pool and context cleans up after itself."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def spawn(
        self,
        fn: Callable[..., object],
        args: Sequence[object],
        nprocs: int,
        *,
        daemon: bool = False,
        start_method: str | None = None,
    ) -> Any:
        from ._group import start_processes

        return start_processes(fn, tuple(args), nprocs, daemon=daemon, start_method=start_method)

    def Pool(
        self,
        processes: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: Sequence[object] = (),
        maxtasksperchild: int | None = None,
    ) -> Any:
        from ._pool._pool import Pool

        return Pool(processes, initializer, initargs, maxtasksperchild)

    async def run_sync(
        self, fn: Callable[..., Any], *args: Any, cancellable: bool = False, limiter: Any = None
    ) -> Any:
        from ._pool._run_sync import run_sync

        return await run_sync(fn, *args, cancellable=cancellable, limiter=limiter)

    def Queue(self, maxsize: int = 0) -> Any:
        from ._queues import Queue

        return Queue(maxsize)

    def JoinableQueue(self, maxsize: int = 0) -> Any:
        from ._queues import JoinableQueue

        return JoinableQueue(maxsize)

    async def put_array(self, a: Any) -> Any:
        """A shared copy of ``a`` (the handle is the array itself, writable everywhere)."""
        from ._shm import share

        return share(a)

    async def get_array(self, handle: Any) -> Any:
        return handle


local_backend = LocalBackend()

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
        def Queue(maxsize) -> queue with put/get and put_async/get_async
        async def put_array(a) -> handle;  async def get_array(handle) -> ndarray

Every public call takes ``backend=None`` (the local backend) or a backend object.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, Self, runtime_checkable

__all__ = ("Backend", "LocalBackend", "local_backend")


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
        from ._apool import Pool

        return Pool(processes, initializer, initargs, maxtasksperchild)

    async def run_sync(
        self, fn: Callable[..., Any], *args: Any, cancellable: bool = False, limiter: Any = None
    ) -> Any:
        from ._apool import run_sync

        return await run_sync(fn, *args, cancellable=cancellable, limiter=limiter)

    def Queue(self, maxsize: int = 0) -> Any:
        from ._queues import Queue

        return Queue(maxsize)

    async def put_array(self, a: Any) -> Any:
        """A shared copy of ``a`` (the handle is the array itself, writable everywhere)."""
        from ._shm import share

        return share(a)

    async def get_array(self, handle: Any) -> Any:
        return handle


local_backend = LocalBackend()

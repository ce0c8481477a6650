"""The stdlib ``Pool`` method surface and its awaitable forms, on a pool's ``_submit``.

Shared by :class:`aioshm.Pool` and the Ray backend's pool: a pool provides ``_submit``,
``_forget``, the driving methods and ``_abandon``; everything users call is here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from .._exceptions import (
    BrokenPool,
    TaskCancelled,
)
from ._results import AsyncResult, IMapIterator, MapResult, ProgressEvent, _run_chunk

if TYPE_CHECKING:
    from ._drivers import _Waiter

__all__ = ("PoolAPI",)


_tasks: set[asyncio.Task[None]] = set()


def _keep(task: asyncio.Task[None]) -> None:
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


class PoolAPI:
    """The stdlib ``Pool`` methods and their awaitable forms, on a pool's ``_submit`` (shared by
    :class:`Pool` and the Ray backend's pool)."""

    _processes: int
    #: ``imap``'s default bound on chunks in flight, per process of the pool
    _IMAP_AHEAD = 2

    _state: str  # "RUN", then "CLOSE" or "TERMINATE"
    #: why the pool gave up (see ``Pool._break``), None while it has not
    _broken: object = None

    def __reduce__(self) -> Any:
        raise NotImplementedError("pool objects cannot be passed between processes or pickled")

    def _check_running(self) -> None:
        if self._state != "RUN":
            raise ValueError("Pool not running")
        if self._broken is not None:
            error = self._broken_error()
            assert error is not None
            raise error

    def _broken_error(self) -> BrokenPool | None:
        """A new ``BrokenPool`` for a task if the pool gave up (see :data:`STARTUP_FAILURES`)."""
        return None

    # -- what a pool provides: the results and iterators drive it through these ---------------

    def _submit(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwds: dict[str, Any],
        result: AsyncResult,
        index: int | None,
        cancellable: bool = False,
    ) -> None:
        raise NotImplementedError

    def _forget(self, job: Any) -> None:
        """``job``'s result finished early (e.g. a map's first error): drop it if unsent."""
        raise NotImplementedError

    def _notify(self, waiter: _Waiter) -> None:
        raise NotImplementedError

    def _drive_until(self, done: Callable[[], bool], timeout: float | None) -> None:
        raise NotImplementedError

    async def _drive_until_async(
        self, done: Callable[[], bool], result: AsyncResult | None = None
    ) -> None:
        raise NotImplementedError

    async def _abandon(self, result: AsyncResult) -> None:
        raise NotImplementedError

    # -- asyncio's future protocol of the results (see AsyncResult) ------------------------
    #: results are asyncio Future-like objects (the pool progresses without a Task per result)
    _future_like = False

    def _watch_for(self, result: AsyncResult, loop: asyncio.AbstractEventLoop) -> bool:
        """``result`` got a done callback: make sure the pool progresses until it is ready.
        True if the caller must :meth:`_unwatch` once it is; here a task drives the pool."""
        _keep(loop.create_task(self._drive_for(result)))
        return False

    async def _drive_for(self, result: AsyncResult) -> None:
        await self._drive_until_async(result.ready, result)

    def _unwatch(self) -> None:
        pass

    def _cancel(self, result: AsyncResult) -> None:
        """``result.cancel()``: abandon it as a cancelled await would, then mark it cancelled."""

        async def cancel() -> None:
            await self._abandon(result)
            if not result._ready:  # a task that runs on: its result is discarded
                result._finish(None, TaskCancelled("the result was cancelled"))

        result._cancelled = True
        _keep(result.get_loop().create_task(cancel()))

    def close(self) -> None:
        raise NotImplementedError

    def terminate(self) -> None:
        raise NotImplementedError

    async def join_async(self) -> None:
        raise NotImplementedError

    async def terminate_async(self) -> None:
        raise NotImplementedError

    # -- the stdlib API -----------------------------------------------------------------------
    def __enter__(self) -> Self:
        self._check_running()
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()  # the stdlib's context manager terminates

    async def __aenter__(self) -> Self:
        self._check_running()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close and join without blocking the loop; terminate on error or cancellation."""
        if exc_type is None:
            self.close()
            try:
                await self.join_async()
            except BaseException:
                await self.terminate_async()
                raise
        else:
            await self.terminate_async()

    def apply_async(
        self,
        func: Callable[..., Any],
        args: Iterable[Any] = (),
        kwds: dict[str, Any] | None = None,
        callback: Callable[[Any], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
        *,
        cancellable: bool = False,
    ) -> AsyncResult:
        """Submit ``func(*args, **kwds)``; ``await`` the result or call ``.get()``.

        :param cancellable: if True, cancelling the task that awaits the result stops the
            task: the worker running it is killed (terminate, grace period, kill) and
            replaced (on Ray: the task is force-cancelled). Otherwise cancelling the await
            leaves the task running and drops its result.
        """
        self._check_running()
        result = AsyncResult(self, callback, error_callback)
        self._submit(func, tuple(args), dict(kwds or {}), result, None, cancellable)
        return result

    def apply(
        self, func: Callable[..., Any], args: Iterable[Any] = (), kwds: dict[str, Any] | None = None
    ) -> Any:
        """Blocking ``func(*args, **kwds)`` in a worker."""
        return self.apply_async(func, args, kwds).get()

    def _map_async(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Any],
        chunksize: int | None,
        callback: Callable[[Any], object] | None,
        error_callback: Callable[[BaseException], object] | None,
        star: bool,
        on_progress: Callable[[ProgressEvent], object] | None,
    ) -> MapResult:
        self._check_running()
        items = list(iterable)
        if chunksize is None:
            chunksize, extra = divmod(len(items), self._processes * 4)
            if extra:
                chunksize += 1
        chunksize = max(1, chunksize)
        chunks = [items[i : i + chunksize] for i in range(0, len(items), chunksize)]
        result = MapResult(self, len(chunks), len(items), callback, error_callback, on_progress)
        for index, chunk in enumerate(chunks):
            self._submit(_run_chunk, (func, chunk, star), {}, result, index)
        return result

    def map_async(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Any],
        chunksize: int | None = None,
        callback: Callable[[Any], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
        *,
        on_progress: Callable[[ProgressEvent], object] | None = None,
    ) -> MapResult:
        """``map`` that returns an awaitable :class:`MapResult` (with ``progress()`` events)."""
        return self._map_async(
            func, iterable, chunksize, callback, error_callback, False, on_progress
        )

    def starmap_async(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        callback: Callable[[Any], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
        *,
        on_progress: Callable[[ProgressEvent], object] | None = None,
    ) -> MapResult:
        """``starmap`` that returns an awaitable :class:`MapResult`."""
        return self._map_async(
            func, iterable, chunksize, callback, error_callback, True, on_progress
        )

    def map(
        self, func: Callable[..., Any], iterable: Iterable[Any], chunksize: int | None = None
    ) -> list[Any]:
        """Blocking ``[func(x) for x in iterable]`` across the workers."""
        return self.map_async(func, iterable, chunksize).get()  # type: ignore[no-any-return]

    def starmap(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
    ) -> list[Any]:
        """Blocking ``[func(*args) for args in iterable]`` across the workers."""
        return self.starmap_async(func, iterable, chunksize).get()  # type: ignore[no-any-return]

    def imap(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Any],
        chunksize: int = 1,
        *,
        max_inflight: int | None = None,
    ) -> IMapIterator:
        """Lazy ordered results; ``for``/``async for``; at most ``max_inflight`` chunks ahead."""
        return self._imap(func, iterable, chunksize, True, max_inflight)

    def imap_unordered(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Any],
        chunksize: int = 1,
        *,
        max_inflight: int | None = None,
    ) -> IMapIterator:
        """Like :meth:`imap`, in completion order."""
        return self._imap(func, iterable, chunksize, False, max_inflight)

    def _imap(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Any],
        chunksize: int,
        ordered: bool,
        max_inflight: int | None,
    ) -> IMapIterator:
        self._check_running()
        ahead = max_inflight or self._IMAP_AHEAD * self._processes
        return IMapIterator(self, func, iterable, max(1, chunksize), ordered, False, ahead)

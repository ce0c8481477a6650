"""The stdlib ``Pool`` method surface and its awaitable forms, on a pool's ``_submit``.

Shared by :class:`aioshm.Pool` and the Ray backend's pool: a pool provides ``_submit``,
``_forget``, the driving methods and ``_abandon``; everything users call is here.

Typing: every result is typed by the function's return type (``AsyncResult[R]``,
``MapResult[R]`` awaiting to ``list[R]``, ``IMapIterator[R]``). ``apply_async(f, args)`` checks
``args`` against ``f``'s positional parameters with a ``TypeVarTuple`` (``Callable[[*Ts], R]``,
``args: tuple[*Ts]``): ``args`` arrives as one tuple object, and a ``ParamSpec``'s ``P.args``
can only annotate a ``*args`` parameter. No PEP types a ``kwds`` dict against keyword
parameters, so with ``kwds`` the overload checks only the return type (as typeshed does for the
stdlib pool), and likewise for ``args`` given as a list or for ``starmap``'s argument tuples.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar, TypeVarTuple, overload

from .._exceptions import (
    BrokenPool,
    TaskCancelled,
)
from ._results import AsyncResult, IMapIterator, MapResult, ProgressEvent, _run_chunk

if TYPE_CHECKING:
    from ._drivers import _Waiter

__all__ = ("PoolAPI",)

R = TypeVar("R")  # what the function returns
S = TypeVar("S")  # what ``map`` passes it
Ts = TypeVarTuple("Ts")  # its positional parameters (``apply_async``'s ``args``)


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
        result: AsyncResult[Any],
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
        self, done: Callable[[], bool], result: AsyncResult[Any] | None = None
    ) -> None:
        raise NotImplementedError

    async def _abandon(self, result: AsyncResult[Any]) -> None:
        raise NotImplementedError

    # -- asyncio's future protocol of the results (see AsyncResult) ------------------------
    #: results are asyncio Future-like objects (the pool progresses without a Task per result)
    _future_like = False

    def _watch_for(self, result: AsyncResult[Any], loop: asyncio.AbstractEventLoop) -> bool:
        """``result`` got a done callback: make sure the pool progresses until it is ready.
        True if the caller must :meth:`_unwatch` once it is; here a task drives the pool."""
        _keep(loop.create_task(self._drive_for(result)))
        return False

    async def _drive_for(self, result: AsyncResult[Any]) -> None:
        await self._drive_until_async(result.ready, result)

    def _unwatch(self) -> None:
        pass

    def _cancel(self, result: AsyncResult[Any]) -> None:
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

    def join(self) -> None:
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

    @overload
    def apply_async(
        self,
        func: Callable[[], R],
        args: tuple[()] = ...,
        kwds: None = None,
        callback: Callable[[R], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
        *,
        cancellable: bool = False,
    ) -> AsyncResult[R]: ...
    @overload
    def apply_async(
        self,
        func: Callable[[*Ts], R],
        args: tuple[*Ts],
        kwds: None = None,
        callback: Callable[[R], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
        *,
        cancellable: bool = False,
    ) -> AsyncResult[R]: ...
    @overload
    def apply_async(
        self,
        func: Callable[..., R],
        args: list[Any],
        kwds: Mapping[str, Any] | None = None,
        callback: Callable[[R], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
        *,
        cancellable: bool = False,
    ) -> AsyncResult[R]: ...
    @overload
    def apply_async(
        self,
        func: Callable[..., R],
        args: Iterable[Any],
        kwds: Mapping[str, Any],
        callback: Callable[[R], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
        *,
        cancellable: bool = False,
    ) -> AsyncResult[R]: ...
    @overload
    def apply_async(
        self,
        func: Callable[..., R],
        args: Iterable[Any] = ...,
        *,
        kwds: Mapping[str, Any],
        callback: Callable[[R], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
        cancellable: bool = False,
    ) -> AsyncResult[R]: ...
    def apply_async(
        self,
        func: Callable[..., Any],
        args: Iterable[Any] = (),
        kwds: Mapping[str, Any] | None = None,
        callback: Callable[[Any], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
        *,
        cancellable: bool = False,
    ) -> AsyncResult[Any]:
        """Submit ``func(*args, **kwds)``; ``await`` the result or call ``.get()``.

        Type checkers check a tuple ``args`` against ``func``'s positional parameters (when
        ``kwds`` is not given) and type the result by ``func``'s return type.

        :param cancellable: if True, cancelling the task that awaits the result stops the
            task: the worker running it is killed (terminate, grace period, kill) and
            replaced (on Ray: the task is force-cancelled). Otherwise cancelling the await
            leaves the task running and drops its result.
        """
        self._check_running()
        result: AsyncResult[Any] = AsyncResult(self, callback, error_callback)
        self._submit(func, tuple(args), dict(kwds or {}), result, None, cancellable)
        return result

    @overload
    def apply(self, func: Callable[[], R], args: tuple[()] = ..., kwds: None = None) -> R: ...
    @overload
    def apply(self, func: Callable[[*Ts], R], args: tuple[*Ts], kwds: None = None) -> R: ...
    @overload
    def apply(
        self, func: Callable[..., R], args: list[Any], kwds: Mapping[str, Any] | None = None
    ) -> R: ...
    @overload
    def apply(self, func: Callable[..., R], args: Iterable[Any], kwds: Mapping[str, Any]) -> R: ...
    @overload
    def apply(
        self, func: Callable[..., R], args: Iterable[Any] = ..., *, kwds: Mapping[str, Any]
    ) -> R: ...
    def apply(
        self,
        func: Callable[..., Any],
        args: Iterable[Any] = (),
        kwds: Mapping[str, Any] | None = None,
    ) -> Any:
        """Blocking ``func(*args, **kwds)`` in a worker (typed as :meth:`apply_async`)."""
        return self.apply_async(func, list(args), kwds).get()

    def _map_async(
        self,
        func: Callable[..., R],
        iterable: Iterable[Any],
        chunksize: int | None,
        callback: Callable[[list[R]], object] | None,
        error_callback: Callable[[BaseException], object] | None,
        star: bool,
        on_progress: Callable[[ProgressEvent], object] | None,
    ) -> MapResult[R]:
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
        func: Callable[[S], R],
        iterable: Iterable[S],
        chunksize: int | None = None,
        callback: Callable[[list[R]], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
        *,
        on_progress: Callable[[ProgressEvent], object] | None = None,
    ) -> MapResult[R]:
        """``map`` that returns an awaitable :class:`MapResult` (``await`` gives the list).

        :param on_progress: called with a :class:`ProgressEvent` each time a chunk finishes
            (``done`` of ``total`` items); ``result.progress()`` iterates the same events.
        """
        return self._map_async(
            func, iterable, chunksize, callback, error_callback, False, on_progress
        )

    def starmap_async(
        self,
        func: Callable[..., R],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        callback: Callable[[list[R]], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
        *,
        on_progress: Callable[[ProgressEvent], object] | None = None,
    ) -> MapResult[R]:
        """``starmap`` that returns an awaitable :class:`MapResult` (``await`` gives the list).

        :param on_progress: called with a :class:`ProgressEvent` each time a chunk finishes
            (``done`` of ``total`` items); ``result.progress()`` iterates the same events.
        """
        return self._map_async(
            func, iterable, chunksize, callback, error_callback, True, on_progress
        )

    def map(
        self,
        func: Callable[[S], R],
        iterable: Iterable[S],
        chunksize: int | None = None,
        *,
        on_progress: Callable[[ProgressEvent], object] | None = None,
    ) -> list[R]:
        """Blocking ``[func(x) for x in iterable]`` across the workers.

        :param on_progress: called with a :class:`ProgressEvent` each time a chunk finishes
            (``done`` of ``total`` items), from this call while it blocks.
        """
        return self.map_async(func, iterable, chunksize, on_progress=on_progress).get()

    def starmap(
        self,
        func: Callable[..., R],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        *,
        on_progress: Callable[[ProgressEvent], object] | None = None,
    ) -> list[R]:
        """Blocking ``[func(*args) for args in iterable]`` across the workers.

        :param on_progress: called with a :class:`ProgressEvent` each time a chunk finishes
            (``done`` of ``total`` items), from this call while it blocks.
        """
        return self.starmap_async(func, iterable, chunksize, on_progress=on_progress).get()

    def imap(
        self,
        func: Callable[[S], R],
        iterable: Iterable[S],
        chunksize: int = 1,
        *,
        max_inflight: int | None = None,
        on_progress: Callable[[ProgressEvent], object] | None = None,
    ) -> IMapIterator[R]:
        """Lazy ordered results; ``for``/``async for``; at most ``max_inflight`` chunks ahead.

        :param on_progress: called with a :class:`ProgressEvent` each time a chunk finishes in
            a worker (``done`` items so far; ``total`` is ``len(iterable)``, or ``None`` for an
            iterable without a length until it is exhausted), while the iteration drives the
            pool, sync or async.
        """
        return self._imap(func, iterable, chunksize, True, max_inflight, on_progress)

    def imap_unordered(
        self,
        func: Callable[[S], R],
        iterable: Iterable[S],
        chunksize: int = 1,
        *,
        max_inflight: int | None = None,
        on_progress: Callable[[ProgressEvent], object] | None = None,
    ) -> IMapIterator[R]:
        """Like :meth:`imap`, in completion order (``on_progress`` as for :meth:`imap`)."""
        return self._imap(func, iterable, chunksize, False, max_inflight, on_progress)

    def _imap(
        self,
        func: Callable[..., R],
        iterable: Iterable[Any],
        chunksize: int,
        ordered: bool,
        max_inflight: int | None,
        on_progress: Callable[[ProgressEvent], object] | None,
    ) -> IMapIterator[R]:
        self._check_running()
        ahead = max_inflight or self._IMAP_AHEAD * self._processes
        return IMapIterator(
            self, func, iterable, max(1, chunksize), ordered, False, ahead, on_progress
        )

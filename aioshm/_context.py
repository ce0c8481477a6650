"""Start-method contexts whose queues, pipes and pools are aioshm's (anyio-free).

Each stdlib concrete context (fork, spawn, forkserver) gets a subclass whose ``Queue``,
``JoinableQueue``, ``SimpleQueue``, ``Pipe`` and ``Pool`` build aioshm objects; everything
else (``Process``, locks, managers, start-method state) is the stdlib's own, so
``aioshm.multiprocessing.set_start_method`` and ``multiprocessing.set_start_method`` are one
setting.
"""

from __future__ import annotations

import sys
from multiprocessing import context as _mp_context
from typing import Any, cast

from . import _process
from ._connection import Connection
from ._connection import Pipe as _Pipe

__all__ = (
    "DEFAULT_START_METHOD",
    "DefaultContext",
    "async_contexts",
    "concrete_contexts",
    "default_context",
)

#: The async face's default start method: forking a process that runs an event loop (and
#: threads) is unsafe, and the fork server (with numpy and aioshm preloaded) starts fast.
DEFAULT_START_METHOD = "forkserver" if sys.platform.startswith("linux") else "spawn"


def _pick(contexts: dict[str, Any], method: str) -> Any:
    """``contexts[method]``, checked as the stdlib's ``get_context`` checks it."""
    try:
        ctx = contexts[method]
    except KeyError:
        raise ValueError(f"cannot find context for {method!r}") from None
    ctx._check_available()
    return ctx


class _AioshmMixin:
    """The factory methods aioshm overrides on every context."""

    def get_context(self, method: str | None = None) -> Any:
        return self if method is None else _pick(concrete_contexts, method)

    def Queue(self, maxsize: int = 0) -> Any:
        """A process-shared FIFO queue (aioshm's :class:`~aioshm.Queue`)."""
        from ._queues import Queue

        return Queue(maxsize, ctx=self.get_context())

    def JoinableQueue(self, maxsize: int = 0) -> Any:
        """A queue with ``task_done()``/``join()`` (aioshm's :class:`~aioshm.JoinableQueue`)."""
        from ._queues import JoinableQueue

        return JoinableQueue(maxsize, ctx=self.get_context())

    def SimpleQueue(self) -> Any:
        """A minimal queue (aioshm's :class:`~aioshm.SimpleQueue`)."""
        from ._queues import SimpleQueue

        return SimpleQueue(ctx=self.get_context())

    def Pipe(self, duplex: bool = True) -> tuple[Connection, Connection]:
        """Two connected :class:`~aioshm.Connection` objects (fds travel in-band)."""
        return _Pipe(duplex)

    def Pool(
        self,
        processes: int | None = None,
        initializer: Any = None,
        initargs: tuple[Any, ...] = (),
        maxtasksperchild: int | None = None,
    ) -> Any:
        """A process pool whose tasks and results carry arrays as shared-memory handles."""
        from ._pool._stdlib import Pool

        return Pool(processes, initializer, initargs, maxtasksperchild, context=self.get_context())


class SpawnContext(_AioshmMixin, _mp_context.SpawnContext):
    Process = _process.SpawnProcess


if sys.platform != "win32":

    class ForkContext(_AioshmMixin, _mp_context.ForkContext):
        Process = _process.ForkProcess

    class ForkServerContext(_AioshmMixin, _mp_context.ForkServerContext):
        Process = _process.ForkServerProcess


concrete_contexts: dict[str, Any] = {"spawn": SpawnContext()}
if "fork" in _mp_context._concrete_contexts:
    concrete_contexts["fork"] = ForkContext()
if "forkserver" in _mp_context._concrete_contexts:
    concrete_contexts["forkserver"] = ForkServerContext()


class _AsyncFaceMixin:
    """The async face's contexts (``aioshm.get_context``): the classes of the sync face's,
    except that ``Pool`` builds :class:`aioshm.Pool`, not the stdlib-compatible pool that
    ``aioshm.multiprocessing.get_context(m).Pool`` builds."""

    def get_context(self, method: str | None = None) -> Any:
        return self if method is None else _pick(async_contexts, method)

    def Pool(
        self,
        processes: int | None = None,
        initializer: Any = None,
        initargs: tuple[Any, ...] = (),
        maxtasksperchild: int | None = None,
    ) -> Any:
        """:class:`aioshm.Pool` (awaitable results, no helper threads) on this start method."""
        from ._pool._pool import Pool

        context = cast("_mp_context.BaseContext", self)  # this mixin is one's base
        return Pool(processes, initializer, initargs, maxtasksperchild, context=context)


#: the async face's contexts, one per start method (see _AsyncFaceMixin)
async_contexts: dict[str, Any] = {
    name: type(f"Async{type(ctx).__name__}", (_AsyncFaceMixin, type(ctx)), {})()
    for name, ctx in concrete_contexts.items()
}


class DefaultContext(_AioshmMixin, _mp_context.DefaultContext):
    """The default context: start-method state is the stdlib's, the objects are aioshm's."""

    Process = _process.Process

    def __init__(self) -> None:
        self._stdlib = _mp_context._default_context

    def get_context(self, method: str | None = None) -> Any:
        if method is None:
            return concrete_contexts[self._stdlib.get_context().get_start_method()]
        return super().get_context(method)

    def get_start_method(self, allow_none: bool = False) -> Any:
        return self._stdlib.get_start_method(allow_none)

    def set_start_method(self, method: str | None, force: bool = False) -> None:
        self._stdlib.set_start_method(method, force)

    def get_all_start_methods(self) -> list[str]:
        return self._stdlib.get_all_start_methods()


default_context = DefaultContext()

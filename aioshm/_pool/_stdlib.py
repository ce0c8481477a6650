"""``Pool``: the stdlib ``multiprocessing.Pool`` on aioshm queues (synchronous face).

Tasks and results travel through :class:`~aioshm._queues.SimpleQueue` records, so ndarrays go
as shared-memory handles in both directions. Every worker, replacement workers included (the
stdlib builds those in a static method that bypasses overrides of ``_repopulate_pool``), runs
:func:`_clean_worker`, which drops lingering shared-memory references before each new task.
"""

from __future__ import annotations

import gc
import multiprocessing.pool as _mp_pool
from typing import Any

from .._queues import SimpleQueue
from .._shm import _segment

__all__ = ("Pool",)


class _DroppingInqueue:
    """The worker's view of the task queue: collect shared views left in cycles before ``get``."""

    def __init__(self, inqueue: SimpleQueue) -> None:
        self._inqueue = inqueue
        self._writer = inqueue._writer
        self._reader = inqueue._reader

    def get(self) -> Any:
        if any(seg.has_views() for seg in _segment.live_segments()):
            gc.collect()
        return self._inqueue.get()


def _clean_worker(inqueue: SimpleQueue, outqueue: SimpleQueue, *args: Any) -> None:
    _mp_pool.worker(_DroppingInqueue(inqueue), outqueue, *args)


class Pool(_mp_pool.Pool):
    """``multiprocessing.Pool`` whose tasks and results carry ndarrays as shared-memory handles."""

    @staticmethod
    def Process(ctx: Any, *args: Any, **kwds: Any) -> Any:
        if kwds.get("target") is _mp_pool.worker:
            kwds["target"] = _clean_worker
        return ctx.Process(*args, **kwds)

    def _setup_queues(self) -> None:
        self._inqueue = SimpleQueue(ctx=self._ctx)
        self._outqueue = SimpleQueue(ctx=self._ctx)
        self._quick_put = self._inqueue._writer.send
        self._quick_get = self._outqueue._reader.recv

"""The pool's scheduling rules, pure: no fds, no processes, no event loop, no clock.

:class:`~aioshm._pool._pool.Pool` keeps the jobs and workers and does the I/O; every decision
about them is taken here, on plain values, so it is tested without processes
(``tests/test_scheduler.py``):

* :class:`SendAhead`: how many tasks each worker is sent ahead (its channel's depth), from a
  decaying maximum of recent task times;
* :func:`pick_worker` and :func:`batch_limit`: which ready worker gets the next batch of
  pending tasks, and how many;
* :func:`blame_and_requeue`: when a worker dies, which task (if any) it died running, and
  where the tasks queued behind it go;
* :class:`StartupRule`: the broken-pool rule (:data:`STARTUP_FAILURES` start-up deaths in a
  row and the pool gives up).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Final, TypeVar

__all__ = (
    "AHEAD",
    "DEPTH",
    "MAX_DEPTH",
    "STARTUP_FAILURES",
    "SendAhead",
    "StartupRule",
    "batch_limit",
    "blame_and_requeue",
    "pick_worker",
)

#: Tasks sent ahead to one worker (the first runs, the rest wait in its channel): at least
#: DEPTH, and up to MAX_DEPTH while tasks are short, so that about AHEAD seconds of work wait
#: in each worker's channel. Short tasks then never leave a worker idle waiting for the next
#: one (nor the parent waking it for each), and a task that turns out long holds up at most
#: that much work queued behind it. The task time is a decaying maximum: one long task drops
#: the depth back to DEPTH at once, and it grows again over the next few dozen results.
DEPTH: Final = 2
MAX_DEPTH: Final = 32
AHEAD: Final = 0.002
#: Workers that die at start-up this many times in a row (before any worker reached its task
#: loop) break the pool: every pending and later task fails with ``BrokenPool``.
STARTUP_FAILURES: Final = 3

J = TypeVar("J")


class SendAhead:
    """The send-ahead depth: :data:`DEPTH` .. :data:`MAX_DEPTH` tasks in flight per worker."""

    __slots__ = ("depth", "task_time")

    def __init__(self) -> None:
        self.depth = DEPTH
        self.task_time = AHEAD  # decaying maximum of recent task times (seconds)

    def took(self, seconds: float) -> None:
        """A task took ``seconds`` (from when it was sent, or from the previous result)."""
        task_time = max(seconds, self.task_time * 0.9)
        if task_time != self.task_time:
            self.task_time = task_time
            self.depth = max(DEPTH, min(MAX_DEPTH, int(AHEAD / max(task_time, 1e-6))))


def pick_worker(loads: Sequence[int]) -> int:
    """The index of the ready worker with the fewest tasks in flight (the first of equals)."""
    best = 0
    for i, load in enumerate(loads):
        if load < loads[best]:
            best = i
    return best


def batch_limit(inflight: int, depth: int, budget: int | None, pending: int, ready: int) -> int:
    """How many pending tasks to send a worker with ``inflight`` tasks: up to the depth and
    its ``maxtasksperchild`` budget, leaving the other ``ready`` workers their share."""
    room = depth - inflight
    if budget is not None:
        room = min(room, budget)
    return max(0, min(room, -(-pending // max(1, ready))))


def blame_and_requeue(
    inflight: collections.deque[J],
    taken: int,
    finished: int,
    pending: collections.deque[J],
    dropped: Callable[[J], bool],
) -> tuple[J | None, list[J], list[J]]:
    """A worker died: split the tasks it was sent (``inflight``, oldest first, results read).

    It runs them in order and counts each one it takes on (``taken``) before running it; its
    results were all read (``finished``). So if it took more than it finished, it died
    running the oldest one: that one is blamed. The others never started: they go back to
    the front of ``pending`` in their order, except those ``dropped`` says to drop (their
    awaiter was cancelled). Empties ``inflight``; returns ``(blamed, requeued, dropped)``.
    """
    blamed = inflight.popleft() if inflight and taken > finished else None
    requeued: list[J] = []
    gone: list[J] = []
    for job in reversed(inflight):
        if dropped(job):
            gone.append(job)
        else:
            pending.appendleft(job)
            requeued.append(job)
    inflight.clear()
    requeued.reverse()
    gone.reverse()
    return blamed, requeued, gone


class StartupRule:
    """The broken-pool rule: ``limit`` workers in a row that die before reaching their task
    loop (no worker got through its start-up in between) and the pool gives up."""

    __slots__ = ("deaths", "limit")

    def __init__(self, limit: int = STARTUP_FAILURES) -> None:
        self.limit = limit
        self.deaths = 0

    def got_through(self) -> None:
        """A worker reached its task loop (a result came, or it died after its start-up)."""
        self.deaths = 0

    def died_at_startup(self) -> bool:
        """A worker died at start-up; True if the pool must give up now."""
        self.deaths += 1
        return self.deaths >= self.limit

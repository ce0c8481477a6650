"""Counting threads that a test's code started (for the "no helper thread" tests)."""

from __future__ import annotations

import threading
from collections.abc import Callable


def new_thread_counter() -> Callable[[], int]:
    """A function returning how many threads exist now that did not exist at this call.

    Threads that were there before may end (trio retires idle cached workers on its own).
    Excluded: trio's cache threads still carrying their default name "Trio thread N". anyio's
    pytest plugin runs trio tests in guest mode, whose I/O wait runs on such a thread; it is the
    test runner's, not ours. ``trio.to_thread`` renames the threads it uses ("<fn> from
    <task>"), so a thread our code started through trio would still be counted.
    """
    base = set(threading.enumerate())

    def count() -> int:
        return sum(
            t not in base and not t.name.startswith("Trio thread ") for t in threading.enumerate()
        )

    return count

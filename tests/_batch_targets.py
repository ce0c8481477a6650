"""Importable child targets for ``test_queue_batch.py`` (children import this module by name)."""

from __future__ import annotations

from typing import Any


def explode() -> None:
    """Unpickling a :class:`Bomb` calls this."""
    raise ValueError("this item cannot be unpickled")


class Bomb:
    """Pickles fine; unpickling it raises ValueError."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (explode, ())


def put_many_range(q: Any, start: int, stop: int, batch: int) -> None:
    """Put ``range(start, stop)`` on ``q`` in batches of ``batch`` with ``put_many``."""
    for i in range(start, stop, batch):
        q.put_many(range(i, min(i + batch, stop)))


def get_many_until_none(q: Any, batch: int) -> list[Any]:
    """``get_many(batch)`` until a ``None`` arrives; the items before it, in order. A batch
    may hold another consumer's ``None`` too: it goes back on the queue."""
    out: list[Any] = []
    while True:
        items = q.get_many(batch)
        if None in items:
            out.extend(items[: items.index(None)])
            for _ in range(items.count(None) - 1):
                q.put(None)
            return out
        out.extend(items)


def get_until_none(q: Any) -> list[Any]:
    """Plain ``get()`` until a ``None`` arrives; the items before it, in order."""
    out: list[Any] = []
    while (item := q.get()) is not None:
        out.append(item)
    return out

"""What type checkers see of the pool: checked by ``mypy --strict`` and ``pyright``.

The ``check_*`` functions are the static test (they never run): ``assert_type`` fails a checker
when it infers anything else (``Any`` included), and a line ending in ``# type: ignore[code]``
asserts that both checkers reject it (mypy reports an unused ignore, ``warn_unused_ignores``;
pyright an unnecessary one, ``reportUnnecessaryTypeIgnoreComment``). Run::

    .venv/bin/mypy --strict tests/typing/test_pool_types.py
    .venv/bin/pyright tests/typing/test_pool_types.py

pytest collects only ``test_generic_classes_subscript_at_run_time``.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from typing import Any, assert_type

import anyio

import aioshm
from aioshm import IMapIterator, MapResult
from aioshm._pool._api import PoolAPI

# --------------------------------------------------------------------------- targets


def add(x: int, y: int) -> int:
    return x + y


def square(x: int) -> int:
    return x * x


def shout(text: str, *, times: int = 1) -> str:
    return text.upper() * times


def needs_key(x: int, *, key: str) -> bytes:
    return key.encode() * x


def describe(x: float, label: str = "x") -> str:
    return f"{label}={x}"


def init(seed: int) -> None:
    return None


# --------------------------------------------------------------------------- the pool


def check_pool_construction() -> None:
    """``Pool(...)``'s real parameters (no ``*args, **kwargs``); a local pool is a ``Pool``,
    another engine's pool the shared face."""
    assert_type(aioshm.Pool(), aioshm.Pool)
    assert_type(aioshm.Pool(2), aioshm.Pool)
    pool = aioshm.Pool(
        processes=2,
        initializer=init,
        initargs=(1,),
        maxtasksperchild=10,
        context="spawn",
        backend=aioshm.local_backend,
    )
    assert_type(pool, aioshm.Pool)
    assert_type(aioshm.Pool(2, context=multiprocessing.get_context("spawn")), aioshm.Pool)
    aioshm.Pool("2")  # type: ignore[arg-type]
    aioshm.Pool(2, maxtasksperchild="10")  # type: ignore[arg-type]
    aioshm.Pool(2, context=3)  # type: ignore[arg-type]
    aioshm.Pool(2, nprocs=2)  # type: ignore[call-arg]
    assert_type(pool.statistics(), aioshm.PoolStatistics)
    assert_type(aioshm.current_default_pool(), aioshm.Pool)


def check_another_engine(backend: aioshm.Backend) -> None:
    # pyright follows __new__ (another engine's pool: the face shared with Pool); mypy takes
    # the class for what it builds: both see the shared methods
    pool = aioshm.Pool(2, backend=backend)
    assert_type(pool.apply_async(add, (1, 2)).get(), int)
    assert_type(pool.map(square, [1, 2]), list[int])
    pool.close()
    pool.join()


async def check_apply(pool: aioshm.Pool) -> None:
    """``apply_async``/``apply``: a tuple ``args`` is checked against the function's positional
    parameters (TypeVarTuple); the result is typed by its return type."""
    result = pool.apply_async(add, (1, 2))
    assert_type(result, aioshm.AsyncResult[int])
    assert_type(await result, int)
    assert_type(result.get(), int)
    assert_type(result.get(timeout=1.0), int)
    assert_type(result.ready(), bool)
    assert_type(result.successful(), bool)
    assert_type(pool.apply_async(square, (3,), cancellable=True), aioshm.AsyncResult[int])
    assert_type(await pool.apply_async(describe, (1.5,)), str)
    assert_type(await pool.apply_async(describe, (1.5, "y")), str)
    assert_type(pool.apply(add, (1, 2)), int)
    assert_type(pool.apply(square, args=(2,)), int)

    # callbacks get the value's type
    def on_value(value: int) -> None: ...
    def on_text(value: str) -> None: ...
    def on_error(error: BaseException) -> None: ...

    pool.apply_async(add, (1, 2), None, on_value, on_error)
    pool.apply_async(add, (1, 2), callback=on_value, error_callback=on_error)
    pool.apply_async(add, (1, 2), callback=on_text)  # type: ignore[arg-type, misc]

    # with kwds (no PEP types a dict against keyword parameters) or args as a list, only the
    # return type is checked
    assert_type(await pool.apply_async(shout, ("hi",), {"times": 2}), str)
    assert_type(await pool.apply_async(needs_key, (2,), kwds={"key": "k"}), bytes)
    assert_type(await pool.apply_async(needs_key, kwds={"x": 2, "key": "k"}), bytes)
    assert_type(await pool.apply_async(add, [1, 2]), int)
    assert_type(pool.apply(needs_key, (2,), {"key": "k"}), bytes)
    assert_type(pool.apply(add, [1, 2]), int)

    pool.apply_async(add, (1, "2"))  # type: ignore[arg-type]
    pool.apply_async(add, (1,))  # type: ignore[arg-type]
    pool.apply_async(add, (1, 2, 3))  # type: ignore[arg-type]
    pool.apply_async(add)  # type: ignore[arg-type]
    pool.apply_async(needs_key, (2,))  # type: ignore[arg-type]
    pool.apply(add, ("1", 2))  # type: ignore[arg-type]
    pool.apply_async(add, (1, 2), cancellable="yes")  # type: ignore[call-overload]


async def check_maps(pool: aioshm.Pool) -> None:
    """``map``/``starmap`` and their ``*_async`` forms: lists of the function's values."""
    mapped = pool.map_async(square, range(10))
    assert_type(mapped, MapResult[int])
    assert_type(await mapped, list[int])
    assert_type(mapped.get(), list[int])
    assert_type(await pool.map_async(describe, [1.0, 2.0]), list[str])
    assert_type(pool.map(square, [1, 2]), list[int])
    assert_type(pool.map(square, [1, 2], 1), list[int])
    assert_type(await pool.starmap_async(add, [(1, 2), (3, 4)]), list[int])
    assert_type(pool.starmap(add, [(1, 2)]), list[int])
    assert_type(pool.starmap(describe, [[1.0], [2.0]]), list[str])

    def on_values(values: list[int]) -> None: ...

    pool.map_async(square, [1], callback=on_values)
    pool.starmap_async(add, [(1, 2)], callback=on_values)

    pool.map_async(square, ["x"])  # type: ignore[arg-type]
    pool.map(square, [b"x"])  # type: ignore[arg-type]
    pool.map(add, [1, 2])  # type: ignore[arg-type]
    pool.map_async(describe, [1], callback=on_values)  # type: ignore[misc]


async def check_imap(pool: aioshm.Pool) -> None:
    """``imap``/``imap_unordered``: the function's values, sync and ``async for``."""
    ordered = pool.imap(square, range(3))
    assert_type(ordered, IMapIterator[int])
    for x in ordered:
        assert_type(x, int)
    assert_type(next(pool.imap(square, [1])), int)
    assert_type(pool.imap(square, [1]).next(timeout=1.0), int)
    async for y in pool.imap_unordered(square, range(3)):
        assert_type(y, int)
    async for text in pool.imap(describe, [1.0, 2.0], chunksize=2, max_inflight=4):
        assert_type(text, str)
    assert_type(list(pool.imap_unordered(describe, [1.0])), list[str])
    pool.imap(square, ["x"])  # type: ignore[arg-type]
    pool.imap_unordered(square, [1], max_inflight="4")  # type: ignore[arg-type]


async def check_progress(pool: aioshm.Pool) -> None:
    """``on_progress`` on every operation over many items; ``ProgressEvent``'s fields."""
    events: list[aioshm.ProgressEvent] = []
    pool.map(square, [1], on_progress=events.append)
    pool.starmap(add, [(1, 2)], on_progress=events.append)
    pool.map_async(square, [1], on_progress=events.append)
    pool.starmap_async(add, [(1, 2)], on_progress=events.append)
    pool.imap(square, [1], on_progress=events.append)
    pool.imap_unordered(square, [1], on_progress=events.append)
    async for event in pool.map_async(square, range(3)).progress():
        assert_type(event, aioshm.ProgressEvent)
        assert_type(event.done, int)
        assert_type(event.total, int | None)

    def wrong(done: int) -> None: ...

    pool.imap(square, [1], on_progress=wrong)  # type: ignore[arg-type]


async def check_context_managers() -> None:
    async with aioshm.Pool(2) as pool:
        assert_type(pool, aioshm.Pool)
    with aioshm.Pool(2) as sync_pool:
        assert_type(sync_pool, aioshm.Pool)
    assert_type(await pool.join_async(), None)
    assert_type(await pool.terminate_async(), None)


# --------------------------------------------------------------------------- asyncio's face


async def check_future_like(pool: aioshm.Pool) -> None:
    """On asyncio a result is Future-like: typed as such, and asyncio's helpers keep its type."""
    result = pool.apply_async(add, (1, 2))
    assert_type(result.done(), bool)
    assert_type(result.cancelled(), bool)
    assert_type(result.result(), int)
    assert_type(result.exception(), BaseException | None)
    assert_type(result.cancel(), bool)
    assert_type(result.cancel("why"), bool)
    assert_type(result.get_loop(), asyncio.AbstractEventLoop)

    def done(r: aioshm.AsyncResult[int]) -> None: ...

    result.add_done_callback(done)
    assert_type(result.remove_done_callback(done), int)

    def wrong(r: aioshm.AsyncResult[str]) -> None: ...

    result.add_done_callback(wrong)  # type: ignore[arg-type]

    text = pool.apply_async(shout, ("a",))
    assert_type(await asyncio.gather(result, text), tuple[int, str])
    assert_type(await asyncio.wait_for(result, 1.0), int)
    assert_type(await asyncio.shield(text), str)
    assert_type(await pool.map_async(square, [1]), list[int])


# --------------------------------------------------------------------------- run_sync


async def check_run_sync() -> None:
    """``run_sync(fn, *args)``: args checked against ``fn`` (TypeVarTuple), the value typed."""
    assert_type(await aioshm.run_sync(add, 1, 2), int)
    assert_type(await aioshm.run_sync(square, 3, cancellable=True), int)
    assert_type(await aioshm.run_sync(describe, 1.5), str)
    assert_type(await aioshm.run_sync(describe, 1.5, "y"), str)
    limiter = anyio.CapacityLimiter(2)
    assert_type(await aioshm.run_sync(square, 3, limiter=limiter), int)
    assert_type(await aioshm.run_sync(square, 3, backend=aioshm.local_backend), int)
    await aioshm.run_sync(add, 1, "2")  # type: ignore[arg-type]
    await aioshm.run_sync(add, 1)  # type: ignore[arg-type]
    await aioshm.run_sync(add, 1, 2, 3)  # type: ignore[arg-type]
    await aioshm.run_sync(square, 3, limiter=2)  # type: ignore[arg-type]
    await aioshm.run_sync(needs_key, 2)  # type: ignore[arg-type]


def check_bare_names_mean_any(result: aioshm.AsyncResult, face: PoolAPI) -> None:
    """A bare ``AsyncResult`` annotation is ``AsyncResult[Any]`` (PEP 696 default, so strict
    checkers accept it); the face shared with other engines' pools is typed as ``Pool``."""
    assert_type(result.get(), Any)
    assert_type(face.apply(square, (1,)), int)


# --------------------------------------------------------------------------- at run time


def test_generic_classes_subscript_at_run_time() -> None:
    """The generic pool classes subscript at run time, as checkers let users write."""
    assert aioshm.AsyncResult[int].__origin__ is aioshm.AsyncResult  # type: ignore[attr-defined]
    assert MapResult[str].__origin__ is MapResult  # type: ignore[attr-defined]
    assert IMapIterator[bytes].__origin__ is IMapIterator  # type: ignore[attr-defined]

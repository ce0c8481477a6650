"""What type checkers see of the public API: checked by ``mypy --strict`` and ``pyright``.

The ``check_*`` functions are the static test: ``scripts/test.sh`` (the "typing" stage) runs
both checkers on this file. ``assert_type`` fails the stage when a checker infers anything
else (``Any`` included), and a line ending in ``# type: ignore[code]`` asserts that both
checkers reject it: mypy reports an unused ignore (``warn_unused_ignores``) and pyright an
unnecessary one (``reportUnnecessaryTypeIgnoreComment``).

pytest collects only the ``test_*`` functions: the cheap checks that also run for real (queue
and pipe round trips in this process, the generic classes subscripted at run time). The
typed face of the pool (``Pool``, ``AsyncResult[T]``, ``run_sync``...) is checked in
``test_pool_types.py`` beside this file.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable
from typing import Any, assert_type

import anyio
import numpy as np
import numpy.typing as npt
import pytest

import aioshm
import aioshm.multiprocessing as mp

Array = npt.NDArray[np.float64]


# --------------------------------------------------------------------------- targets


def rank_squared(rank: int) -> int:
    return rank * rank


def rank_scaled(rank: int, a: Array, factor: float) -> float:
    return float(a.sum()) * factor + rank


def add(x: int, y: int) -> int:
    return x + y


def shout(text: str, *, times: int = 1) -> str:
    return text.upper() * times


def nothing() -> None:
    return None


def put_sum(q: aioshm.Queue[int], x: int, y: int) -> None:
    q.put(x + y)


# --------------------------------------------------------------------------- queues


def check_queue_round_trip() -> None:
    """``Queue[T]``: ``put`` takes a T, ``get`` returns one; subscripted or annotated."""
    q = aioshm.Queue[int](maxsize=2)
    assert_type(q, aioshm.Queue[int])
    q.put(1)
    q.put_nowait(2)
    assert_type(q.get(), int)
    assert_type(q.get_nowait(), int)
    q.put("one")  # type: ignore[arg-type]
    q.close()

    annotated: aioshm.Queue[str] = aioshm.Queue()
    annotated.put("x")
    assert_type(annotated.get(timeout=1.0), str)
    annotated.close()

    untyped = aioshm.Queue()  # no parameter: Queue[Any], as before the class was generic
    assert_type(untyped, aioshm.Queue[Any])
    untyped.close()


def check_joinable_and_simple_queues() -> None:
    jq = aioshm.JoinableQueue[bytes]()
    assert_type(jq, aioshm.JoinableQueue[bytes])
    jq.put(b"x")
    assert_type(jq.get(), bytes)
    jq.task_done()
    jq.join()
    jq.put(1)  # type: ignore[arg-type]
    jq.close()

    sq = aioshm.SimpleQueue[tuple[int, str]]()
    sq.put((1, "a"))
    assert_type(sq.get(), tuple[int, str])
    sq.put(("a", 1))  # type: ignore[arg-type]
    sq.close()


async def check_queue_async(a: Array) -> None:
    q = aioshm.Queue[Array](maxsize=4)
    await q.put_async(a)
    assert_type(await q.get_async(), Array)
    await q.put_async(a)
    q.shutdown()
    async for item in q:
        assert_type(item, Array)
    await q.put_async("not an array")  # type: ignore[arg-type]
    q.close()

    sq = aioshm.SimpleQueue[int]()
    await sq.put_async(1)
    assert_type(await sq.get_async(), int)
    sq.close()

    jq = aioshm.JoinableQueue[int]()
    await jq.put_async(1)
    assert_type(await jq.get_async(), int)
    jq.task_done()
    await jq.join_async()
    jq.close()


# --------------------------------------------------------------------------- pipes


def check_pipe_round_trip() -> None:
    """``Pipe()`` ends are ``Connection[Any, Any]``; an annotation narrows them."""
    a, b = aioshm.Pipe()
    assert_type(a, aioshm.Connection[Any, Any])
    sender: aioshm.Connection[int, str] = a
    receiver: aioshm.Connection[str, int] = b
    sender.send(1)
    assert_type(receiver.recv(), int)
    receiver.send("one")
    assert_type(sender.recv(), str)
    sender.send("one")  # type: ignore[arg-type]
    assert_type(sender.poll(0), bool)
    sender.close()
    receiver.close()


async def check_pipe_async() -> None:
    a, b = aioshm.Pipe()
    sender: aioshm.Connection[float, str] = a
    receiver: aioshm.Connection[str, float] = b
    await sender.send_async(1.5)
    assert_type(await receiver.recv_async(), float)
    assert_type(await receiver.poll_async(0), bool)
    await sender.send_bytes_async(b"raw")
    assert_type(await receiver.recv_bytes_async(), bytes)
    sender.close()
    async for msg in receiver:  # until EOF
        assert_type(msg, float)
    receiver.close()


# --------------------------------------------------------------------------- spawn


async def check_spawn(a: Array) -> None:
    """``spawn(fn, args, nprocs)``: ``fn(rank, *args)``, checked; ``await`` → ``list[R]``."""
    ctx = aioshm.spawn(rank_squared, nprocs=2)
    assert_type(ctx, aioshm.AsyncProcessContext[int])
    assert_type(await ctx, list[int])
    assert_type(await aioshm.spawn(rank_scaled, args=(a, 2.0), nprocs=2), list[float])
    assert_type(await aioshm.spawn(rank_scaled, (a, 2.0)), list[float])
    assert_type(aioshm.start_processes(rank_squared, nprocs=2), aioshm.AsyncProcessContext[int])

    async with aioshm.spawn(rank_squared, nprocs=2) as group:
        assert_type(group, aioshm.AsyncProcessContext[int])
        assert_type(await group.join_async(timeout=1.0), bool)
        assert_type(group.pids(), list[int])
    same: aioshm.ProcessContext[int] = aioshm.spawn(rank_squared)  # the same class
    assert_type(await same, list[int])

    # another backend: its own awaitable context, with the same list
    remote = aioshm.spawn(rank_squared, nprocs=2, backend=aioshm.local_backend)
    assert_type(remote, Awaitable[list[int]])
    assert_type(await remote, list[int])

    # (mypy names the closest overload's mismatch: arg-type)
    aioshm.spawn(rank_scaled, nprocs=2)  # type: ignore[arg-type]
    aioshm.spawn(rank_scaled, args=(a, "2"), nprocs=2)  # type: ignore[arg-type]
    aioshm.spawn(add, args=("1",))  # type: ignore[arg-type]
    aioshm.start_processes(rank_squared, args=(1,))  # type: ignore[arg-type]
    aioshm.spawn(rank_squared, args=[1])  # type: ignore[call-overload]


def check_sync_spawn(a: Array) -> None:
    """The drop-in's torch face: the same checks; ``ProcessContext[R]`` unless joined."""
    ctx = mp.start_processes(rank_squared, nprocs=2, join=False, start_method="forkserver")
    assert_type(ctx, mp.ProcessContext[int] | None)
    assert ctx is not None
    assert_type(ctx.join(timeout=1.0), bool)
    assert_type(ctx.pids(), list[int])
    assert_type(mp.spawn(rank_scaled, (a, 2.0), 2, False), mp.ProcessContext[float] | None)
    mp.spawn(rank_scaled, (a, "2"))  # type: ignore[arg-type]
    mp.start_processes(add)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- Process


async def check_process() -> None:
    """``Process(target=f, args=...)`` is a ``Process[R]``: ``await p`` gives ``f``'s value."""
    p = aioshm.Process(target=add, args=(1, 2))
    assert_type(await p, int)
    assert_type(p.result(timeout=1.0), int)
    async with aioshm.Process(target=rank_squared, args=(3,)) as q:
        assert_type(await q, int)
    assert_type(await aioshm.Process(target=nothing), None)
    kw = aioshm.Process(target=shout, args=("hi",), kwargs={"times": 2})
    assert_type(await kw, str)
    assert_type(p.pid, int | None)
    assert_type(p.exitcode, int | None)
    await p.join_async(1.0)
    if sys.platform == "linux":
        assert_type(p, aioshm.Process[int])

    aioshm.Process(target=add, args=(1, "2"))  # type: ignore[arg-type]
    aioshm.Process(target=add)  # type: ignore[arg-type]


def check_process_subclass() -> None:
    class Worker(aioshm.Process[None]):
        def run(self) -> None:
            pass

    assert_type(Worker().result(), None)


# --------------------------------------------------------------------------- lazy names


async def check_lazy_names(pool: aioshm.Pool) -> None:
    """The names ``aioshm.__getattr__`` loads on first use are typed, not ``Any``; an unknown
    name is an error (there is no ``__getattr__`` for checkers)."""
    assert_type(aioshm.current_default_pool(), aioshm.Pool)
    assert_type(aioshm.local_backend, aioshm.LocalBackend)
    backend: aioshm.Backend = aioshm.local_backend
    assert_type(backend.name, str)
    assert_type(aioshm.RayBackend, type[aioshm.RayBackend])
    assert_type(aioshm.PoolStatistics, type[aioshm.PoolStatistics])
    assert_type(aioshm.ProgressEvent, type[aioshm.ProgressEvent])
    assert_type(aioshm.AsyncResult[int], type[aioshm.AsyncResult[int]])  # generic
    assert_type(pool.close(), None)
    await pool.join_async()
    print(aioshm.no_such_name)  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- run time


def test_generic_classes_are_subscriptable_at_run_time() -> None:
    """``aioshm.Queue[int]`` and friends work at run time (annotations outside
    ``from __future__ import annotations``, ``Queue[int]()``)."""
    aliases: tuple[object, ...] = (
        aioshm.Queue[int],
        aioshm.JoinableQueue[int],
        aioshm.SimpleQueue[int],
        aioshm.Connection[int, str],
        aioshm.Process[int],
        aioshm.AsyncProcessContext[int],
        mp.ProcessContext[int],
    )
    for alias in aliases:
        assert getattr(alias, "__origin__", None) is not None, alias


def test_queue_and_pipe_round_trips() -> None:
    check_queue_round_trip_at_run_time()
    check_pipe_round_trip()


def check_queue_round_trip_at_run_time() -> None:
    """:func:`check_queue_round_trip` without its rejected lines."""
    q = aioshm.Queue[int](maxsize=2)
    q.put(1)
    q.put_nowait(2)
    assert (q.get(), q.get_nowait()) == (1, 2)
    q.close()
    sq = aioshm.SimpleQueue[tuple[int, str]]()
    sq.put((1, "a"))
    assert sq.get() == (1, "a")
    sq.close()


@pytest.mark.anyio
async def test_async_round_trips() -> None:
    q = aioshm.Queue[list[int]](maxsize=4)
    await q.put_async([1])
    assert await q.get_async() == [1]
    await q.put_async([2])
    q.shutdown()
    assert [item async for item in q] == [[2]]
    q.close()
    await check_pipe_async_at_run_time()


async def check_pipe_async_at_run_time() -> None:
    a, b = aioshm.Pipe()
    sender: aioshm.Connection[float, str] = a
    receiver: aioshm.Connection[str, float] = b
    await sender.send_async(1.5)
    assert await receiver.recv_async() == 1.5
    sender.close()
    assert [msg async for msg in receiver] == []
    receiver.close()


@pytest.mark.anyio
async def test_subscripted_objects_reach_a_child() -> None:
    """A ``Process[int]`` and a ``Queue[int]`` (instances made through the subscripted class
    carry ``__orig_class__``) start, pickle to the child and return as without the subscript."""
    q = aioshm.Queue[int]()
    try:
        with anyio.fail_after(60):
            assert await aioshm.Process[int](target=add, args=(1, 2)) == 3
            await aioshm.Process[None](target=put_sum, args=(q, 2, 3))
            assert await q.get_async() == 5
    finally:
        q.close()

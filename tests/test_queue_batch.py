"""``Queue.put_many``/``get_many`` and their ``*_async`` twins: batches beside the stdlib API.

Every item of a batch is its own record, so any consumer's ``get`` takes any item, and a batch
keeps the per-item semantics of ``put``/``get``: FIFO, ``maxsize``, ``block``/``timeout`` (one
deadline for the whole batch), shutdown, ``JoinableQueue`` accounting, arrays as handles.
Children exchange batches with the parent through the blocking methods; the async twins run on
asyncio, asyncio+uvloop and trio.
"""

from __future__ import annotations

import gc
import queue
import sys
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

import _batch_targets as targets

import aioshm

CTX = aioshm.get_context()
WAIT = 30.0


@pytest.fixture(autouse=True)
def _trim_pool() -> Iterator[None]:
    """Release the recycled segments a test leaves warm in this process's pool."""
    yield
    gc.collect()
    aioshm.trim_pool()


def reap(procs: Iterable[Any]) -> None:
    for p in procs:
        if getattr(p, "_popen", None) is None:
            continue
        if p.exitcode is None:
            p.kill()
        p.join(10)


# =========================================================================== blocking face


def test_put_many_then_get_many_in_order_up_to_max_items() -> None:
    """``get_many`` returns the oldest items, at most ``max_items``, and only those already
    waiting: it never waits for more once it has one."""
    q = CTX.Queue()
    try:
        q.put_many(range(10))
        assert q.qsize() == 10
        assert q.get_many(4) == [0, 1, 2, 3]
        assert q.get() == 4  # items of a batch are single items to every other method
        assert q.get_many(100, timeout=WAIT) == [5, 6, 7, 8, 9]
        assert q.empty()
        q.put("x")
        assert q.get_many(100, timeout=WAIT) == ["x"]
    finally:
        q.close()


def test_get_many_empty_and_bad_max_items() -> None:
    q = CTX.Queue()
    try:
        with pytest.raises(queue.Empty):
            q.get_many(5, block=False)
        with pytest.raises(queue.Empty):
            q.get_many(5, timeout=0.05)
        with pytest.raises(ValueError, match="max_items"):
            q.get_many(0)
        q.put_many([])  # an empty batch is no-op
        assert q.empty()
    finally:
        q.close()


def test_put_many_on_a_full_queue_puts_what_fits_and_says_how_many() -> None:
    q = CTX.Queue(3)
    try:
        with pytest.raises(queue.Full) as info:
            q.put_many(["a", "b", "c", "d"], block=False)
        assert "3 items of the batch were put" in str(info.value)
        with pytest.raises(queue.Full):
            q.put_many(["e"], timeout=0.05)
        assert q.full()
        assert q.get_many(10) == ["a", "b", "c"]
        q.put_many(["f", "g"], timeout=WAIT)  # the slots came back with the gets
        assert q.get_many(10) == ["f", "g"]
    finally:
        q.close()


def test_put_many_on_a_full_socket_buffer_of_an_unbounded_queue() -> None:
    """An unbounded queue is full when the kernel buffer is: a non-blocking ``put_many`` puts
    what fits (and says how many); the count stays true."""
    q = CTX.Queue()
    try:
        with pytest.raises(queue.Full) as info:
            q.put_many(range(200_000), block=False)
        n = int(str(info.value).split()[0])
        assert 0 < n < 200_000
        assert q.qsize() == n
        got: list[int] = []
        while len(got) < n:
            got.extend(q.get_many(1000, timeout=WAIT))
        assert got == list(range(n))
        assert q.qsize() == 0 and q.empty()
    finally:
        q.close()


@pytest.mark.timeout(120)
def test_blocking_put_many_waits_for_room_while_a_child_drains() -> None:
    """A batch larger than the kernel buffer goes through whole, in order, while a child takes
    items: ``put_many`` waits for room instead of failing."""
    q = CTX.Queue()
    p = CTX.Process(target=targets.get_many_until_none, args=(q, 256))
    try:
        p.start()
        q.put_many([*range(50_000), None], timeout=WAIT)
        assert p.result(WAIT) == list(range(50_000))
    finally:
        q.close()
        reap([p])


def test_put_many_stops_at_an_unpicklable_item() -> None:
    q = CTX.Queue()
    try:
        with pytest.raises((TypeError, AttributeError)):
            q.put_many([1, 2, threading.Lock(), 4])
        assert q.get_many(10) == [1, 2]
        assert q.qsize() == 0  # the failed item left no count behind
    finally:
        q.close()


def test_get_many_returns_the_items_before_a_bad_one_then_raises() -> None:
    """An item that fails to unpickle mid-batch does not take the good items received with it
    (before it and after it, in the same syscall) down with it: they are returned, and the
    next ``get_many`` raises its error."""
    q = CTX.Queue()
    try:
        q.put_many([1, 2, targets.Bomb(), 3])
        assert q.get_many(10) == [1, 2, 3]
        with pytest.raises(ValueError, match="cannot be unpickled"):
            q.get_many(10)
        with pytest.raises(queue.Empty):
            q.get_many(10, block=False)
    finally:
        q.close()


def test_batches_after_shutdown() -> None:
    q = CTX.Queue()
    try:
        q.put_many([1, 2])
        q.shutdown()
        with pytest.raises(aioshm.QueueShutDown):
            q.put_many([3])
        assert q.get_many(10) == [1, 2]  # drains what is left
        with pytest.raises(aioshm.QueueShutDown):
            q.get_many(10)
    finally:
        q.close()


@pytest.mark.timeout(120)
def test_plain_gets_in_children_take_the_items_of_batches_one_by_one() -> None:
    """A batch is not a unit on the wire: two children that only call ``get()`` share the
    items of big batches (several records per syscall) and each gets its items in order."""
    q = CTX.Queue()
    cons = [CTX.Process(target=targets.get_until_none, args=(q,)) for _ in range(2)]
    try:
        for p in cons:
            p.start()
        q.put_many(range(2000), timeout=WAIT)
        q.put_many([None, None], timeout=WAIT)
        parts = [p.result(WAIT) for p in cons]
        for part in parts:
            assert part == sorted(part)
        assert sorted(parts[0] + parts[1]) == list(range(2000))
    finally:
        q.close()
        reap(cons)


def test_joinable_queue_counts_every_item_of_a_batch() -> None:
    q = CTX.JoinableQueue()
    try:
        q.put_many(["a", "b", "c"])
        assert q.get_many(10) == ["a", "b", "c"]
        q.task_done()
        q.task_done()
        assert not q._all_done()
        q.task_done()
        q.join()  # returns: all three were counted, and all three are done
        with pytest.raises(ValueError):
            q.task_done()
    finally:
        q.close()


def test_arrays_travel_in_batches() -> None:
    q = CTX.Queue()
    try:
        shared = aioshm.ones(1 << 18, np.float32)
        private = np.arange(1 << 18, dtype=np.float32)
        q.put_many([shared, private])
        a, b = q.get_many(2)
        assert aioshm.is_shared(a) and np.array_equal(a, shared)
        assert np.array_equal(b, private)
        del a, b, shared
    finally:
        q.close()


@pytest.mark.timeout(120)
def test_producers_and_consumers_in_children_exchange_batches() -> None:
    """Two children put_many, two children get_many: every item arrives exactly once, and each
    producer's items arrive in order to each consumer."""
    q = CTX.Queue(64)
    prods = [
        CTX.Process(target=targets.put_many_range, args=(q, 0, 500, 7)),
        CTX.Process(target=targets.put_many_range, args=(q, 1000, 1500, 13)),
    ]
    cons = [CTX.Process(target=targets.get_many_until_none, args=(q, 16)) for _ in range(2)]
    try:
        for p in prods + cons:
            p.start()
        for p in prods:
            p.join(WAIT)
            assert p.exitcode == 0
        q.put_many([None, None])
        got: list[int] = []
        for p in cons:
            items = p.result(WAIT)
            got.extend(items)
            for lo in (0, 1000):  # each producer's items in its order
                mine = [x for x in items if lo <= x < lo + 500]
                assert mine == sorted(mine)
        assert sorted(got) == [*range(500), *range(1000, 1500)]
    finally:
        q.close()
        reap(prods + cons)


# =========================================================================== async face


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_async_batches_in_order_with_block_and_timeout() -> None:
    q = CTX.Queue(4)
    try:
        with anyio.fail_after(WAIT):
            await q.put_many_async(range(3))
            assert await q.get_many_async(2) == [0, 1]
            assert await q.get_many_async(10, timeout=WAIT) == [2]
            with pytest.raises(queue.Empty):
                await q.get_many_async(10, block=False)
            with pytest.raises(queue.Empty):
                await q.get_many_async(10, timeout=0.05)
            with pytest.raises(queue.Full) as info:
                await q.put_many_async(range(10, 16), timeout=0.05)
            assert "4 items of the batch were put" in str(info.value)
            with pytest.raises(queue.Full):
                await q.put_many_async(["x"], block=False)
            assert await q.get_many_async(10) == [10, 11, 12, 13]
            with pytest.raises(ValueError, match="max_items"):
                await q.get_many_async(0)
    finally:
        q.close()


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_get_many_async_waits_for_the_first_item_without_blocking_the_loop() -> None:
    """A ``get_many_async`` on an empty queue suspends its task; a child's batch wakes it, and
    it takes what has arrived (at least the first item) in order."""
    q = CTX.Queue()
    p = CTX.Process(target=targets.put_many_range, args=(q, 0, 50, 50))
    try:
        with anyio.fail_after(WAIT):
            got: list[int] = []
            async with anyio.create_task_group() as tg:

                async def getter() -> None:
                    while len(got) < 50:
                        got.extend(await q.get_many_async(64))

                tg.start_soon(getter)
                await anyio.wait_all_tasks_blocked()  # the getter waits: the loop runs
                assert got == []
                p.start()
            assert got == list(range(50))
            assert await p is None  # the child finished cleanly
    finally:
        q.close()
        reap([p])


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_cancelled_get_many_async_loses_no_item() -> None:
    q = CTX.Queue()
    try:
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(q.get_many_async, 10)
                await anyio.wait_all_tasks_blocked()  # it waits on the empty queue
                tg.cancel_scope.cancel()
            await q.put_many_async(["a", "b"])
            assert await q.get_many_async(10) == ["a", "b"]
    finally:
        q.close()


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_async_batches_after_shutdown_and_bad_item() -> None:
    q = CTX.Queue()
    try:
        with anyio.fail_after(WAIT):
            await q.put_many_async([1, targets.Bomb(), 2])
            assert await q.get_many_async(10) == [1, 2]  # taken with the bad one
            with pytest.raises(ValueError, match="cannot be unpickled"):
                await q.get_many_async(10)
            await q.put_async(4)
            q.shutdown()
            with pytest.raises(aioshm.QueueShutDown):
                await q.put_many_async([3])
            assert await q.get_many_async(10) == [4]
            with pytest.raises(aioshm.QueueShutDown):
                await q.get_many_async(10)
    finally:
        q.close()

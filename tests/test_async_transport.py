"""The async transport: ``Pipe`` connections and the queues, awaited from asyncio, uvloop and trio.

DESIGN.md §2.1 (the ``*_async`` twins), §2.5 (the transport), §2.2 (arrays as handles):

* pipes: every twin round-trips with a child; shared arrays sent with ``send_async`` are seen
  written by the child; ``async for msg in conn`` ends at EOF; a cancelled ``recv_async`` loses
  no bytes (the next receive, async or sync, returns the whole message); a plain stdlib
  ``multiprocessing.connection.Connection`` on the other end interoperates;
* queues: ``put_async``/``get_async`` with the stdlib's block/timeout semantics, ``maxsize``
  backpressure that suspends only the task, ``shutdown()`` waking every waiter (tasks and a
  blocked child), ``async for`` ending after shutdown and drain, ``JoinableQueue.join_async``,
  many-producer/many-consumer exchange with nothing lost or duplicated, and cancelled
  ``get_async`` calls that lose no item;
* closing: a task parked in ``recv_async``, ``poll_async`` or ``get_async`` when the object is
  closed wakes with the error a later call would get;
* loop hygiene: a ticking task keeps ticking while 512 MiB goes to a child and back.

Children are started with the async face's default start method (forkserver on Linux), report
through pipes and queues, and are killed and reaped in ``finally``. Nothing synchronises by
sleeping: tasks meet through events, pipes, queues and ``anyio.wait_all_tasks_blocked()``.
"""

from __future__ import annotations

import gc
import math
import multiprocessing.connection as mp_connection
import os
import queue
import random
import select
import socket
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import numpy as np
import pytest

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

import _async_targets as targets

import aioshm

pytestmark = pytest.mark.anyio

CTX = aioshm.get_context()
WAIT = 30.0  # the bound on every awaited section: an await never hangs


@pytest.fixture(autouse=True)
def _trim_pool() -> Iterator[None]:
    """Release the idle recycled segments a test leaves warm in this process's pool (by design
    the pool keeps them mapped; the leak check would count their fds)."""
    yield
    gc.collect()
    aioshm.trim_pool()


def reap(procs: Iterable[Any]) -> None:
    """Kill what still runs and reap everything (the ``finally`` of every test)."""
    for p in procs:
        if getattr(p, "_popen", None) is None:
            continue
        if p.exitcode is None:
            p.kill()
        p.join(10)


def readable_now(fd: int) -> bool:
    """Whether ``fd`` has bytes waiting in the kernel right now."""
    return bool(select.select([fd], [], [], 0)[0])


# =========================================================================== pipes


@pytest.mark.timeout(60)
async def test_pipe_twins_round_trip_with_a_child() -> None:
    """send/recv, send_bytes/recv_bytes (with offset/size and maxlength) and poll_async
    round-trip through a child that echoes every frame."""
    a, b = aioshm.Pipe()
    p = CTX.Process(target=targets.echo_bytes, args=(b,))
    try:
        p.start()
        b.close()
        with anyio.fail_after(WAIT):
            assert await a.poll_async() is False  # nothing sent yet: timeout 0 answers at once
            obj = {"ints": list(range(10)), "text": "héllo", "nested": (1.5, None, b"raw")}
            await a.send_async(obj)
            assert await a.poll_async(None) is True  # waits for the echo
            assert await a.recv_async() == obj

            small = np.arange(12, dtype=np.int16)  # below the share threshold: pickled inline
            await a.send_async(small)
            back = await a.recv_async()
            np.testing.assert_array_equal(back, small)

            await a.send_bytes_async(b"0123456789", 2, 5)
            assert await a.recv_bytes_async() == b"23456"
            await a.send_bytes_async(memoryview(np.arange(4, dtype=np.int32)))
            assert await a.recv_bytes_async(16) == np.arange(4, dtype=np.int32).tobytes()
            big = bytes(range(256)) * 8192  # 2 MiB: larger than the socket buffers
            await a.send_bytes_async(big)
            assert await a.recv_bytes_async() == big
            await a.send_bytes_async(b"")
            assert await a.recv_bytes_async() == b""
            assert await a.poll_async(0.01) is False

            a.close()
            assert await p == 6
    finally:
        a.close()
        reap([p])


@pytest.mark.timeout(60)
async def test_pipe_send_async_shares_arrays_child_writes_are_visible() -> None:
    """A shared array (and strided views of it) sent with ``send_async`` travels as a handle:
    what the child writes through it is visible in the parent's array."""
    a, b = aioshm.Pipe()
    arr = aioshm.zeros((64, 64), dtype=np.float64)
    p = CTX.Process(target=targets.write_into_arrays, args=(b,))
    try:
        p.start()
        b.close()
        with anyio.fail_after(WAIT):
            await a.send_async((arr, 1.0))
            assert await a.recv_async() == ("done", True)
            assert (arr == 1.0).all()

            await a.send_async((arr[::2, 1::3], 5.0))  # a strided view
            assert await a.recv_async() == ("done", True)
            assert (arr[::2, 1::3] == 5.0).all()
            assert (arr[1::2] == 1.0).all()

            await a.send_async((arr.T[3], -2.0))  # a column, through a transpose
            assert await a.recv_async() == ("done", True)
            assert (arr[:, 3] == -2.0).all()
            a.close()
            assert await p == 3
    finally:
        a.close()
        reap([p])


@pytest.mark.timeout(60)
async def test_async_for_over_a_connection_ends_at_eof() -> None:
    """``async for msg in conn`` yields every message and stops when the peer closes."""
    a, b = aioshm.Pipe()
    p = CTX.Process(target=targets.send_numbers_then_close, args=(b, 50))
    try:
        p.start()
        b.close()
        with anyio.fail_after(WAIT):
            got = [msg async for msg in a]
            assert await p is None
        assert got == list(range(50))
    finally:
        a.close()
        reap([p])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("receive", ["recv_async", "recv_bytes_async"])
@pytest.mark.parametrize("then", ["async", "sync"])
async def test_cancelled_receive_mid_frame_loses_no_bytes(receive: str, then: str) -> None:
    """A receive cancelled while half a frame has been read keeps those bytes: the next receive
    (async, or the blocking one) returns the whole message."""
    size, first = 1 << 20, 60_000
    a, b = aioshm.Pipe()
    ctrl, ctrl_child = aioshm.Pipe()
    as_object = receive == "recv_async"
    p = CTX.Process(target=targets.send_in_two_halves, args=(b, ctrl_child, size, first, as_object))
    try:
        p.start()
        b.close()
        ctrl_child.close()
        got: list[bytes] = []

        async def receive_once() -> None:
            got.append(await getattr(a, receive)())

        with anyio.fail_after(WAIT):
            assert await ctrl.recv_async() == "half"  # header + 60 kB are in our socket
            assert readable_now(a.fileno())
            async with anyio.create_task_group() as tg:
                tg.start_soon(receive_once)
                await anyio.wait_all_tasks_blocked()  # it read what is there and waits
                tg.cancel_scope.cancel()
            assert got == []
            # the cancelled receive consumed the first part: nothing is left in the kernel
            assert not readable_now(a.fileno())
            await ctrl.send_async("rest")
            if then == "async":
                data = await getattr(a, receive)()
            else:
                data = a.recv() if as_object else a.recv_bytes()
            assert isinstance(data, bytes)
            assert len(data) == size
            assert targets.check_frame(data) == 7
            assert await p is None
    finally:
        a.close()
        ctrl.close()
        reap([p])


@pytest.mark.timeout(60)
async def test_async_waits_leave_the_socket_blocking() -> None:
    """Awaiting a connection (a receive that waits, a send that waits for room) does not switch
    its socket to non-blocking: the blocking face, in this process or in a child sharing the
    socket, keeps working (the ``Connection`` docstring's promise)."""
    a, b = aioshm.Pipe()
    try:
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(a.recv_async)
                await anyio.wait_all_tasks_blocked()  # waiting for readability
                tg.cancel_scope.cancel()
            assert os.get_blocking(a.fileno()), "recv_async left the socket non-blocking"

            big = b"x" * (8 << 20)  # more than the socket buffers hold: the send must wait
            async with anyio.create_task_group() as tg:
                tg.start_soon(b.send_bytes_async, big)
                await anyio.wait_all_tasks_blocked()  # waiting for room
                assert await a.recv_bytes_async() == big
            assert os.get_blocking(b.fileno()), "send_bytes_async left the socket non-blocking"
    finally:
        a.close()
        b.close()


@pytest.mark.timeout(60)
async def test_randomly_cancelled_recv_bytes_async_loses_nothing() -> None:
    """Receives cancelled at random points (mostly while a big frame is half read) lose and
    tear nothing: every numbered message arrives once, whole and in order."""
    n, size = 24, 200_000
    rng = random.Random(20240611)
    a, b = aioshm.Pipe()
    p = CTX.Process(target=targets.send_numbered_frames, args=(b, n, size))
    try:
        p.start()
        b.close()
        received: list[int] = []
        cancelled = 0
        with anyio.fail_after(WAIT):
            while True:
                result: list[bytes | None] = []

                async def receive_once(result: list[bytes | None] = result) -> None:
                    try:
                        result.append(await a.recv_bytes_async())
                    except EOFError:
                        result.append(None)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(receive_once)
                    if rng.random() < 0.8:
                        for _ in range(rng.randrange(12)):
                            await anyio.lowlevel.checkpoint()
                        tg.cancel_scope.cancel()
                if not result:
                    cancelled += 1
                    continue
                if result[0] is None:
                    break
                received.append(targets.check_frame(result[0]))
            assert await p is None
        assert received == list(range(n))
        assert cancelled > 0
    finally:
        a.close()
        reap([p])


@pytest.mark.timeout(60)
async def test_interop_with_a_stdlib_connection_in_process() -> None:
    """An aioshm ``Connection`` and a plain stdlib ``Connection`` on one socketpair understand
    each other, in both directions, for objects and bytes."""
    s1, s2 = socket.socketpair()
    std = mp_connection.Connection(s1.detach())
    ours = aioshm.Connection(s2.detach())
    try:
        with anyio.fail_after(WAIT):
            std.send({"k": [1, 2, 3], "arr": np.arange(5)})
            got = await ours.recv_async()
            assert got["k"] == [1, 2, 3]
            np.testing.assert_array_equal(got["arr"], np.arange(5))

            await ours.send_async(("x", 1.5, None))
            assert std.recv() == ("x", 1.5, None)

            std.send_bytes(b"abc" * 10_000)
            assert await ours.recv_bytes_async() == b"abc" * 10_000
            await ours.send_bytes_async(b"hello world", 6)
            assert std.recv_bytes() == b"world"

            assert await ours.poll_async(0) is False
            std.send(42)
            assert await ours.poll_async(None) is True
            assert await ours.recv_async() == 42
            assert std.poll(0) is False

            std.close()
            with pytest.raises(EOFError):
                await ours.recv_async()
    finally:
        std.close()
        ours.close()


@pytest.mark.timeout(60)
async def test_interop_with_a_stdlib_connection_in_a_child() -> None:
    """A child that speaks through a plain stdlib ``Connection`` echoes objects and frames
    larger than the socket buffers sent with the async twins."""
    a, b = aioshm.Pipe()
    p = CTX.Process(target=targets.stdlib_echo, args=(b,))
    try:
        p.start()
        b.close()
        with anyio.fail_after(WAIT):
            await a.send_async(("obj", {"a": [1, 2], "b": "text"}))
            assert await a.recv_async() == {"a": [1, 2], "b": "text"}
            big = bytes(range(256)) * 12_000  # 3 MB
            await a.send_async(("bytes", None))
            await a.send_bytes_async(big)
            assert await a.recv_bytes_async() == big
            a.close()
            assert await p == 2
    finally:
        a.close()
        reap([p])


# =========================================================================== queues


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["Queue", "JoinableQueue"])
async def test_queue_block_and_timeout_semantics(kind: str) -> None:
    """``put_async``/``get_async`` raise ``queue.Full``/``queue.Empty`` with ``block=False``
    and when a timeout expires, and otherwise move items in FIFO order."""
    q = getattr(CTX, kind)(2)
    with anyio.fail_after(WAIT):
        await q.put_async("a")
        await q.put_async("b", timeout=1.0)
        with pytest.raises(queue.Full):
            await q.put_async("c", block=False)
        with pytest.raises(queue.Full):
            await q.put_async("c", timeout=0.05)
        with pytest.raises(queue.Full):
            await q.put_async("c", True, 0)
        assert q.full()
        assert await q.get_async() == "a"
        assert await q.get_async(timeout=1.0) == "b"
        with pytest.raises(queue.Empty):
            await q.get_async(block=False)
        with pytest.raises(queue.Empty):
            await q.get_async(timeout=0.05)
        with pytest.raises(queue.Empty):
            await q.get_async(True, 0)
        await q.put_async("d", block=False)
        assert await q.get_async(block=False) == "d"
        assert q.empty()
    q.close()


@pytest.mark.timeout(60)
async def test_a_get_async_with_a_timeout_is_still_cancelled_by_its_scope() -> None:
    """A deadline of the call's own (on asyncio a timer on the parked wait, not a cancel
    scope) does not hide the caller's cancellation, and leaves nothing behind: the next timed
    get receives an item put after it."""
    q = CTX.Queue()
    try:
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(q.get_async, True, 60.0)
                await anyio.wait_all_tasks_blocked()  # parked on the empty queue
                tg.cancel_scope.cancel()
            assert tg.cancel_scope.cancelled_caught
            async with anyio.create_task_group() as tg:
                got: list[str] = []

                async def getter() -> None:
                    got.append(await q.get_async(timeout=60.0))

                tg.start_soon(getter)
                await anyio.wait_all_tasks_blocked()
                await q.put_async("x")
            assert got == ["x"]
    finally:
        q.close()


@pytest.mark.timeout(60)
async def test_maxsize_backpressure_suspends_only_the_task() -> None:
    """A ``put_async`` on a full queue suspends its task (a ticker keeps ticking meanwhile) and
    completes once a child takes an item."""
    q = CTX.Queue(2)
    p = CTX.Process(target=targets.get_n, args=(q, 3))
    try:
        with anyio.fail_after(WAIT):
            await q.put_async(0)
            await q.put_async(1)
            put_done = anyio.Event()
            ticked = anyio.Event()
            ticks_while_suspended = 0

            async def putter() -> None:
                await q.put_async(2)
                put_done.set()

            async def ticker() -> None:
                nonlocal ticks_while_suspended
                while not put_done.is_set():
                    ticks_while_suspended += 1
                    if ticks_while_suspended == 20:
                        ticked.set()
                    await anyio.sleep(0.001)

            async with anyio.create_task_group() as tg:
                tg.start_soon(putter)
                await anyio.wait_all_tasks_blocked()  # the put waits for room
                tg.start_soon(ticker)
                await ticked.wait()  # the loop kept running: 20 ticks while the put waited
                assert not put_done.is_set()
                p.start()  # the child takes three items: room for the third put
                await put_done.wait()
            assert ticks_while_suspended >= 20
            assert await p == [0, 1, 2]
    finally:
        q.close()
        reap([p])


@pytest.mark.timeout(60)
async def test_shutdown_wakes_every_waiter() -> None:
    """``shutdown()`` wakes every waiter with ``QueueShutDown``: several tasks in ``get_async``,
    a task in ``put_async`` on a full queue, and a child blocked in the sync ``get``."""
    empty_q = CTX.Queue()
    full_q = CTX.Queue(1)
    ready, ready_child = aioshm.Pipe(duplex=False)
    p = CTX.Process(target=targets.get_expecting_shutdown, args=(empty_q, ready_child))
    outcomes: list[str] = []
    try:
        p.start()
        ready_child.close()
        with anyio.fail_after(WAIT):
            await full_q.put_async("filler")
            assert await ready.recv_async() == "blocking"

            async def getter(i: int) -> None:
                try:
                    await empty_q.get_async()
                except aioshm.QueueShutDown:
                    outcomes.append(f"get {i}")

            async def putter() -> None:
                try:
                    await full_q.put_async("more")
                except aioshm.QueueShutDown:
                    outcomes.append("put")

            async with anyio.create_task_group() as tg:
                for i in range(3):
                    tg.start_soon(getter, i)
                tg.start_soon(putter)
                await anyio.wait_all_tasks_blocked()
                assert outcomes == []
                empty_q.shutdown()
                full_q.shutdown()
            assert sorted(outcomes) == ["get 0", "get 1", "get 2", "put"]
            assert await p == "shutdown"
            # later calls fail at once; a shut-down queue still hands out what it holds
            with pytest.raises(aioshm.QueueShutDown):
                await empty_q.put_async(1)
            assert await full_q.get_async() == "filler"
            with pytest.raises(aioshm.QueueShutDown):
                await full_q.get_async()
    finally:
        ready.close()
        empty_q.close()
        full_q.close()
        reap([p])


@pytest.mark.timeout(60)
async def test_async_for_over_a_queue_ends_after_shutdown_and_drain() -> None:
    """``async for item in q`` yields everything a child put, then ends when the child shuts
    the queue down."""
    q = CTX.Queue()
    p = CTX.Process(target=targets.produce_then_shutdown, args=(q, 200))
    try:
        p.start()
        with anyio.fail_after(WAIT):
            got = [item async for item in q]
            assert await p == 200
        assert got == list(range(200))
    finally:
        q.close()
        reap([p])


@pytest.mark.timeout(60)
async def test_joinable_queue_join_async_waits_for_a_childs_task_done() -> None:
    """``join_async`` returns only after a child called ``task_done`` for every item."""
    q = CTX.JoinableQueue()
    conn, conn_child = aioshm.Pipe()
    p = CTX.Process(target=targets.consume_with_task_done, args=(q, 3, conn_child))
    joined = anyio.Event()
    try:
        with anyio.fail_after(WAIT):
            for i in range(3):
                await q.put_async(i)
            p.start()
            conn_child.close()

            async def joiner() -> None:
                await q.join_async()
                joined.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(joiner)
                assert await conn.recv_async() == "all but one done"
                await anyio.wait_all_tasks_blocked()
                assert not joined.is_set()
                await conn.send_async("go")
                await joined.wait()
            assert await p == [0, 1, 2]
            await q.join_async()  # nothing unfinished: returns at once
    finally:
        conn.close()
        q.close()
        reap([p])


@pytest.mark.timeout(60)
async def test_two_sync_producers_two_async_consumers_nothing_lost_or_duplicated() -> None:
    """2 children ``put`` 500 numbered items each into a bounded queue; 2 tasks consume with
    ``async for``: every item arrives exactly once, each producer's items in order."""
    n = 500
    q = CTX.Queue(16)
    producers = [CTX.Process(target=targets.produce, args=(q, k, n)) for k in range(2)]
    consumed: list[list[tuple[int, int]]] = [[], []]
    try:

        async def consume(j: int) -> None:
            async for item in q:
                consumed[j].append(item)

        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                for j in range(2):
                    tg.start_soon(consume, j)
                for p in producers:
                    p.start()
                for p in producers:
                    assert await p == n
                q.shutdown()
        everything = consumed[0] + consumed[1]
        assert len(everything) == 2 * n
        assert sorted(everything) == [(k, i) for k in range(2) for i in range(n)]
        for part in consumed:
            for k in range(2):
                mine = [i for (kk, i) in part if kk == k]
                assert mine == sorted(mine)
    finally:
        q.close()
        reap(producers)


@pytest.mark.timeout(60)
async def test_cancelled_get_async_loses_no_item() -> None:
    """``get_async`` calls cancelled at random points while a child puts items lose none: the
    items received, then drained, are exactly the ones put, once each, in order."""
    n = 300
    rng = random.Random(77)
    q = CTX.Queue()
    p = CTX.Process(target=targets.produce_then_shutdown, args=(q, n))
    got: list[int] = []
    cancelled = 0
    try:
        p.start()
        with anyio.fail_after(WAIT):
            finished = False
            while not finished:
                outcome: list[str] = []

                async def get_once(outcome: list[str] = outcome) -> None:
                    try:
                        got.append(await q.get_async())
                        outcome.append("item")
                    except aioshm.QueueShutDown:
                        outcome.append("end")

                async with anyio.create_task_group() as tg:
                    tg.start_soon(get_once)
                    if rng.random() < 0.7:
                        for _ in range(rng.randrange(6)):
                            await anyio.lowlevel.checkpoint()
                        tg.cancel_scope.cancel()
                if not outcome:
                    cancelled += 1
                finished = outcome == ["end"]
            assert await p == n
        assert got == list(range(n))
        assert cancelled > 0
    finally:
        q.close()
        reap([p])


@pytest.mark.timeout(60)
async def test_closing_wakes_a_parked_receiver_with_an_error() -> None:
    """A task parked in ``recv_async``, ``poll_async`` or ``get_async`` when another task
    closes the connection or the queue wakes at once with the error a later call would get
    (OSError, ValueError), instead of waiting forever on an fd that is gone."""
    a, b = aioshm.Pipe()
    c, d = aioshm.Pipe()
    q = CTX.Queue()
    errors: dict[str, BaseException] = {}

    async def expect_error(name: str, call: Any) -> None:
        try:
            await call()
        except (OSError, ValueError) as exc:
            errors[name] = exc

    try:
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(expect_error, "recv", a.recv_async)
                tg.start_soon(expect_error, "poll", lambda: c.poll_async(None))
                tg.start_soon(expect_error, "get", q.get_async)
                await anyio.wait_all_tasks_blocked()  # all three are parked
                a.close()
                c.close()
                q.close()
        assert sorted(errors) == ["get", "poll", "recv"]
        assert isinstance(errors["recv"], OSError) and "closed" in str(errors["recv"])
        assert isinstance(errors["poll"], OSError) and "closed" in str(errors["poll"])
        assert isinstance(errors["get"], ValueError) and "closed" in str(errors["get"])
    finally:
        for conn in (a, b, c, d):
            conn.close()
        q.close()


@pytest.mark.timeout(60)
async def test_empty_on_a_closed_queue_follows_the_stdlib() -> None:
    """``empty()`` on a queue closed in this process answers as the stdlib's does (CPython's
    ``test_closed_queue_empty_exceptions``): True while this process never put an item on it,
    ``OSError`` ("is closed") once it did, through ``put`` or ``put_async``; ``get`` on a closed
    queue still raises ValueError."""
    for kind in ("Queue", "JoinableQueue"):
        unused = getattr(CTX, kind)()
        unused.close()
        unused.join_thread()
        assert unused.empty() is True
        with pytest.raises(ValueError, match="is closed"):
            unused.get_nowait()
        for how in ("put", "put_async"):
            q = getattr(CTX, kind)()
            try:
                if how == "put":
                    q.put("foo")
                else:
                    with anyio.fail_after(WAIT):
                        await q.put_async("foo")
                assert q.empty() is False
            finally:
                q.close()
            q.join_thread()
            with pytest.raises(OSError, match="is closed"):
                q.empty()


@pytest.mark.timeout(60)
def test_queue_awaited_from_successive_event_loops() -> None:
    """A consumer's wait stays registered with its asyncio loop from one get to the next;
    the same queue is then awaited from a new asyncio loop (the first is closed), from trio,
    and from asyncio again, each get waiting for an item put after it parked."""
    import asyncio

    q = CTX.Queue()

    async def round_trips(base: int) -> list[int]:
        got: list[int] = []

        async def consume() -> None:
            got.extend([await q.get_async() for _ in range(5)])

        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(consume)
                for i in range(5):
                    await anyio.wait_all_tasks_blocked()  # the consumer waits in get_async
                    await q.put_async(base + i)
        return got

    try:
        assert asyncio.run(round_trips(0)) == [0, 1, 2, 3, 4]
        assert anyio.run(round_trips, 10, backend="trio") == [10, 11, 12, 13, 14]
        assert asyncio.run(round_trips(20)) == [20, 21, 22, 23, 24]
        q.put(30)
        assert q.get(timeout=WAIT) == 30
    finally:
        q.close()


@pytest.mark.timeout(60)
async def test_simple_queue_async_twins() -> None:
    """``SimpleQueue.put_async``/``get_async`` move items to and from a child."""
    q = CTX.SimpleQueue()
    p = CTX.Process(target=targets.get_n, args=(q, 2))
    try:
        p.start()
        with anyio.fail_after(WAIT):
            await q.put_async("x")
            await q.put_async({"y": 1})
            assert await p == ["x", {"y": 1}]
            await q.put_async(3)
            assert await q.get_async() == 3
    finally:
        q.close()
        reap([p])


# =========================================================================== loop hygiene


def _run_queue_wait() -> float:
    """Seconds this thread has spent runnable but waiting for a CPU (Linux schedstat; 0.0 where
    the kernel does not report it)."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/schedstat", "rb") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


class _Ticker:
    """A task that sleeps 1 ms at a time and records, per tick, how late it woke.

    ``wall`` is the plain lateness. ``own`` subtracts the time the loop's thread sat runnable
    waiting for a CPU (another process had it): what remains is the lateness the loop itself
    caused — callbacks that ran long, or a blocking call on its thread.
    """

    tick = 0.001

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.own: list[float] = []
        self.stop = anyio.Event()

    async def run(self, n: float = math.inf) -> None:
        while not self.stop.is_set() and len(self.wall) < n:
            t0, q0 = time.perf_counter(), _run_queue_wait()
            await anyio.sleep(self.tick)
            lag = time.perf_counter() - t0 - self.tick
            self.wall.append(lag)
            self.own.append(lag - (_run_queue_wait() - q0))

    def __str__(self) -> str:
        return f"worst {max(self.wall) * 1e3:.2f} ms, loop's own {max(self.own) * 1e3:.2f} ms"


@pytest.mark.timeout(120)
def test_ticker_keeps_ticking_during_512_mib_round_trips(
    anyio_backend: tuple[str, dict[str, Any]],
) -> None:
    """A ticking task keeps ticking (worst lag ≤ 5 ms) while a 512 MiB shared array goes to a
    child through a queue, the child touches every page, and sends it back — several times.

    The array is shared once; what crosses the queue is a handle. The loop runs as a program
    runs it (``anyio.run``): the anyio pytest plugin drives trio in guest mode, whose host
    thread hands every wake-up over through a queue and the GIL, which is not what is measured
    here. The machine has 2 CPUs and is shared with other jobs, so a tick can also be late
    because the loop's thread waited for a CPU: the bound applies to the lag the loop caused
    (wall lag minus the thread's run-queue wait, from the kernel's schedstat), the best of up to
    5 runs; the report gives both. A VM whose host deschedules it makes even a ticker with
    nothing else to do late (seen on CI: ~4 ms): such a run passes if its worst tick is no
    more than 5 ms later than the worst of the same ticker with no transfer, just before.
    """
    name, options = anyio_backend
    print(anyio.run(_ticker_round_trips, name, backend=name, backend_options=options))


async def _ticker_round_trips(backend_name: str) -> str:
    budget = 0.005
    round_trips = 8
    arr = aioshm.share(np.ones(128 << 20, np.float32))  # 512 MiB
    q_in, q_out = CTX.Queue(), CTX.Queue()
    p = CTX.Process(target=targets.touch_pages, args=(q_in, q_out))
    runs: list[tuple[_Ticker, _Ticker]] = []  # (idle, transfer) per attempt

    def excess(run: tuple[_Ticker, _Ticker]) -> float:
        idle, transfer = run
        return max(transfer.own) - max(idle.own)

    try:
        p.start()
        with anyio.fail_after(90):
            await q_in.put_async(np.zeros(1, np.float32))  # warm up the child and the queues
            await q_out.get_async()
            expected = 1.0
            for _ in range(5):
                idle = _Ticker()  # the machine's noise floor: the same ticker, no transfer
                await idle.run(50)
                ticker = _Ticker()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(ticker.run)
                    for _ in range(round_trips):
                        await q_in.put_async(arr)
                        back = await q_out.get_async()
                        expected += 1
                        assert back.shape == arr.shape
                        assert back[0] == expected and back[-1024] == expected
                        del back
                    ticker.stop.set()
                runs.append((idle, ticker))
                if max(ticker.own) <= budget:
                    break
            await q_in.put_async(None)
            assert await p == round_trips * len(runs) + 1
        assert arr[::1024].min() == expected  # every page was touched each time
        report = f"[{backend_name}] tick lag per run: " + "; ".join(
            f"{transfer} (no transfer just before: {idle})" for idle, transfer in runs
        )
        best = min(runs, key=excess)
        assert max(best[1].own) <= budget or excess(best) <= budget, report
        return report
    finally:
        q_in.close()
        q_out.close()
        reap([p])

"""Importable child targets for ``test_sharing.py`` (spawn/forkserver children import them).

Targets report through queues or pipes made by the drop-in ``aioshm.multiprocessing``; a
target that fails puts ``("error", traceback)`` on its report channel first, so the parent
fails with the child's traceback instead of waiting for a report that never comes. Targets
that must stay alive until the parent kills them block on a pipe, never by sleeping.
"""

from __future__ import annotations

import functools
import os
import queue
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

import aioshm.multiprocessing as amp  # registers the reducers in every child
from aioshm import _shm
from aioshm._queues import Queue as AioshmQueue

F = TypeVar("F", bound=Callable[..., Any])


def reports_errors(channel_arg: int) -> Callable[[F], F]:
    """Decorate a target so an exception is sent on positional argument ``channel_arg`` too."""

    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any) -> Any:
            try:
                return fn(*args)
            except BaseException:
                channel = args[channel_arg]
                message = ("error", traceback.format_exc())
                if hasattr(channel, "put"):
                    channel.put(message)
                else:
                    channel.send(message)
                raise

        return wrapper  # type: ignore[return-value]

    return deco


def _buffer_id(a: np.ndarray) -> int:
    buf = _shm.segment_buffer_of(a)
    return id(buf) if buf is not None else -1


# --------------------------------------------------------------------------- views


@reports_errors(1)
def write_views(q: Any, out: Any) -> None:
    """Write into a received 2-D array, into its column ``a[:, 1]`` and into ``a[::-1]``."""
    whole = q.get()
    whole[0, 0] = 1
    col = q.get()
    col[:] = 7
    rev = q.get()
    rev[0, 0] = 9  # a[-1, 0] in the parent
    out.put(
        {
            "shared": [_shm.is_shared(x) for x in (whole, col, rev)],
            "col_strides": col.strides,
            "rev_strides": rev.strides,
        }
    )


@reports_errors(1)
def receive_twice(q: Any, out: Any) -> None:
    """Receive the same array in two messages; report whether both map one buffer."""
    x = q.get()
    y = q.get()
    bx, by = _shm.segment_buffer_of(x), _shm.segment_buffer_of(y)
    out.put(
        {
            "both_shared": bx is not None and by is not None,
            "same_buffer": bx is by,
            "same_ptr": x.ctypes.data == y.ctypes.data,
            "mapped": len([s for s in _shm.live_segments() if s.has_views()]),
        }
    )


@reports_errors(1)
def receive_views_in_one_message(q: Any, out: Any) -> None:
    """Receive ``[a, a[2], a[:, 1]]`` as one message; report how they relate."""
    a, row, col = q.get()
    bufs = {_buffer_id(x) for x in (a, row, col)}
    a[2, 1] = 42
    out.put(
        {
            "one_buffer": len(bufs) == 1 and -1 not in bufs,
            "row_offset": row.ctypes.data - a.ctypes.data,
            "col_offset": col.ctypes.data - a.ctypes.data,
            "col_strides": col.strides,
            "row_sees_write": float(row[1]),
            "col_sees_write": float(col[2]),
        }
    )


# --------------------------------------------------------------------------- pool


def pool_task(args: tuple[str, np.ndarray, int]) -> tuple[np.ndarray, np.ndarray, bool]:
    """Add ``k`` to a received row in place; return a new shared array and a big plain one."""
    strategy, row, k = args
    _shm.set_sharing_strategy(strategy)
    was_shared = _shm.is_shared(row)
    row += k
    return _shm.share(row * 2), np.full(10_000, float(k)), was_shared  # 80 kB: pooled copy


# --------------------------------------------------------------------------- process args


def add_three(a: np.ndarray, every_other: np.ndarray) -> None:
    """``a += 3`` and ``every_other += 10`` on arrays inherited at construction."""
    if not (_shm.is_shared(a) and _shm.is_shared(every_other)):
        raise SystemExit(3)
    a += 3
    every_other += 10


# --------------------------------------------------------------------------- dtypes


@reports_errors(1)
def echo_and_fill(q: Any, out: Any) -> None:
    """For each ``(array, fill)`` received: describe it, fill it, and send the arrays back."""
    items = q.get()
    described = []
    for arr, fill in items:
        described.append((_shm.is_shared(arr), arr.dtype, arr.shape, arr.tobytes()))
        if fill is not None:
            arr[...] = fill
    out.put((described, [arr for arr, _ in items]))


# --------------------------------------------------------------------------- queue semantics


def produce(q: Any, tag: int, n: int, strategy: str) -> None:
    """Put ``(tag, i, payload)`` for ``i < n``; every 10th payload is a shared array."""
    _shm.set_sharing_strategy(strategy)
    for i in range(n):
        payload = _shm.share(np.array([tag, i])) if i % 10 == 0 else None
        q.put((tag, i, payload))


@reports_errors(1)
def bounded_putter(q: Any, conn: Any) -> None:
    """Fill a ``maxsize=2`` queue, check it refuses a third item, then block putting one."""
    q.put(0)
    q.put(1)
    conn.send(("full", q.full()))
    try:
        q.put_nowait(2)
    except queue.Full:
        conn.send(("nowait", "Full"))
    else:
        conn.send(("nowait", "accepted"))
    conn.send(("blocking", None))
    q.put(2)
    conn.send(("put2", None))


def joinable_worker(q: Any, marks: np.ndarray) -> None:
    """Take indices until ``None``; set ``marks[i]`` before ``task_done()`` for each."""
    while True:
        item = q.get()
        if item is None:
            q.task_done()
            return
        marks[item] = 1
        q.task_done()


def simple_echo(inq: Any, outq: Any) -> None:
    """Echo everything from ``inq`` to ``outq`` until ``None`` (echoed too)."""
    while True:
        item = inq.get()
        outq.put(item)
        if item is None:
            return


@reports_errors(0)
def pipe_duplex(conn: Any) -> None:
    """Double a received shared array in place; send back a new shared array and the view."""
    x = conn.recv()
    x *= 2
    conn.send(_shm.share(np.arange(5)))
    conn.send(x)
    conn.send(("readable", conn.readable, "writable", conn.writable))
    conn.close()


@reports_errors(0)
def pipe_send_only(w: Any) -> None:
    """Send a shared array and a marker on the write end of ``Pipe(duplex=False)``."""
    w.send(_shm.share(np.arange(6.0)))
    try:
        w.recv()
    except OSError:
        w.send("recv refused")
    else:
        w.send("recv allowed")
    w.close()


# --------------------------------------------------------------------------- SIGKILL


def put_then_block(q: Any, ready: Any, n: int, strategy: str) -> None:
    """Put ``n`` messages (a shared array and a big plain one each), signal, put one more.

    The queue has ``maxsize=n``, so the last ``put`` blocks with its handles already made
    (a ticket fd or link exists) until the parent SIGKILLs this process.
    """
    _shm.set_sharing_strategy(strategy)
    for i in range(n):
        q.put((i, _shm.share(np.full(1000, i, dtype=np.int64)), np.full(10_000, float(i))))
    ready.send(os.getpid())
    q.put((n, _shm.share(np.full(1000, n, dtype=np.int64)), np.full(10_000, float(n))))
    ready.send("unreachable")


def take_one_then_block(q: Any, conn: Any) -> None:
    """Take one message, report its checksum, then wait on ``conn`` until killed."""
    i, shared, big = q.get()
    conn.send((i, int(shared.sum()), float(big.sum()), _shm.is_shared(shared)))
    conn.recv()


# --------------------------------------------------------------------------- file_system


@reports_errors(1)
def create_send_exit(q: Any, conn: Any) -> None:
    """Create a named segment, send it, wait until the parent holds it, write, exit normally."""
    _shm.set_sharing_strategy("file_system")
    a = _shm.full(1000, 5.0)
    q.put(a)
    conn.recv()  # the parent has attached
    a[1] = 6.0
    conn.send(("written", _shm.segment_buffer_of(a).segment.name))  # type: ignore[union-attr]


@reports_errors(1)
def create_two_then_block(q: Any, conn: Any) -> None:
    """Create two named segments, send one, report both names, block until killed."""
    _shm.set_sharing_strategy("file_system")
    sent = _shm.full(100, 3.0)
    kept = _shm.full(100, 4.0)
    q.put(sent)
    names = [_shm.segment_buffer_of(x).segment.name for x in (sent, kept)]  # type: ignore[union-attr]
    conn.send(("names", names))
    conn.recv()


# --------------------------------------------------------------------------- fds, stdlib


def send_shared(q: Any, n: int, strategy: str) -> None:
    """Send ``n`` distinct shared arrays, one per message."""
    _shm.set_sharing_strategy(strategy)
    for i in range(n):
        q.put(_shm.full(16, i))


def list_fds(out: Any) -> None:
    """Report the readlink target of every fd this process has open."""
    targets = []
    for name in os.listdir("/proc/self/fd"):
        try:
            targets.append(os.readlink(f"/proc/self/fd/{name}"))
        except OSError:
            continue
    out.put(targets)


@reports_errors(1)
def stdlib_started(q: Any, out: Any, strategy: str) -> None:
    """In a child of the *stdlib* multiprocessing: use drop-in queues and shared arrays."""
    _shm.set_sharing_strategy(strategy)
    x = q.get()
    x += 1
    fresh = _shm.share(np.arange(4) * 10)
    out.put(
        (
            isinstance(q, AioshmQueue),
            _shm.is_shared(x),
            amp.get_context("spawn").Queue is not None,
            fresh,
        )
    )


@reports_errors(1)
def hold_received_pooled(q: Any, conn: Any) -> None:
    """Hold a received (pooled) array, then report whether it changed under us."""
    y = q.get()
    first = float(y[0])
    conn.send(("holding", first))
    conn.recv()  # the parent has sent another array meanwhile
    conn.send(("after", float(y.min()), float(y.max())))


def send_big_copies(q: Any, ack: Any, n: int, strategy: str) -> None:
    """Send ``n`` big non-shared arrays (pooled copies), waiting for an ack after each."""
    _shm.set_sharing_strategy(strategy)
    for i in range(n):
        try:
            q.put(np.full(20_000, float(i)))
        except BaseException:
            q.put(("error", traceback.format_exc()))
            raise
        ack.recv()


@reports_errors(1)
def receive_hold_drop(q: Any, conn: Any) -> None:
    """Receive a (recycled) array, hold it until told, drop it, then exit normally."""
    y = q.get()
    conn.send(("holding", _shm.segment_buffer_of(y).segment.name))  # type: ignore[union-attr]
    conn.recv()
    del y
    conn.send(("dropped", [s.name for s in _shm.live_segments()]))
    conn.recv()


def _memfd_and_shm_fds() -> int:
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if "memfd:aioshm" in target or "/aioshm_" in target:
            count += 1
    return count


@reports_errors(1)
def echo_then_count(inq: Any, outq: Any) -> None:
    """Echo until ``None``; then drop everything, ``trim()`` and report segment fds left."""
    high = 0
    while True:
        item = inq.get()
        if item is None:
            break
        outq.put(item)
        del item
        high = max(high, _memfd_and_shm_fds())
    _shm.trim()
    outq.put(("done", high, _memfd_and_shm_fds(), len(_shm.live_segments())))

"""Async twins of :class:`aioshm._connection.Connection` methods."""

from __future__ import annotations

import os
import select
import socket
import struct
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

from .. import _reduction
from .._exceptions import ProtocolError
from .._wire import encode_frame
from ._waits import Locks, copy_in_chunks, locks_of

if TYPE_CHECKING:
    from .._connection import Connection

__all__ = ("iterate", "poll_async", "recv_async", "recv_bytes_async", "send_async")

_DONTWAIT = int(socket.MSG_DONTWAIT)
_FAST_MAX = 16 * 1024
_PACK_I = struct.Struct("!i").pack
_POLLIN = select.POLLIN


async def _wait(conn: Connection, *, write: bool) -> None:
    """Wait until the connection's fd is ready, keeping its blocking mode as it was.

    Connections stay blocking for the sync face (children share the open file description).
    uvloop's poller (libuv) switches the description to non-blocking while it watches it, so
    it is switched back afterwards; the sync face tolerates the window in between.
    """
    fd = conn.fileno()
    try:
        if write:
            await anyio.wait_writable(fd)
        else:
            await anyio.wait_readable(fd)
    finally:
        if not os.get_blocking(fd):
            os.set_blocking(fd, True)


async def _send_payload(conn: Connection, data: Any, fds: list[int]) -> None:
    """Send one frame. Like ``loop.sock_sendall``, it returns without yielding when the kernel
    takes the whole frame at once; it waits (a checkpoint) only when the socket is full."""
    conn._check_closed()
    conn._check_writable()
    frame = encode_frame(data)
    locks = locks_of(conn)
    lock = locks.write
    await locks.backend.checkpoint_if_cancelled()
    if not lock.locked():
        # fast path: no other task of this loop is sending, and nothing below awaits
        sent = conn._send_first(frame[0], fds)
        if sent == len(frame[0]) and len(frame) == 1:
            return
    else:
        sent = -1
    async with lock:
        sent = max(sent, 0)
        while sent == 0:
            sent = conn._send_first(frame[0], fds)
            if sent == 0:
                await _wait(conn, write=True)
        rest = [memoryview(frame[0])[sent:], *(memoryview(p) for p in frame[1:])]
        await _finish_frame(conn, rest)


async def _finish_frame(conn: Connection, rest: list[memoryview]) -> None:
    """Send the rest of a frame that is partly in the kernel. It cannot be cancelled, or
    the peer would see a torn frame on a live connection."""
    if not any(len(p) for p in rest):
        return
    sock = conn._socket()
    with anyio.CancelScope(shield=True):
        for part in rest:
            while part:
                try:
                    n = sock.send(part, _DONTWAIT)
                except BlockingIOError:
                    await _wait(conn, write=True)
                    continue
                part = part[n:]


async def send_async(conn: Connection, obj: Any) -> None:
    copies: list[Any] = []
    data, fds, owned = _reduction.dumps(obj, copies)
    if not fds and not copies and len(data) <= _FAST_MAX:
        # the common case: one small frame, written whole or not at all by a single send
        conn._check_closed()
        conn._check_writable()
        locks = locks_of(conn)
        await locks.backend.checkpoint_if_cancelled()
        if not locks.write.locked():
            frame = _PACK_I(len(data)) + data
            try:
                sent = conn._socket().send(frame, _DONTWAIT)
            except BlockingIOError:
                sent = 0
            if sent == len(frame):
                return
            if sent:
                await _finish_frame(conn, [memoryview(frame)[sent:]])
                return
    try:
        await copy_in_chunks(copies)
        await _send_payload(conn, data, fds)
    finally:
        _reduction.close_owned(fds, owned)


async def send_bytes_async(
    conn: Connection, buf: Any, offset: int = 0, size: int | None = None
) -> None:
    m = memoryview(buf)
    if m.itemsize > 1:
        m = m.cast("B")
    n = m.nbytes
    if offset < 0:
        raise ValueError("offset is negative")
    if n < offset:
        raise ValueError("buffer length < offset")
    if size is None:
        size = n - offset
    elif size < 0:
        raise ValueError("size is negative")
    elif offset + size > n:
        raise ValueError("buffer length < offset + size")
    await _send_payload(conn, m[offset : offset + size], [])


def _try_frame(conn: Connection) -> tuple[bytes, list[int]] | None:
    """A complete frame if one can be had without blocking. A protocol error breaks the
    connection for good (``Connection._check_intact``), as on the blocking face."""
    conn._check_intact()
    try:
        return _try_frame_unchecked(conn)
    except ProtocolError as exc:
        conn._break(exc)
        raise


def _try_frame_unchecked(conn: Connection) -> tuple[bytes, list[int]] | None:
    try:
        while True:
            got = conn._next_frame()
            if got is not None:
                return got
            decoder = conn._decoder
            if decoder is None or (not decoder.pending_bytes and not conn._fdq):
                got = conn._fast_frame(_DONTWAIT)
                if got is not None:
                    return got
                continue
            conn._read_some(_DONTWAIT)
    except BlockingIOError:
        return None


#: A receive that finds its frame already there does not yield, like ``loop.sock_recv``;
#: but every this many such calls in a row it does, so a busy stream cannot starve the loop.
_FAIRNESS = 16


async def _wait_readable(conn: Connection, locks: Locks) -> None:
    """Wait until the connection's fd is readable (or the connection is closed). The fd sits
    in an epoll fd of the connection's own, which on asyncio stays registered with the loop
    from one wait to the next (no registration per receive); the connection's fd keeps its
    blocking mode whatever the loop, and closing the connection wakes the waiter."""
    await locks.wait_for("read", [(conn.fileno(), _POLLIN)]).wait()


async def _recv_frame(conn: Connection) -> tuple[bytes, list[int]]:
    conn._check_closed()
    conn._check_readable()
    locks = locks_of(conn)
    await locks.backend.checkpoint_if_cancelled()
    lock = locks.read
    if lock.locked():
        await lock.acquire()  # queue up (FIFO) behind the task receiving now
        tried = False
    else:
        got = _try_frame(conn)  # fast path: nothing awaits in between
        if got is not None:
            conn._eager = eager = conn._eager + 1
            if eager >= _FAIRNESS:
                conn._eager = 0
                # the frame is ours: yield to other tasks without a cancellation point
                await locks.backend.cancel_shielded_checkpoint()
            return got
        # the lock is free and nothing awaited since: taking it does not yield, so the frame
        # just tried for is still missing: wait first (a frame that came meanwhile makes the
        # wait return at once)
        lock.acquire_nowait()
        tried = True
    conn._eager = 0
    try:
        if not tried:
            got = _try_frame(conn)
            if got is not None:
                return got
        while True:
            await _wait_readable(conn, locks)
            got = _try_frame(conn)
            if got is not None:
                return got
    finally:
        lock.release()


async def recv_async(conn: Connection) -> Any:
    frame, fds = await _recv_frame(conn)
    return _reduction.loads(frame, fds)


async def recv_bytes_async(conn: Connection, maxlength: int | None = None) -> bytes:
    if maxlength is not None and maxlength < 0:
        raise ValueError("negative maxlength")
    frame, fds = await _recv_frame(conn)
    for fd in fds:
        os.close(fd)
    if maxlength is not None and len(frame) > maxlength:
        conn.close()
        raise OSError("bad message length")
    return frame


async def poll_async(conn: Connection, timeout: float | None = 0.0) -> bool:
    conn._check_closed()
    conn._check_readable()
    conn._check_intact()
    decoder = conn._decoder
    if decoder is not None and decoder.pending_bytes and decoder.want_bytes() == 0:
        await anyio.lowlevel.checkpoint()
        return True
    if timeout is not None and timeout <= 0:
        await anyio.lowlevel.checkpoint()
        return conn.poll(0)
    locks = locks_of(conn)
    async with locks.read:
        with anyio.move_on_after(timeout):
            while True:
                await _wait_readable(conn, locks)
                conn._check_closed()  # closed by another task meanwhile
                if conn._poll(0):  # a wake-up may be stale: the fd was readable a moment ago
                    return True
    return False


async def iterate(conn: Connection) -> AsyncIterator[Any]:
    """``async for msg in conn``: receive until the peer closes (EOF ends the loop)."""
    while True:
        try:
            yield await recv_async(conn)
        except EOFError:
            return
        except ProtocolError:
            raise

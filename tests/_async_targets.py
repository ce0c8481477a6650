"""Importable child targets for ``test_async_transport.py`` and ``test_async_process.py``.

Children started with spawn or forkserver import this module by name (the tests put their
directory on ``sys.path``, which children inherit). It must stay anyio-free: one test checks
that a child run through ``aioshm.multiprocessing`` never imports anyio.

Targets that must wait for the parent block on a pipe (``recv`` until the parent sends or closes
its end) or in :func:`block_forever`; none of them synchronise by sleeping.
"""

from __future__ import annotations

import faulthandler
import os
import pickle
import signal
import socket
import struct
import sys
import threading
from multiprocessing import connection as _mp_connection
from typing import Any

import numpy as np

import aioshm
from aioshm import QueueShutDown

# -------------------------------------------------------------------------- helpers


class UnpicklableError(Exception):
    """Cannot be pickled: it carries a lock."""

    def __init__(self, msg: str) -> None:
        super().__init__(msg)
        self.lock = threading.Lock()


class Unreturnable:
    """A return value that cannot be pickled (it holds a lock)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()


def block_forever() -> None:
    """Block until a signal ends this process (SIGTERM's default action does)."""
    while True:
        signal.pause()


def frame(i: int, size: int) -> bytes:
    """Message ``i`` of a numbered stream: an 8-byte header then ``size - 8`` filler bytes."""
    return struct.pack("!II", i, size) + bytes([i % 251]) * (size - 8)


def check_frame(data: bytes) -> int:
    """The number of a message made by :func:`frame`; raises if it is torn or corrupt."""
    i, size = struct.unpack("!II", data[:8])
    if len(data) != size or data[8:] != bytes([i % 251]) * (size - 8):
        raise AssertionError(f"message {i} is corrupt ({len(data)} bytes, header says {size})")
    return i


# -------------------------------------------------------------------------- process outcomes


def double(x: int) -> int:
    """Return ``2 * x``."""
    return 2 * x


def raise_value_error(msg: str) -> None:
    """Raise ``ValueError(msg)``."""
    raise ValueError(msg)


def raise_unpicklable(msg: str) -> None:
    """Raise an exception that cannot be pickled."""
    raise UnpicklableError(msg)


def return_unpicklable() -> Unreturnable:
    """Return an object that cannot be pickled."""
    return Unreturnable()


def raise_keyboard_interrupt() -> None:
    """Raise KeyboardInterrupt (a failure, not a success)."""
    raise KeyboardInterrupt


def exit_with(code: int) -> None:
    """Leave at once with ``code``, no result sent."""
    os._exit(code)


def close_fds_then_exit(conn: Any, code: int, give_up_after: float | None = None) -> None:
    """Close every inherited fd but ``conn`` (the process sentinel's write end among them), say
    so, wait for the parent's word, then ``os._exit(code)``: the sentinel fires long before the
    process exits. With ``give_up_after``, exit anyway when the parent stays silent that long
    (so a parent stuck waiting for us cannot hang a test)."""
    keep = conn.fileno()
    os.closerange(3, keep)
    os.closerange(keep + 1, 1 << 20)
    conn.send("closed")
    try:
        if conn.poll(give_up_after):
            conn.recv()
    except EOFError:
        pass
    os._exit(code)


def segfault() -> None:
    """Die of SIGSEGV."""
    faulthandler.disable()
    faulthandler._sigsegv()


def ready_then_block(conn: Any) -> None:
    """Tell the parent we are running (send our pid), then block until killed."""
    conn.send(os.getpid())
    conn.close()
    block_forever()


def wait_for_parent(conn: Any) -> str:
    """Block until the parent sends something or closes its end; return ``"released"``."""
    try:
        conn.recv()
    except EOFError:
        pass
    return "released"


def scale_and_return(arr: np.ndarray, factor: float) -> np.ndarray:
    """Multiply ``arr`` in place (a shared array: the parent sees it) and return it."""
    arr *= factor
    return arr


def make_shared(n: int, value: float) -> np.ndarray:
    """A new shared array of ``n`` float64 filled with ``value``."""
    return aioshm.full(n, value, dtype=np.float64)


def make_plain(n: int, value: float) -> np.ndarray:
    """A new plain (non-shared) array; big ones travel back as shared-memory handles."""
    return np.full(n, value, dtype=np.float64)


def anyio_modules() -> list[str]:
    """The anyio/sniffio/trio modules this child has imported (should be none)."""
    return sorted(
        m for m in sys.modules if m.split(".")[0] in ("anyio", "sniffio", "trio", "uvloop")
    )


def anyio_modules_after_work(q: Any, arr: np.ndarray) -> None:
    """Use a queue and a shared array through the sync face, then report ``anyio_modules()``."""
    arr += 1
    q.put(arr[:4])
    q.put(anyio_modules())


# -------------------------------------------------------------------------- spawn ranks


def rank_write(rank: int, arr: np.ndarray) -> int:
    """Write ``rank + 1`` into ``arr[rank]`` and return ``rank * 10``."""
    arr[rank] = rank + 1
    return rank * 10


def rank0_raises_rank1_blocks(rank: int, ready: Any) -> None:
    """Rank 1 reports it runs, then blocks forever; rank 0 waits for that, then raises."""
    if rank == 1:
        ready.put(os.getpid())
        block_forever()
    ready.get()
    raise ValueError("rank 0 failed")


def rank0_killed_rank1_blocks(rank: int, ready: Any) -> None:
    """Rank 1 reports it runs, then blocks forever; rank 0 waits for that, then SIGKILLs itself."""
    if rank == 1:
        ready.put(os.getpid())
        block_forever()
    ready.get()
    os.kill(os.getpid(), signal.SIGKILL)


def rank_ready_then_block(rank: int, ready: Any) -> None:
    """Report ``(rank, pid)``, then block forever."""
    ready.put((rank, os.getpid()))
    block_forever()


def rank_wait_for_parent(rank: int, conn: Any) -> int:
    """Block until the parent closes its end of ``conn``; return the rank."""
    try:
        conn.recv()
    except EOFError:
        pass
    return rank


def rank_return(rank: int) -> int:
    """Return the rank."""
    return rank


# -------------------------------------------------------------------------- pipes


def echo_bytes(conn: Any) -> int:
    """Echo every frame back unchanged until EOF; return the number of frames."""
    n = 0
    while True:
        try:
            data = conn.recv_bytes()
        except EOFError:
            break
        conn.send_bytes(data)
        n += 1
    conn.close()
    return n


def write_into_arrays(conn: Any) -> int:
    """Receive ``(array, value)`` pairs, write ``value`` through each array, ack; until EOF."""
    n = 0
    while True:
        try:
            arr, value = conn.recv()
        except EOFError:
            break
        arr[...] = value
        conn.send(("done", aioshm.is_shared(arr)))
        n += 1
    return n


def send_numbers_then_close(conn: Any, n: int) -> None:
    """Send ``0 .. n-1``, then close (the parent's ``async for`` sees EOF)."""
    for i in range(n):
        conn.send(i)
    conn.close()


def send_in_two_halves(
    conn: Any, ctrl: Any, payload_size: int, first: int, as_object: bool
) -> None:
    """Write one stdlib frame by hand: header + ``first`` bytes, wait for the parent, the rest.

    The payload is ``frame(7, payload_size)``, pickled when ``as_object`` (for ``recv``).
    ``ctrl`` gets ``"half"`` once the first part is in the kernel; the parent answers when it
    wants the rest.
    """
    payload = frame(7, payload_size)
    if as_object:
        payload = pickle.dumps(payload, protocol=5)
    data = struct.pack("!i", len(payload)) + payload
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    try:
        sock.setblocking(True)
        sock.sendall(data[: 4 + first])
        ctrl.send("half")
        ctrl.recv()
        sock.sendall(data[4 + first :])
    finally:
        sock.close()
        conn.close()


def send_numbered_frames(conn: Any, n: int, size: int) -> None:
    """``send_bytes(frame(i, size))`` for ``i`` in ``0 .. n-1``, then close."""
    for i in range(n):
        conn.send_bytes(frame(i, size + (i % 3) * 4093))
    conn.close()


def stdlib_echo(conn: Any) -> int:
    """Echo through a plain stdlib ``Connection`` on the same socket, until EOF."""
    std = _mp_connection.Connection(os.dup(conn.fileno()))
    conn.close()
    n = 0
    try:
        while True:
            try:
                kind, data = std.recv()
            except EOFError:
                break
            if kind == "bytes":
                std.send_bytes(std.recv_bytes())
            else:
                std.send(data)
            n += 1
    finally:
        std.close()
    return n


# -------------------------------------------------------------------------- queues


def produce(q: Any, producer: int, n: int) -> int:
    """Put ``(producer, i)`` for ``i`` in ``0 .. n-1`` with the blocking ``put``."""
    for i in range(n):
        q.put((producer, i))
    return n


def produce_then_shutdown(q: Any, n: int) -> int:
    """Put ``0 .. n-1``, then shut the queue down for every process."""
    for i in range(n):
        q.put(i)
    q.shutdown()
    return n


def get_expecting_shutdown(q: Any, ready: Any) -> str:
    """Tell the parent we are about to block in ``q.get()``; return ``"shutdown"`` when woken
    by the queue's shutdown."""
    ready.send("blocking")
    ready.close()
    try:
        item = q.get()
    except QueueShutDown:
        return "shutdown"
    return f"got {item!r}"


def get_n(q: Any, n: int) -> list[Any]:
    """``[q.get() for _ in range(n)]``."""
    return [q.get() for _ in range(n)]


def consume_with_task_done(q: Any, n: int, conn: Any) -> list[Any]:
    """Get ``n`` items; mark all but the last done, tell the parent, wait for it, finish."""
    items = [q.get() for _ in range(n)]
    for _ in range(n - 1):
        q.task_done()
    conn.send("all but one done")
    try:
        conn.recv()
    except EOFError:
        pass
    q.task_done()
    return items


def touch_pages(q_in: Any, q_out: Any) -> int:
    """Per array received: add 1 to one float32 per 4 KiB page (every page), send it back.

    Ends at ``None``. Returns the number of round trips.
    """
    n = 0
    while True:
        arr = q_in.get()
        if arr is None:
            return n
        arr[::1024] += 1
        q_out.put(arr)
        n += 1

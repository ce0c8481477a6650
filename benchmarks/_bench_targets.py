"""Child-side functions for bench_pingpong.py, bench_spawn.py and bench_ticklag.py.

They live in an importable module (``benchmarks/`` is ``sys.path[0]`` when a benchmark script
runs, and children inherit it), so that spawn, forkserver and anyio's worker processes can
unpickle them by reference. The module imports numpy on purpose: W5 measures process start
for a target whose module imports numpy (see /work/shared/BASELINE.md).

Nothing here imports aioshm, anyio or torch: the children use whatever objects the parent
passed them, through their blocking stdlib-style methods.
"""

from __future__ import annotations

import mmap
import os
import socket
import struct
import time
from typing import Any

import numpy as np

# --------------------------------------------------------------------------- W5: process start


def f(rank: int) -> float:
    """The W5 target: a tiny bit of numpy work, a small picklable result."""
    return float(np.float64(rank) + 1.0)


def stdlib_worker(rank: int, q: Any) -> None:
    """The W5 target for stdlib ``Process``: report ``(rank, f(rank))`` on a queue."""
    q.put((rank, f(rank)))


def torch_worker(rank: int, q: Any) -> None:
    """The W5 target for ``torch.multiprocessing.start_processes`` (called as fn(rank, q))."""
    q.put((rank, f(rank)))


# --------------------------------------------------------------------------- W2: ping-pong


def echo(x: Any) -> Any:
    """anyio.to_process.run_sync target: one call per round trip."""
    return x


def conn_echo(conn: Any) -> None:
    """Echo every message on a Connection (stdlib or aioshm) until ``None``."""
    recv, send = conn.recv, conn.send
    while True:
        msg = recv()
        if msg is None:
            break
        send(msg)
    conn.close()


def queue_echo(inq: Any, outq: Any) -> None:
    """Echo every item from ``inq`` onto ``outq`` until ``None``."""
    get, put = inq.get, outq.put
    while True:
        item = get()
        if item is None:
            break
        put(item)


def fd_echo(sock: Any) -> None:
    """Echo raw bytes on a socket with os.read/os.write until EOF (the W2 floor's child)."""
    fd = sock.fileno()
    read, write = os.read, os.write
    while True:
        data = read(fd, 4096)
        if not data:
            break
        write(fd, data)
    sock.close()


# --------------------------------------------------------------------------- W4: 64 MiB trips


def touch(a: np.ndarray) -> float:
    """Read one float32 per 4 KiB page."""
    return float(a.reshape(-1)[::1024].sum())


def touch_child(inq: Any, outq: Any) -> None:
    """Reply to every array with its page-touch sum until ``None``.

    Like a plain ``while True: a = q.get()`` loop, it holds the last array until the next one
    arrives.
    """
    item: Any = None
    while True:
        item = inq.get()
        if item is None:
            break
        outq.put(touch(item))
    item = None


def fd_touch_child(sock: Any) -> None:
    """The W4 floor's child: for every fd received on ``sock``, reply with the page-touch sum
    of the file it names (8 bytes); stop at EOF. A file already seen is not mapped again (its
    mapping is kept by inode, as aioshm keeps a segment it already holds)."""
    maps: dict[tuple[int, int], np.ndarray] = {}
    while True:
        msg, fds, _, _ = socket.recv_fds(sock, 16, 1)
        if not msg:
            break
        (fd,) = fds
        try:
            st = os.fstat(fd)
            a = maps.get((st.st_dev, st.st_ino))
            if a is None:
                a = maps[st.st_dev, st.st_ino] = np.frombuffer(
                    mmap.mmap(fd, st.st_size), np.float32
                )
        finally:
            os.close(fd)
        sock.sendall(struct.pack("d", touch(a)))
    maps.clear()
    sock.close()


def busy_child(sock: Any) -> None:
    """The W4 control's child: for every byte received, touch a private 64 MiB array for
    10 ms (CPU and memory busy, like a child of the other rows), then reply with one byte."""
    a = np.ones(16 << 20, np.float32)
    while sock.recv(1):
        end = time.perf_counter() + 0.01
        while time.perf_counter() < end:
            touch(a)
        sock.sendall(b"k")
    sock.close()


# --------------------------------------------------------------------------- W3: tiny tasks


def inc(x: int) -> int:
    """The W3 task: 5,000 of these on 2 workers (bench_pool.py)."""
    return x + 1


_worker_profile: Any = None


def profile_worker_start() -> None:
    """A pool ``initializer`` for bench_pool.py ``--profile``: cProfile the whole worker."""
    import cProfile

    global _worker_profile
    _worker_profile = cProfile.Profile()
    _worker_profile.enable()


def profile_worker_dump(directory: str, linger: float) -> int:
    """Write this worker's profile to ``directory/worker-<pid>.prof``; return the pid.

    ``linger`` seconds of sleep keep the worker busy so that the next dump task goes to the
    other worker.
    """
    import time

    time.sleep(linger)
    if _worker_profile is not None:
        _worker_profile.dump_stats(os.path.join(directory, f"worker-{os.getpid()}.prof"))
    return os.getpid()


async def ainc(x: int) -> int:
    """``inc`` as a coroutine function: aiomultiprocess ``Pool.map`` only takes those."""
    return x + 1


# --------------------------------------------------------------------------- P8: fan-out

_fanout: dict[str, Any] = {}


def page_touch(a: Any) -> float:
    """Read one value per 4 KiB page of a float32 array."""
    return float(np.asarray(a).reshape(-1)[::1024].sum())


def fanout_init(report: Any, release: Any) -> None:
    """Pool initializer: keep the queues the fan-out tasks report on and wait on."""
    _fanout["report"], _fanout["release"] = report, release


def _touch_and_hold(a: Any, report: Any, release: Any) -> float:
    s = page_touch(a)
    report.put((os.getpid(), time.monotonic()))
    release.get()  # hold the array until the parent has measured every process
    return s


def fanout_task(a: Any) -> float:
    """A pool task: touch every page of ``a``, report, hold it until released."""
    return _touch_and_hold(a, _fanout["report"], _fanout["release"])


def fanout_shm_task(name: str, n: int) -> float:
    """The same on a stdlib SharedMemory block attached by name."""
    from multiprocessing import shared_memory

    shm = shared_memory.SharedMemory(name=name)
    try:
        a = np.ndarray((n,), np.float32, buffer=shm.buf)
        s = _touch_and_hold(a, _fanout["report"], _fanout["release"])
        del a
    finally:
        shm.close()
    return s


def fanout_rank(rank: int, a: Any, report: Any, release: Any) -> float:
    """An ``aioshm.spawn`` rank: the same with the queues passed at start."""
    return _touch_and_hold(a, report, release)

"""Hostile peers and faults on connections and queues (issue 12, items 1-5).

Each test drives the real channel with what a broken or hostile peer can send (forged
headers, fds a frame does not announce, malformed records) or with a fault (a failed get, a
producer SIGKILLed while blocked in ``put``), and checks that the promise still holds.
"""

from __future__ import annotations

import array
import gc
import os
import pickle
import queue
import resource
import signal
import socket
import struct
import sys
import tempfile
import time
import tracemalloc
from typing import Any

import numpy as np
import pytest

import aioshm
import aioshm.multiprocessing as mp
from aioshm._connection import MAX_RECORD, _spill, _unspill
from aioshm._exceptions import FdLimitError, ProtocolError
from aioshm._queues import _pipe_size
from aioshm._shm import _segment
from aioshm._wire import FdHeader, FrameDecoder

pytestmark = pytest.mark.timeout(120)
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux fds")

# --------------------------------------------------------------------------- helpers

_RAN: list[str] = []


def _mark(tag: str) -> str:
    """Called by a pickle's reduce: proves the receiver unpickled that pickle."""
    _RAN.append(tag)
    return tag


class _Marker:
    def __init__(self, tag: str) -> None:
        self.tag = tag

    def __reduce__(self) -> tuple[Any, ...]:
        return (_mark, (self.tag,))


def _frame(payload: bytes) -> bytes:
    return struct.pack("!i", len(payload)) + payload


def _n_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _memfd(data: bytes) -> int:
    fd = os.memfd_create("test", os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd


def _raw_socket(conn: mp.connection.Connection) -> socket.socket:  # type: ignore[name-defined]
    return socket.socket(fileno=os.dup(conn.fileno()))


# --------------------------------------------------------------------------- item 1


@pytest.mark.parametrize("then", ["recv", "recv_bytes", "poll"])
@pytest.mark.parametrize(
    "bad_header",
    [struct.pack("!i", -5), struct.pack("!iQ", -1, 1 << 40)],
    ids=["negative", "escape-over-cap"],
)
def test_a_rejected_frame_breaks_the_blocking_face_for_good(bad_header: bytes, then: str) -> None:
    """After a rejected header, the following bytes (here a well-formed frame) are never
    parsed: every later call raises, on every path, until close."""
    a, b = mp.Pipe()
    _RAN.clear()
    raw = _raw_socket(a)
    try:
        raw.sendall(bad_header + _frame(pickle.dumps(_Marker("smuggled"))))
        with pytest.raises(ProtocolError):
            b.recv()
        for _ in range(2):
            with pytest.raises(ProtocolError):
                getattr(b, then)()
        assert _RAN == []
    finally:
        raw.close()
        a.close()
        b.close()


def test_a_legal_blob_over_the_cap_is_not_parsed_as_frames() -> None:
    """A peer's legal ``send_bytes`` of a blob over the receiver's cap, whose first bytes look
    like a frame: the second ``recv`` must not unpickle them (the fast path included)."""
    a, b = mp.Pipe()
    _RAN.clear()
    b._decoder = FrameDecoder(max_frame_size=4096)  # the 1 GiB cap, scaled down
    b._fdq = []
    try:
        blob = _frame(pickle.dumps(_Marker("inside-the-blob")))
        blob += b"\0" * (8192 - len(blob))  # small: the fast path must check the cap too
        a.send_bytes(blob)
        a.send("after")
        with pytest.raises(ProtocolError, match="max_frame_size"):
            b.recv()
        for _ in range(3):
            with pytest.raises(ProtocolError):
                b.recv()
        assert _RAN == []
    finally:
        a.close()
        b.close()


@pytest.mark.anyio
async def test_a_rejected_frame_breaks_the_async_face_too() -> None:
    a, b = aioshm.Pipe()
    _RAN.clear()
    raw = _raw_socket(a)
    try:
        raw.sendall(struct.pack("!i", -2) + _frame(pickle.dumps(_Marker("async"))))
        with pytest.raises(ProtocolError):
            await b.recv_async()
        with pytest.raises(ProtocolError):
            await b.recv_async()
        with pytest.raises(ProtocolError):
            await b.poll_async(0)
        with pytest.raises(ProtocolError):
            b.recv()  # and the blocking face agrees
        assert _RAN == []
    finally:
        raw.close()
        a.close()
        b.close()


# --------------------------------------------------------------------------- item 3


def _send_with_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])


@linux_only
def test_unannounced_fds_are_closed_and_never_given_to_the_next_frame() -> None:
    a, b = mp.Pipe()
    raw = _raw_socket(a)
    stray = _memfd(b"stray contents")
    try:
        base = _n_fds()
        _send_with_fds(raw, _frame(pickle.dumps("plain")), [stray])
        os.close(stray)
        with pytest.raises(ProtocolError, match="announces none"):
            b.recv()
        assert _n_fds() == base - 1  # the stray fd arrived and was closed
        arr = aioshm.share(np.arange(1000, dtype=np.int64))
        a.send(arr)  # announces one fd: it must get its own, not the stray one
        got = b.recv()
        assert np.array_equal(got, np.arange(1000))
        a.send("still in step")
        assert b.recv() == "still in step"
        del got, arr
    finally:
        raw.close()
        a.close()
        b.close()


@linux_only
def test_more_fds_than_announced_is_a_protocol_error() -> None:
    a, b = mp.Pipe()
    raw = _raw_socket(a)
    fds = [_memfd(b"x"), _memfd(b"y")]
    try:
        payload = FdHeader(1).encode() + pickle.dumps(None)
        _send_with_fds(raw, _frame(payload), fds)
        with pytest.raises(ProtocolError, match="announced 1 fds but 2 arrived"):
            b.recv()
        a.send(7)
        assert b.recv() == 7
    finally:
        for fd in fds:
            os.close(fd)
        raw.close()
        a.close()
        b.close()


@linux_only
@pytest.mark.parametrize("receive", ["recv", "recv_bytes"])
def test_a_flood_of_unannounced_fds_leaves_no_fd_open(receive: str) -> None:
    a, b = mp.Pipe()
    raw = _raw_socket(a)
    stray = _memfd(b"flood")
    try:
        base = _n_fds()
        for i in range(2000):
            _send_with_fds(raw, _frame(pickle.dumps(i)), [stray])
            if receive == "recv":
                with pytest.raises(ProtocolError):
                    b.recv()
            else:
                assert pickle.loads(b.recv_bytes()) == i
        assert _n_fds() == base
    finally:
        os.close(stray)
        raw.close()
        a.close()
        b.close()


@linux_only
def test_a_queue_record_with_unannounced_fds_is_a_protocol_error() -> None:
    q = mp.Queue()
    stray = _memfd(b"stray")
    try:
        q.put("warm-up")  # claims this process's slot of the counts (one fd)
        assert q.get(timeout=10) == "warm-up"
        base = _n_fds()
        assert q._try_put(pickle.dumps("x"), [stray]) == 0
        with pytest.raises(ProtocolError):
            q.get(timeout=10)
        assert _n_fds() == base
        q.put("next")
        assert q.get(timeout=10) == "next"
    finally:
        os.close(stray)
        q.close()


# --------------------------------------------------------------------------- item 2


def _explode() -> None:
    raise ValueError("rejected after the first fd was adopted")


class _Explodes:
    def __reduce__(self) -> tuple[Any, ...]:
        return (_explode, ())


def _send_rejected(send: Any, n: int) -> None:
    # non-shared arrays over the threshold travel in pooled segments, which the receiver
    # keeps mapped (holding their fds) after the arrays die
    arrays = [np.full(32768, i, dtype=np.int64) for i in range(n)]
    send((*arrays, _Explodes(), "pad" * 30000))  # over MAX_RECORD: the spilled path too
    send("after")


@linux_only
@pytest.mark.parametrize("kind", ["pipe", "queue", "simplequeue"])
def test_a_rejected_message_never_closes_an_fd_twice(kind: str) -> None:
    """The first arrays' fds go to live (pooled) segments, then the message is rejected:
    the error path must not close those fds again, or the segments later close whatever
    unrelated file got their numbers (here a Pipe, which must survive)."""
    if aioshm.get_sharing_strategy() != "file_descriptor":
        pytest.skip("needs fd-carried segments")
    ctx = mp.get_context("fork")
    if kind == "pipe":
        a, b = ctx.Pipe()
        send, recv, closers = a.send, b.recv, [a.close, b.close]
    elif kind == "queue":
        q = ctx.Queue()
        send, recv, closers = q.put, (lambda: q.get(timeout=30)), [q.close]
    else:
        sq = ctx.SimpleQueue()
        send, recv, closers = sq.put, sq.get, [sq.close]
    try:
        p = ctx.Process(target=_send_rejected, args=(send, 3))
        p.start()
        with pytest.raises(ValueError, match="rejected after"):
            recv()
        assert recv() == "after"
        p.join(30)
        assert p.exitcode == 0
        gc.collect()
        c, d = mp.Pipe()  # takes the lowest free fd numbers
        try:
            _segment.trim()  # the rejected message's idle segments close now
            c.send("unrelated")
            assert d.recv() == "unrelated"
            d.send_bytes(b"back")
            assert c.recv_bytes() == b"back"
        finally:
            c.close()
            d.close()
    finally:
        for close in closers:
            close()


# --------------------------------------------------------------------------- item 4


def _capacity_is_exact(q: Any, maxsize: int) -> None:
    """The queue is empty, says so, and takes exactly ``maxsize`` items."""
    with pytest.raises(queue.Empty):
        q.get_nowait()
    assert q.qsize() == 0
    for i in range(maxsize):
        q.put_nowait(i)
    assert q.qsize() == maxsize
    with pytest.raises(queue.Full):
        q.put_nowait("one too many")
    assert [q.get_nowait() for _ in range(maxsize)] == list(range(maxsize))
    assert q.qsize() == 0


def _forged_records() -> dict[str, tuple[bytes, Any]]:
    def directory() -> list[int]:
        return [os.open(tempfile.gettempdir(), os.O_RDONLY | os.O_DIRECTORY)]

    def regular_file() -> list[int]:
        with tempfile.TemporaryFile() as f:
            f.write(b"x" * 10)
            f.flush()
            return [os.dup(f.fileno())]

    def short_memfd() -> list[int]:
        return [_memfd(b"x" * 10)]

    spill_10 = FdHeader(0, 10).encode()
    return {
        "empty": (b"", list),
        "oversized": (b"\x80" * (MAX_RECORD + 100), list),
        "directory-spill": (spill_10, directory),
        "regular-file-spill": (spill_10, regular_file),
        "size-mismatch-spill": (FdHeader(0, 1 << 30).encode(), short_memfd),
        "spill-without-fd": (spill_10, list),
        "truncated-header": (b"AIOX\0\0", list),
        "bad-pickle": (b"\x80\x05garbage", list),
    }


@linux_only
@pytest.mark.parametrize("name", list(_forged_records()))
def test_a_failed_get_keeps_capacity_and_count(name: str) -> None:
    """A get that consumed a record it cannot use raises ProtocolError (or the pickle's own
    error) and keeps the queue's capacity and ``qsize()`` exact."""
    record, make_fds = _forged_records()[name]
    q = mp.Queue(maxsize=5)
    fds: list[int] = make_fds()
    try:
        q.put("before")
        assert q._try_put(record, fds) == 0  # a peer's put of a malformed record
        for fd in fds:
            os.close(fd)
        assert q.qsize() == 2
        assert q.get(timeout=10) == "before"
        tracemalloc.start()
        try:
            with pytest.raises((ProtocolError, pickle.UnpicklingError)):
                q.get(timeout=10)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20  # the 1 GiB claim allocated nothing
        _capacity_is_exact(q, 5)
    finally:
        q.close()


@linux_only
def test_a_get_at_the_fd_limit_keeps_capacity() -> None:
    """FdLimitError (the kernel dropped the record's fds) still counts the record."""
    ctx = mp.get_context("fork")
    q = ctx.Queue(maxsize=4)
    try:
        q.put(aioshm.share(np.arange(10)))
        p = ctx.Process(target=_get_at_fd_limit, args=(q,))
        p.start()
        p.join(60)
        assert p.exitcode == 0
        _capacity_is_exact(q, 4)
    finally:
        q.close()


def _get_at_fd_limit(q: Any) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    hog = []
    lowest = os.open("/dev/null", os.O_RDONLY)
    os.close(lowest)
    while True:  # fill every hole below the limit we are about to set
        fd = os.open("/dev/null", os.O_RDONLY)
        hog.append(fd)
        if fd > lowest + 64:
            break
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(hog) + 1, hard))
    try:
        try:
            q.get(timeout=10)
        except FdLimitError:
            pass
        else:
            raise AssertionError("expected FdLimitError")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for fd in hog:
            os.close(fd)
    if q.qsize() != 0:
        raise AssertionError(f"qsize {q.qsize()} after the failed get")


def _put_big(q: Any) -> None:
    q.put(b"x" * 60_000)


def _blocked_in_poll(pid: int, deadline: float) -> None:
    """Wait until ``pid`` sits in poll/ppoll (its put is blocked)."""
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/syscall") as f:
                nr = f.read().split()[0]
        except (OSError, IndexError):
            nr = ""
        if nr in ("7", "271"):  # poll, ppoll (x86-64)
            return
        os.sched_yield()
    raise AssertionError("the producer never blocked")


@linux_only
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="syscall numbers of x86-64")
def test_producers_killed_while_blocked_in_put_take_no_capacity() -> None:
    """Items big enough that the socket buffer fills before ``maxsize``: each producer blocks
    in ``put`` (on the socket, formerly holding a capacity token) and is SIGKILLed there."""
    ctx = mp.get_context("fork")
    q = ctx.Queue(maxsize=1000)
    try:
        filled = 0
        with pytest.raises(queue.Full):
            while True:
                q.put(b"x" * 60_000, timeout=0.5)
                filled += 1
        for _ in range(5):
            p = ctx.Process(target=_put_big, args=(q,))
            p.start()
            _blocked_in_poll(p.pid, time.monotonic() + 30)
            os.kill(p.pid, signal.SIGKILL)
            p.join(30)
        assert q.qsize() == filled
        for _ in range(filled):
            q.get(timeout=10)
        assert _pipe_size(q._slots_r) == 1000
        _capacity_is_exact(q, 1000)
    finally:
        q.close()


@linux_only
def test_a_process_killed_inside_a_put_window_is_repaired() -> None:
    """The narrowest case: killed after taking a token and counting the put, before sending
    (simulated by entering the window and dying in it, in a forked child)."""
    ctx = mp.get_context("fork")
    q = ctx.Queue(maxsize=8)
    try:
        q.put("kept")
        p = ctx.Process(target=_die_inside_a_window, args=(q,))
        p.start()
        p.join(30)
        assert p.exitcode == -signal.SIGKILL
        assert q.get(timeout=10) == "kept"
        _capacity_is_exact(q, 8)
    finally:
        q.close()


def _die_inside_a_window(q: Any) -> None:
    q._counts.enter()
    assert q._try_take_slot()
    q._counts.put_done()
    os.kill(os.getpid(), signal.SIGKILL)


@linux_only
def test_a_consumer_killed_inside_a_get_window_is_repaired() -> None:
    ctx = mp.get_context("fork")
    q = ctx.Queue(maxsize=8)
    try:
        q.put("lost with the consumer")
        q.put("kept")
        p = ctx.Process(target=_receive_and_die, args=(q,))
        p.start()
        p.join(30)
        assert p.exitcode == -signal.SIGKILL
        assert q.get(timeout=10) == "kept"
        _capacity_is_exact(q, 8)
    finally:
        q.close()


def _receive_and_die(q: Any) -> None:
    q._counts.enter()
    q._reader.recv_record(10)
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.anyio
async def test_put_async_timing_out_on_a_full_socket_keeps_capacity() -> None:
    q = aioshm.Queue(maxsize=1000)
    try:
        filled = 0
        with pytest.raises(queue.Full):
            while True:
                await q.put_async(b"x" * 60_000, timeout=0.3)
                filled += 1
        for _ in range(filled):
            await q.get_async(timeout=10)
        _capacity_is_exact(q, 1000)
    finally:
        q.close()


# --------------------------------------------------------------------------- item 5


def test_unspill_reads_in_chunks() -> None:
    data = os.urandom(100_003)
    fd = _spill(data)
    try:
        assert bytes(_unspill(fd, len(data), chunk=4093)) == data
    finally:
        os.close(fd)


@linux_only
def test_unspill_checks_the_real_size_before_allocating() -> None:
    fd = _memfd(b"tiny")
    try:
        tracemalloc.start()
        try:
            with pytest.raises(ProtocolError, match="header says"):
                _unspill(fd, 64 << 30)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20
    finally:
        os.close(fd)


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@linux_only
@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(_mem_available() < 14 << 30, reason="needs ~8 GiB free for a 2 GiB item")
def test_an_item_whose_pickle_is_over_2_gib_crosses_a_queue() -> None:
    n = 0x7FFFF000 + (1 << 20)  # just over what one read returns
    q = mp.Queue()
    try:
        item = bytearray(n)
        item[0], item[-1], item[n // 2] = 1, 2, 3
        q.put(item)
        del item
        got = q.get(timeout=300)
        assert len(got) == n and (got[0], got[-1], got[n // 2]) == (1, 2, 3)
        del got
    finally:
        q.close()


def test_an_empty_record_on_a_simple_queue_is_a_protocol_error() -> None:
    sq = mp.SimpleQueue()
    try:
        sq._writer.send_record(b"", [])
        with pytest.raises(ProtocolError, match="empty record"):
            sq.get()
        sq.put("next")
        assert sq.get() == "next"
    finally:
        sq.close()


@pytest.mark.anyio
async def test_an_empty_record_on_a_simple_queue_is_a_protocol_error_async() -> None:
    sq = aioshm.SimpleQueue()
    try:
        sq._writer.send_record(b"", [])
        with pytest.raises(ProtocolError, match="empty record"):
            await sq.get_async()
        await sq.put_async("next")
        assert await sq.get_async() == "next"
    finally:
        sq.close()

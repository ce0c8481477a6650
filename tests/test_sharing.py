"""Sharing ndarrays between processes through the drop-in ``aioshm.multiprocessing``.

A port of the behaviours of torch's ``test/test_multiprocessing.py`` (features.md §1.7) plus
reliability.md §5 rows A5/A6, B1-B4, C1/C6, run for both sharing strategies under spawn,
forkserver and (where it applies) fork:

* writes through received arrays and strided views are seen by the sender;
* an array received twice, or several views of one buffer in one message, map once;
* ``Pool.map`` over shared rows, process arguments, empty/0-d arrays and every dtype family;
* queue semantics across processes (FIFO per producer, ``maxsize``, ``JoinableQueue``,
  ``SimpleQueue``, ``Pipe``);
* SIGKILL of a sender or receiver leaves no segment and no fd behind; named segments outlive a
  creator that exits, and only orphans are swept; received fds stay out of later children;
* a child of the *stdlib* ``multiprocessing`` can use drop-in queues.

The sharing strategy is per process: the ``strategy`` fixture sets the parent's, and children
that create arrays are told which one to use. Children report through queues and pipes; no
test synchronises by sleeping.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import queue
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from multiprocessing import forkserver, resource_tracker
from pathlib import Path
from typing import Any

import numpy as np
import pytest

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

import _sharing_targets as targets

import aioshm.multiprocessing as amp
from aioshm import _shm
from aioshm._queues import Queue as AioshmQueue

STRATEGIES = ["file_descriptor", "file_system"]
METHODS = ["spawn", "forkserver", "fork"]
NO_FORK = ["spawn", "forkserver"]
WAIT = 30.0  # safety net for a report that never comes (a child crashed); never for sync


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", params=METHODS)
def method(request: pytest.FixtureRequest) -> str:
    """Each start method in turn (module-scoped, so the pools are one per method)."""
    value: str = request.param
    return value


def drop_in_context(method: str) -> Any:
    """The drop-in context for ``method``, with the stdlib's session-long helpers started.

    The resource tracker (spawn, forkserver) and the fork server start lazily and keep a pipe
    open in this process; starting them first keeps them out of the tests' fd baselines.
    """
    if method in ("spawn", "forkserver"):
        resource_tracker.ensure_running()
    if method == "forkserver":
        forkserver.ensure_running()
    return amp.get_context(method)


@pytest.fixture
def ctx(method: str) -> Any:
    """The drop-in context for ``method``."""
    return drop_in_context(method)


@pytest.fixture(params=STRATEGIES)
def strategy(request: pytest.FixtureRequest) -> Iterator[str]:
    """Set this process's sharing strategy for the test; restored afterwards."""
    old = _shm.get_sharing_strategy()
    _shm.set_sharing_strategy(request.param)
    try:
        yield request.param
    finally:
        _shm.set_sharing_strategy(old)


class Children:
    """Starts children and, at teardown, kills and joins whatever is still running."""

    def __init__(self) -> None:
        self.started: list[Any] = []

    def start(self, context: Any, target: Callable[..., Any], *args: Any) -> Any:
        proc = context.Process(target=target, args=args, daemon=True)
        proc.start()
        self.started.append(proc)
        return proc

    def finish(self) -> None:
        for proc in self.started:
            try:
                if proc.is_alive():
                    proc.kill()
                proc.join(timeout=10)
                proc.close()  # releases the sentinel fd now, not at garbage collection
            except ValueError:  # already closed by the test
                continue
        self.started.clear()


@pytest.fixture
def children() -> Iterator[Children]:
    """A :class:`Children`; every child is killed (if needed) and joined in ``finally``."""
    kids = Children()
    try:
        yield kids
    finally:
        kids.finish()


@pytest.fixture(scope="module")
def pool(method: str) -> Iterator[Any]:
    """One ``Pool(2)`` per start method, shared by the module's pool tests."""
    p = amp.get_context(method).Pool(2)
    try:
        yield p
    finally:
        p.terminate()
        p.join()
        _shm.trim()
        _shm.cleanup_orphans()


# --------------------------------------------------------------------------- helpers


def get(q: Any, proc: Any = None, timeout: float = WAIT) -> Any:
    """``q.get`` with a safety timeout; a child's error report fails the test with its text."""
    try:
        item = q.get(timeout=timeout)
    except queue.Empty:
        code = proc.exitcode if proc is not None else None
        pytest.fail(f"no report within {timeout:g} s (child exit code {code})")
    if isinstance(item, tuple) and len(item) == 2 and item[0] == "error":
        pytest.fail(f"child failed:\n{item[1]}")
    return item


def recv(conn: Any, timeout: float = WAIT) -> Any:
    """``conn.recv`` with a safety timeout and the same error-report handling as :func:`get`."""
    if not conn.poll(timeout):
        pytest.fail(f"no message within {timeout:g} s")
    item = conn.recv()
    if isinstance(item, tuple) and len(item) == 2 and item[0] == "error":
        pytest.fail(f"child failed:\n{item[1]}")
    return item


def join_ok(proc: Any, timeout: float = WAIT) -> None:
    """Join ``proc`` and assert it exited with code 0."""
    proc.join(timeout)
    assert proc.exitcode == 0, f"child exit code {proc.exitcode}"


def kill_and_reap(proc: Any) -> None:
    """SIGKILL ``proc`` and join it (multiprocessing must reap it to learn the exit code)."""
    proc.kill()
    proc.join(WAIT)
    assert proc.exitcode == -9


def shm_entries() -> set[str]:
    """aioshm entries in the named-segment directory."""
    return {n for n in os.listdir(_shm.shm_dir()) if n.startswith("aioshm")}


def fd_kinds() -> Counter[str]:
    """This process's open fds counted by kind (memfd, socket, pipe, shm, file)."""
    kinds: Counter[str] = Counter()
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith(("/memfd:", "memfd:")):
            kinds["memfd"] += 1
        elif target.startswith(_shm.shm_dir().rstrip("/") + "/"):
            kinds["shm"] += 1
        elif ":" in target:
            kinds[target.split(":", 1)[0]] += 1
        else:
            kinds["file"] += 1
    return kinds


def same_mapping(x: np.ndarray, y: np.ndarray) -> bool:
    """True if both arrays are views of one :class:`SegmentBuffer` in this process."""
    bx = _shm.segment_buffer_of(x)
    return bx is not None and bx is _shm.segment_buffer_of(y)


# --------------------------------------------------------------------------- views


@pytest.mark.timeout(60)
def test_child_writes_through_strided_views(ctx: Any, strategy: str, children: Children) -> None:
    """A child writes into a received array, into ``a[:, 1]`` and into ``a[::-1]``: all seen."""
    a = _shm.zeros((4, 3))
    q, out = ctx.Queue(), ctx.Queue()
    proc = children.start(ctx, targets.write_views, q, out)
    q.put(a)
    q.put(a[:, 1])
    q.put(a[::-1])
    report = get(out, proc)
    join_ok(proc)
    assert report["shared"] == [True, True, True]
    assert report["col_strides"] == a[:, 1].strides
    assert report["rev_strides"] == a[::-1].strides
    expected = np.zeros((4, 3))
    expected[0, 0] = 1
    expected[:, 1] = 7
    expected[-1, 0] = 9
    np.testing.assert_array_equal(a, expected)


@pytest.mark.timeout(60)
def test_same_array_twice_maps_once(ctx: Any, strategy: str, children: Children) -> None:
    """An array received in two messages arrives as two views of one mapping."""
    a = _shm.full((8,), 2.5)
    q, out = ctx.Queue(), ctx.Queue()
    proc = children.start(ctx, targets.receive_twice, q, out)
    q.put(a)
    q.put(a)
    report = get(out, proc)
    join_ok(proc)
    assert report["both_shared"]
    assert report["same_buffer"], "the second receive mapped the segment again"
    assert report["same_ptr"]
    if ctx.get_start_method() != "fork":  # a fork child also inherits the parent's mappings
        assert report["mapped"] == 1


@pytest.mark.timeout(60)
def test_views_in_one_message_share_a_mapping(ctx: Any, strategy: str, children: Children) -> None:
    """``[a, a[2], a[:, 1]]`` in one message arrive as views of one mapping, offsets intact."""
    a = _shm.zeros((5, 3))
    q, out = ctx.Queue(), ctx.Queue()
    proc = children.start(ctx, targets.receive_views_in_one_message, q, out)
    q.put([a, a[2], a[:, 1]])
    report = get(out, proc)
    join_ok(proc)
    assert report["one_buffer"]
    assert report["row_offset"] == 2 * a.strides[0]
    assert report["col_offset"] == a.strides[1]
    assert report["col_strides"] == (a.strides[0],)
    assert report["row_sees_write"] == 42
    assert report["col_sees_write"] == 42
    assert a[2, 1] == 42


@pytest.mark.timeout(60)
def test_round_trip_returns_to_the_same_mapping(
    ctx: Any, strategy: str, children: Children
) -> None:
    """A shared array sent to a child and echoed back is a view of the parent's own mapping."""
    a = _shm.full((3, 4), 1.5)
    inq, outq = ctx.SimpleQueue(), ctx.SimpleQueue()
    proc = children.start(ctx, targets.simple_echo, inq, outq)
    inq.put(a[1:])
    back = outq.get()
    inq.put(None)
    assert outq.get() is None
    join_ok(proc)
    assert same_mapping(back, a)
    assert back.ctypes.data == a[1:].ctypes.data
    back[0, 0] = -1
    assert a[1, 0] == -1


# --------------------------------------------------------------------------- pool


def _check_pool_results(results: list[Any], a: np.ndarray, strategy: str) -> None:
    for i, (doubled, big, was_shared) in enumerate(results):
        assert was_shared, "the worker received a copy, not the shared row"
        np.testing.assert_array_equal(a[i], np.full(1000, i + 1.0))
        assert _shm.is_shared(doubled)
        np.testing.assert_array_equal(doubled, np.full(1000, 2.0 * (i + 1)))
        assert not same_mapping(doubled, a)
        assert _shm.segment_buffer_of(doubled).segment.kind == strategy  # type: ignore[union-attr]
        assert _shm.is_shared(big), "a >= 64 KiB result should arrive through a segment"
        np.testing.assert_array_equal(big, np.full(10_000, float(i + 1)))


@pytest.mark.timeout(60)
def test_pool_map_in_place_and_new_arrays(pool: Any, strategy: str) -> None:
    """``Pool.map``: rows mutated in place are seen here; returned arrays are shared copies."""
    a = _shm.zeros((4, 1000))
    results: list[Any] | None = None
    try:
        results = pool.map(targets.pool_task, [(strategy, a[i], i + 1) for i in range(4)])
        _check_pool_results(results, a, strategy)
        # a second round on the same workers: their recycled segments are reused
        results = pool.map(targets.pool_task, [(strategy, a[i], 1) for i in range(4)])
        np.testing.assert_array_equal(a, np.arange(2.0, 6.0)[:, None] * np.ones(1000))
    finally:
        del results
        gc.collect()
        _shm.trim()


# --------------------------------------------------------------------------- process arguments


@pytest.mark.timeout(60)
def test_process_args_are_shared(ctx: Any, strategy: str, children: Children) -> None:
    """A shared array (and a strided view) given at ``Process`` construction is shared."""
    a = _shm.zeros(6)
    proc = children.start(ctx, targets.add_three, a, a[::2])
    join_ok(proc)
    np.testing.assert_array_equal(a, [13, 3, 13, 3, 13, 3])


# --------------------------------------------------------------------------- dtypes and shapes


def _dtype_cases() -> list[tuple[str, np.ndarray, Any]]:
    structured = np.dtype([("x", "<i4"), ("y", "<f8", (2,)), ("s", "S3")])
    return [
        ("bool", np.array([True, False, True]), np.bool_(False)),
        ("int", np.array([-3, 0, 7], dtype=np.int16), np.int16(-5)),
        ("int-be", np.array([1, 2, 3], dtype=">i4"), np.array(9, dtype=">i4")),
        ("uint", np.array([0, 2**32 - 1], dtype=np.uint32), np.uint32(12)),
        ("float", np.array([[0.5, -1.0], [np.inf, np.nan]], dtype=np.float32), np.float32(3)),
        ("complex", np.array([1 + 2j, -3j]), np.complex128(4 - 1j)),
        (
            "datetime",
            np.array(["2020-01-01T00:00", "NaT"], dtype="datetime64[ns]"),
            np.datetime64("1999-12-31", "ns"),
        ),
        ("timedelta", np.array([1, -2], dtype="timedelta64[s]"), np.timedelta64(5, "s")),
        ("unicode", np.array(["héllo", "", "wörld"]), np.str_("ab")),
        ("bytes", np.array([b"ab", b"\x00z"]), np.bytes_(b"q")),
        (
            "structured",
            np.array([(1, (2.0, 3.0), b"abc"), (-4, (5.0, 6.0), b"")], dtype=structured),
            np.array((7, (8.0, 9.0), b"xyz"), dtype=structured),
        ),
        ("empty", np.zeros((0, 3)), None),
        ("empty-int", np.zeros((2, 0), dtype=np.int8), None),
        ("0-d", np.array(3.25), np.float64(-1)),
        ("0-d-int", np.array(17, dtype=np.int64), np.int64(18)),
        ("fortran", np.asfortranarray(np.arange(12.0).reshape(3, 4)), np.float64(0.5)),
    ]


@pytest.mark.timeout(60)
def test_dtype_families_and_shapes(ctx: Any, strategy: str, children: Children) -> None:
    """Shared arrays of every dtype family, empty and 0-d, arrive intact and stay shared."""
    cases = _dtype_cases()
    shared = [_shm.share(arr) for _, arr, _ in cases]
    before = [x.tobytes() for x in shared]
    big = np.arange(20_000.0)  # not shared, >= 64 KiB: travels as a copy in a pooled segment
    q, out = ctx.Queue(), ctx.Queue()
    proc = children.start(ctx, targets.echo_and_fill, q, out)
    back: list[Any] | None = None
    try:
        q.put([*((x, fill) for x, (_, _, fill) in zip(shared, cases, strict=True)), (big, -1.0)])
        described, back = get(out, proc)
        join_ok(proc)
        for (name, arr, fill), x, raw, (was_shared, dtype, shape, data), y in zip(
            cases, shared, before, described, back, strict=False
        ):
            assert was_shared, name
            assert dtype == arr.dtype, name
            assert shape == arr.shape, name
            assert data == raw, f"{name}: the child saw different bytes"
            assert y.dtype == arr.dtype and y.shape == arr.shape, name
            assert _shm.is_shared(y), name
            assert same_mapping(y, x), f"{name}: the echo is not a view of our mapping"
            if fill is not None:
                expected = np.empty_like(arr)
                expected[...] = fill
                assert x.tobytes() == expected.tobytes(), f"{name}: the child's write is lost"
        fortran = shared[-1]
        assert fortran.flags.f_contiguous and not fortran.flags.c_contiguous
        big_seen = described[-1]
        assert big_seen[0], "a big non-shared array should travel through a segment"
        assert big_seen[3] == big.tobytes()
        np.testing.assert_array_equal(big, np.arange(20_000.0))  # value semantics
        np.testing.assert_array_equal(back[-1], np.full(20_000, -1.0))
        assert not same_mapping(back[-1], big)
    finally:
        del back
        gc.collect()
        _shm.trim()


# --------------------------------------------------------------------------- queue semantics


@pytest.mark.timeout(60)
def test_two_producers_one_consumer(ctx: Any, strategy: str, children: Children) -> None:
    """Two producers' numbered messages all arrive once, in order per producer."""
    n = 300
    q = ctx.Queue()
    procs = [children.start(ctx, targets.produce, q, tag, n, strategy) for tag in (0, 1)]
    seen: dict[int, list[int]] = {0: [], 1: []}
    for _ in range(2 * n):
        tag, i, payload = get(q)
        seen[tag].append(i)
        if payload is not None:
            assert _shm.is_shared(payload)
            np.testing.assert_array_equal(payload, [tag, i])
    for proc in procs:
        join_ok(proc)
    assert seen == {0: list(range(n)), 1: list(range(n))}
    assert q.empty()
    with pytest.raises(queue.Empty):
        q.get_nowait()


@pytest.mark.timeout(60)
def test_bounded_put_blocks_until_get(ctx: Any, children: Children) -> None:
    """``Queue(maxsize=2)``: a third ``put`` blocks in the child until the parent ``get``s."""
    q = ctx.Queue(maxsize=2)
    a, b = ctx.Pipe()
    proc = children.start(ctx, targets.bounded_putter, q, b)
    assert recv(a) == ("full", True)
    assert recv(a) == ("nowait", "Full")
    assert recv(a) == ("blocking", None)
    assert q.qsize() == 2 and q.full()
    # the child is inside the blocking put: it cannot report until a slot frees up
    assert not a.poll(0.2)
    assert q.get(timeout=WAIT) == 0
    assert recv(a) == ("put2", None)
    assert [q.get(timeout=WAIT), q.get(timeout=WAIT)] == [1, 2]
    join_ok(proc)


@pytest.mark.timeout(60)
def test_joinable_queue_join_waits_for_task_done(ctx: Any, children: Children) -> None:
    """``JoinableQueue.join`` returns only after a child marked every item done."""
    n = 50
    q = ctx.JoinableQueue()
    marks = _shm.zeros(n, dtype=np.int8)
    proc = children.start(ctx, targets.joinable_worker, q, marks)
    for i in range(n):
        q.put(i)
    q.put(None)
    q.join()
    assert marks.all(), "join() returned before every task was done"
    join_ok(proc)
    with pytest.raises(ValueError, match="too many times"):
        q.task_done()


@pytest.mark.timeout(60)
def test_simple_queue(ctx: Any, strategy: str, children: Children) -> None:
    """``SimpleQueue`` across processes: FIFO, ``empty()``, shared arrays by handle."""
    inq, outq = ctx.SimpleQueue(), ctx.SimpleQueue()
    assert inq.empty() and outq.empty()
    proc = children.start(ctx, targets.simple_echo, inq, outq)
    a = _shm.share(np.arange(3.0))
    items = ["x", 1, {"k": (2, 3)}, a, np.arange(4)]
    for item in items:
        inq.put(item)
    inq.put(None)
    got = [outq.get() for _ in range(len(items) + 1)]
    join_ok(proc)
    assert got[:3] == items[:3]
    assert same_mapping(got[3], a)
    np.testing.assert_array_equal(got[4], np.arange(4))
    assert got[5] is None
    assert outq.empty()
    inq.close()
    outq.close()


@pytest.mark.timeout(60)
def test_pipe_duplex(ctx: Any, strategy: str, children: Children) -> None:
    """A duplex ``Pipe`` carries shared arrays both ways; in-place writes are shared."""
    a, b = ctx.Pipe()
    proc = children.start(ctx, targets.pipe_duplex, b)
    b.close()  # the child's copy is the only other end now: its exit means EOF
    x = _shm.full(4, 3.0)
    a.send(x)
    fresh = recv(a)
    view = recv(a)
    assert recv(a) == ("readable", True, "writable", True)
    join_ok(proc)
    np.testing.assert_array_equal(x, [6.0] * 4)
    assert _shm.is_shared(fresh)
    np.testing.assert_array_equal(fresh, np.arange(5))
    assert same_mapping(view, x)
    with pytest.raises(EOFError):
        a.recv()
    a.close()


@pytest.mark.timeout(60)
def test_pipe_simplex(ctx: Any, strategy: str, children: Children) -> None:
    """``Pipe(duplex=False)``: the read end only reads, the write end only writes."""
    r, w = ctx.Pipe(duplex=False)
    assert r.readable and not r.writable
    assert w.writable and not w.readable
    proc = children.start(ctx, targets.pipe_send_only, w)
    w.close()
    x = recv(r)
    assert _shm.is_shared(x)
    np.testing.assert_array_equal(x, np.arange(6.0))
    assert recv(r) == "recv refused"
    join_ok(proc)
    with pytest.raises(OSError):
        r.send("nope")
    with pytest.raises(EOFError):
        r.recv()
    r.close()


@pytest.mark.timeout(60)
def test_round_trip_traffic_returns_to_baseline(
    ctx: Any, strategy: str, children: Children
) -> None:
    """B1/C1 (short): 400 arrays of 1-256 KiB round trip; segments and fds stay bounded.

    Every third message is a fresh shared array, the rest are plain arrays (copied into
    recycled segments from 64 KiB up). Checksums match, the parent's segment fds and
    named-segment entries stay under a small bound during the run, and both processes are
    back to zero segment fds after ``trim()``.
    """
    n, bound = 400, 16
    fds0, shm0 = fd_kinds(), shm_entries()
    rng = np.random.default_rng(1234)
    inq, outq = ctx.Queue(), ctx.Queue()
    proc = children.start(ctx, targets.echo_then_count, inq, outq)
    high = 0
    try:
        for i in range(n):
            size = int(rng.integers(128, 32 * 1024))  # float64: 1 KiB - 256 KiB
            arr = np.full(size, float(i))
            if i % 3 == 0:
                arr = _shm.share(arr)
            inq.put(arr)
            back = get(outq, proc)
            assert back.shape == (size,) and back[0] == i and back[-1] == i
            assert _shm.is_shared(back) == (i % 3 == 0 or arr.nbytes >= 64 * 1024)
            del arr, back
            if i % 50 == 0:
                now = fd_kinds()
                high = max(high, now["memfd"] - fds0["memfd"], len(shm_entries() - shm0))
        inq.put(None)
        tag, child_high, child_left, child_live = get(outq, proc)
        join_ok(proc)
        proc.close()  # its sentinel and the fds passed at spawn are ours until then
    finally:
        gc.collect()
        _shm.trim()
    assert tag == "done"
    assert high <= bound, f"the parent held {high} segments at once"
    assert child_high <= bound, f"the child held {child_high} segment fds at once"
    assert (child_left, child_live) == (0, 0)
    del inq, outq
    gc.collect()
    assert shm_entries() == shm0
    assert fd_kinds() == fds0


# --------------------------------------------------------------------------- SIGKILL


@pytest.mark.timeout(60)
def test_sender_killed_mid_transfer(ctx: Any, strategy: str, children: Children) -> None:
    """SIGKILL a producer with undrained messages: no segment or fd survives the queue.

    The producer is killed inside a blocked ``put`` whose handles already exist. Half the
    messages are drained (intact), the rest are dropped with the queue; the queue itself
    still works for other producers after the kill (A6).
    """
    n = 6
    fds0, shm0 = fd_kinds(), shm_entries()
    q = ctx.Queue(maxsize=n)
    r, w = ctx.Pipe(duplex=False)
    proc = children.start(ctx, targets.put_then_block, q, w, n, strategy)
    w.close()
    pid = recv(r)
    kill_and_reap(proc)
    proc.close()
    r.close()
    for i in range(n // 2):
        j, shared, big = q.get(timeout=WAIT)
        assert j == i
        assert _shm.is_shared(shared) and _shm.is_shared(big)
        np.testing.assert_array_equal(shared, np.full(1000, i))
        np.testing.assert_array_equal(big, np.full(10_000, float(i)))
    # the queue is not wedged: a live producer can still put
    q.put("after", timeout=WAIT)
    assert q.qsize() == n - n // 2 + 1
    del j, shared, big, q  # drops the dead producer's undrained messages
    gc.collect()
    removed = _shm.cleanup_orphans()
    if strategy == "file_system":  # the dead producer's undrained names and tickets
        assert [n for n in removed if f"_{pid}_" in n]
    else:
        assert removed == []
    _shm.trim()
    gc.collect()
    left = shm_entries() - shm0
    assert not left, f"left in {_shm.shm_dir()}: {sorted(left)} (cleanup removed {removed})"
    assert not [n for n in shm_entries() if f"_{pid}_" in n]
    assert fd_kinds() == fds0


@pytest.mark.timeout(60)
def test_receiver_killed_after_one_get(ctx: Any, strategy: str, children: Children) -> None:
    """SIGKILL a consumer holding one message: the rest drain intact, nothing is left."""
    n = 5
    fds0, shm0 = fd_kinds(), shm_entries()
    q = ctx.Queue()
    keep = [_shm.full(1000, i, dtype=np.int64) for i in range(n)]
    for i in range(n):
        q.put((i, keep[i], np.full(10_000, float(i))))
    a, b = ctx.Pipe()
    proc = children.start(ctx, targets.take_one_then_block, q, b)
    b.close()
    i0, checksum, big_sum, was_shared = recv(a)
    assert (i0, checksum, big_sum, was_shared) == (0, 0, 0.0, True)
    kill_and_reap(proc)
    proc.close()
    a.close()
    for i in range(1, n):
        j, shared, big = q.get(timeout=WAIT)
        assert j == i
        assert same_mapping(shared, keep[i])
        np.testing.assert_array_equal(big, np.full(10_000, float(i)))
    assert q.empty()
    del j, shared, big, q, keep
    gc.collect()
    _shm.cleanup_orphans()
    _shm.trim()
    gc.collect()
    assert shm_entries() == shm0
    assert fd_kinds() == fds0


# --------------------------------------------------------------------------- file_system


@pytest.fixture
def file_system() -> Iterator[None]:
    """The parent uses the ``file_system`` strategy for the test."""
    old = _shm.get_sharing_strategy()
    _shm.set_sharing_strategy("file_system")
    try:
        yield
    finally:
        _shm.set_sharing_strategy(old)


@pytest.mark.timeout(60)
def test_named_segment_outlives_its_creator(
    ctx: Any, file_system: None, children: Children
) -> None:
    """B2: the creator exits normally; the receiver still reads and writes; its drop unlinks."""
    q = ctx.Queue()
    a, b = ctx.Pipe()
    proc = children.start(ctx, targets.create_send_exit, q, b)
    x = get(q, proc)
    name = _shm.segment_buffer_of(x).segment.name  # type: ignore[union-attr]
    assert name is not None
    a.send("attached")
    assert recv(a) == ("written", name)
    join_ok(proc)
    assert x[1] == 6.0, "the creator's write after our attach is not visible"
    x[2] = 7.0
    assert x[0] == 5.0 and x[2] == 7.0
    assert name in shm_entries()
    assert name not in _shm.cleanup_orphans(), "swept a segment a live process holds"
    assert name in shm_entries()
    del x
    gc.collect()
    assert name not in shm_entries()
    assert not [n for n in shm_entries() if f"_{proc.pid}_" in n]


@pytest.mark.timeout(60)
def test_killed_creator_orphans_swept_only_when_unheld(
    ctx: Any, file_system: None, children: Children
) -> None:
    """B3/B4: after the creator is SIGKILLed, ``cleanup_orphans`` removes only unheld names."""
    decoy = _shm.full(10, 1.0)  # ours, live owner: never swept
    decoy_name = _shm.segment_buffer_of(decoy).segment.name  # type: ignore[union-attr]
    q = ctx.Queue()
    a, b = ctx.Pipe()
    proc = children.start(ctx, targets.create_two_then_block, q, b)
    x = get(q, proc)
    tag, (sent, kept) = recv(a)
    assert tag == "names"
    assert _shm.segment_buffer_of(x).segment.name == sent  # type: ignore[union-attr]
    assert {sent, kept} <= shm_entries()
    kill_and_reap(proc)
    removed = _shm.cleanup_orphans()
    assert kept in removed, "the unheld orphan was not swept"
    assert sent not in removed and sent in shm_entries(), "swept a segment we still hold"
    assert decoy_name not in removed and decoy_name in shm_entries()
    x[0] = 9.0
    assert x.tolist()[:2] == [9.0, 3.0]
    del x
    gc.collect()
    assert sent not in shm_entries()
    assert not [n for n in shm_entries() if f"_{proc.pid}_" in n]
    assert decoy_name in shm_entries()


# --------------------------------------------------------------------------- fds (C6)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("start_method", NO_FORK)
def test_received_fds_stay_out_of_later_children(
    start_method: str, strategy: str, children: Children
) -> None:
    """C6: after receiving 20 shared arrays, a new child has none of their fds open."""
    ctx = drop_in_context(start_method)
    q = ctx.Queue()
    producer = children.start(ctx, targets.send_shared, q, 20, strategy)
    held = [get(q, producer) for _ in range(20)]
    join_ok(producer)
    assert all(_shm.is_shared(x) for x in held)
    assert [int(x[0]) for x in held] == list(range(20))
    if strategy == "file_descriptor":
        assert fd_kinds()["memfd"] >= 20
    out = ctx.Queue()
    lister = children.start(ctx, targets.list_fds, out)
    fds = get(out, lister)
    join_ok(lister)
    # (the child's own queue, ``out``, maps its count page: that memfd is its own)
    leaked = [t for t in fds if ("aioshm" in t or "memfd:" in t) and "queue-counts" not in t]
    assert not leaked, f"the child inherited {leaked}"
    assert len(fds) < 20


# --------------------------------------------------------------------------- stdlib parent


@pytest.mark.timeout(60)
def test_drop_in_inside_a_stdlib_child(strategy: str, children: Children) -> None:
    """A child started by plain stdlib ``multiprocessing`` (spawn) uses drop-in queues."""
    std = multiprocessing.get_context("spawn")
    spawn_ctx = drop_in_context("spawn")
    q, out = spawn_ctx.Queue(), spawn_ctx.Queue()
    a = _shm.zeros(3)
    proc = children.start(std, targets.stdlib_started, q, out, strategy)
    q.put(a)
    is_ours, was_shared, has_ctx, fresh = get(out, proc)
    join_ok(proc)
    assert is_ours and was_shared and has_ctx
    np.testing.assert_array_equal(a, [1, 1, 1])
    assert _shm.is_shared(fresh)
    assert _shm.segment_buffer_of(fresh).segment.kind == strategy  # type: ignore[union-attr]
    np.testing.assert_array_equal(fresh, [0, 10, 20, 30])
    assert isinstance(q, AioshmQueue)


# --------------------------------------------------------------------------- recycling bugs


@pytest.mark.timeout(60)
@pytest.mark.parametrize("start_method", ["spawn"])
def test_recycled_named_segment_reusable_after_receiver_trim(
    start_method: str, file_system: None, children: Children
) -> None:
    """A sender reuses its recycled named segment after the receiver trimmed its copy.

    The receiver's ``trim()`` closes the only locked holder and unlinks the name while the
    sender keeps the segment idle for reuse; the sender's next big send must still work.
    """
    ctx = drop_in_context(start_method)
    q = ctx.Queue()
    a, b = ctx.Pipe()
    proc = children.start(ctx, targets.send_big_copies, q, b, 3, "file_system")
    b.close()
    try:
        for i in range(3):
            x = get(q, proc)
            assert _shm.is_shared(x)
            np.testing.assert_array_equal(x, np.full(20_000, float(i)))
            del x
            gc.collect()
            _shm.trim()
            a.send("ack")
        join_ok(proc)
    finally:
        gc.collect()
        _shm.trim()
        _shm.cleanup_orphans()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("start_method", ["spawn"])
def test_recycled_named_segment_unlinked_when_last_holder_exits(
    start_method: str, file_system: None, children: Children
) -> None:
    """A recycled named segment is unlinked once every process has dropped it.

    The parent sends a big array (a recycled named copy) and trims its side while the child
    still holds the copy; the child then drops it and exits normally. Nobody maps the
    segment any more, so its name must be gone (L0) -- not left until the creator dies.
    """
    ctx = drop_in_context(start_method)
    q = ctx.Queue()
    a, b = ctx.Pipe()
    proc = children.start(ctx, targets.receive_hold_drop, q, b)
    b.close()
    q.put(np.full(20_000, 1.0))
    tag, name = recv(a)
    try:
        assert tag == "holding" and name in shm_entries()
        gc.collect()
        _shm.trim()  # our idle copy is closed; the child's lock keeps the name
        assert name in shm_entries()
        a.send("drop")
        tag, child_segments = recv(a)
        assert tag == "dropped"
        a.send("exit")
        join_ok(proc)
        assert name not in shm_entries(), (
            f"{name} outlived every holder (the child kept it idle: {child_segments})"
        )
    finally:
        if name in shm_entries():  # do not let a failure here leak into the session check
            os.unlink(os.path.join(_shm.shm_dir(), name))


@pytest.mark.timeout(60)
def test_fork_child_does_not_share_recycled_segment_locks(
    strategy: str, children: Children
) -> None:
    """A fork child's hold on a recycled segment stops the parent from reusing it.

    The parent has an idle recycled segment when it forks; the child inherits that mapping.
    The parent then sends a big array through the recycled segment; while the child holds it,
    the parent's next send must not overwrite it.
    """
    ctx = drop_in_context("fork")
    q = ctx.Queue()
    q.put(np.zeros(20_000))
    x = q.get()
    del x
    gc.collect()  # the segment is now idle in this process's recycling pool
    a, b = ctx.Pipe()
    proc = children.start(ctx, targets.hold_received_pooled, q, b)
    try:
        q.put(np.full(20_000, 1.0))
        assert recv(a) == ("holding", 1.0)
        q.put(np.full(20_000, 2.0))  # must not reuse the segment the child holds
        y = q.get(timeout=WAIT)
        np.testing.assert_array_equal(y, np.full(20_000, 2.0))
        del y
        a.send("go")
        assert recv(a) == ("after", 1.0, 1.0), "the child's array was overwritten"
        join_ok(proc)
    finally:
        gc.collect()
        _shm.trim()

"""``aioshm.Pool`` and ``aioshm.run_sync``: the stdlib Pool API, its awaitable face, and failures.

* the blocking API gives the stdlib's results (apply, map, starmap, imap, imap_unordered with
  chunksize, callbacks, ``get(timeout)``, ``ready``/``successful``/``wait``, ``with Pool()``
  terminating, ``close(); join()``);
* the async API (awaitable results, ``async for`` over imap, an endless generator bounded by
  ``max_inflight``, ``async with``) on asyncio, uvloop and trio;
* a worker that dies (SIGKILL, segfault, ``os._exit``) fails only the task it ran, with
  ``ProcessExitedException``, and is replaced; exceptions keep their type and remote traceback;
  unpicklable arguments/results fail alone; a chaos run with random worker kills resolves every
  await and leaves a healthy pool;
* cancellation (``cancellable=True`` kills and replaces the worker; ``False`` lets it finish),
  terminate with pending tasks (``PoolClosed``), ``maxtasksperchild``, ``initializer``,
  ``statistics()``, progress events, shared arrays both ways, no helper threads, ``run_sync``.

At most three worker processes at a time. Tasks report through FIFOs (see ``_pool_targets``);
the tests never sleep to order events. Every pool is terminated in ``finally``.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import json
import multiprocessing
import multiprocessing.connection
import os
import pickle
import random
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import numpy as np
import psutil
import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_DIR = TESTS_DIR.parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

import _pool_targets as targets
from _threads import new_thread_counter

import aioshm
from aioshm import (
    PoolClosed,
    ProcessExitedException,
    ProcessRaisedException,
    RemoteTraceback,
    TaskCancelled,
)
from aioshm._pool._results import ProgressEvent
from aioshm._pool._run_sync import current_default_pool

WAIT = 30.0  # the bound on every awaited or blocking section: nothing hangs


# --------------------------------------------------------------------------- helpers


class Fifo:
    """A named pipe the parent holds open read-write (so no ``open`` on either side blocks).

    Tasks write lines to it (``targets.tell``) or block reading one byte (``targets.wait_gate``).
    """

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = str(path)
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        self._buf = b""

    def _take_line(self) -> str | None:
        if b"\n" not in self._buf:
            return None
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def _read_some(self) -> None:
        try:
            self._buf += os.read(self.fd, 4096)
        except BlockingIOError:
            pass

    def line(self, timeout: float = WAIT) -> str:
        """The next line (blocking, bounded)."""
        deadline = time.monotonic() + timeout
        while (got := self._take_line()) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no line on {self.path} within {timeout} s")
            select.select([self.fd], [], [], remaining)
            self._read_some()
        return got

    async def aline(self) -> str:
        """The next line (awaiting; wrap it in ``anyio.fail_after``)."""
        while (got := self._take_line()) is None:
            await anyio.wait_readable(self.fd)
            self._read_some()
        return got

    def open_gate(self, n: int = 1) -> None:
        os.write(self.fd, b"x" * n)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@pytest.fixture
def fifos(tmp_path: Path) -> Iterator[Callable[[], Fifo]]:
    """A factory of :class:`Fifo` objects, closed after the test."""
    made: list[Fifo] = []
    counter = itertools.count()

    def make() -> Fifo:
        f = Fifo(tmp_path / f"fifo{next(counter)}")
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


def worker_pids(pool: aioshm.Pool) -> set[int]:
    return {w.proc.pid for w in pool._workers}


def gone(pid: int) -> bool:
    """True if ``pid`` no longer exists (killed *and* reaped: not even a zombie)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_DEAD
    except psutil.NoSuchProcess:
        return True


def kill_and_wait(pool: aioshm.Pool, pids: set[int]) -> None:
    """SIGKILL these workers and wait until the pool can see they died (their sentinels are
    readable), so the next submission is not sent to a dying worker."""
    sentinels = [w.proc.sentinel for w in pool._workers if w.proc.pid in pids]
    assert len(sentinels) == len(pids)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + WAIT
    pending = list(sentinels)
    while pending:
        ready = multiprocessing.connection.wait(pending, deadline - time.monotonic())
        assert ready, "killed workers did not die"
        pending = [s for s in pending if s not in ready]


def shut(pool: aioshm.Pool) -> None:
    """The ``finally`` of every synchronous test: terminate and join."""
    pool.terminate()
    pool.join()


@contextlib.asynccontextmanager
async def apool(*args: Any, **kwds: Any) -> AsyncIterator[aioshm.Pool]:
    """A pool for an async test, stopped with ``terminate_async`` however the test ends."""
    pool = aioshm.Pool(*args, **kwds)
    try:
        yield pool
    finally:
        with anyio.CancelScope(shield=True), anyio.fail_after(WAIT):
            await pool.terminate_async()


async def settle(result: Any) -> Any:
    """The value of an awaitable result, or the exception it raised."""
    try:
        return await result
    except Exception as exc:
        return exc


# =========================================================================== blocking API


@pytest.fixture(scope="class")
def shared_pool() -> Iterator[aioshm.Pool]:
    """One two-worker pool for the blocking-API tests that neither kill nor replace workers."""
    pool = aioshm.Pool(2)
    try:
        yield pool
    finally:
        shut(pool)


@pytest.mark.timeout(60)
class TestBlockingAPI:
    """The stdlib ``multiprocessing.Pool`` semantics, on one shared pool."""

    def test_apply_map_starmap(self, shared_pool: aioshm.Pool) -> None:
        """apply/map/starmap return what the stdlib (and the builtins) return."""
        pool = shared_pool
        assert pool.apply(targets.square, (7,)) == 49
        assert pool.apply(targets.power, (3,), {"exp": 3, "mod": 5}) == pow(3, 3, 5)
        xs = list(range(37))
        assert pool.map(targets.square, xs) == [x * x for x in xs]
        for chunksize in (1, 4, 100):
            assert pool.map(targets.square, xs, chunksize) == [x * x for x in xs]
        assert pool.map(targets.square, []) == []
        pairs = [(i, 2 * i) for i in range(23)]
        assert pool.starmap(targets.add, pairs) == list(itertools.starmap(targets.add, pairs))
        assert pool.starmap(targets.add, pairs, chunksize=5) == [3 * i for i in range(23)]
        # generators are accepted like lists
        assert pool.map(targets.square, (x for x in range(5))) == [0, 1, 4, 9, 16]

    def test_imap_and_imap_unordered(self, shared_pool: aioshm.Pool) -> None:
        """imap keeps order, imap_unordered yields every result once, at any chunksize."""
        pool = shared_pool
        xs = list(range(41))
        want = [x * x for x in xs]
        for chunksize in (1, 3, 50):
            assert list(pool.imap(targets.square, xs, chunksize)) == want
            got = list(pool.imap_unordered(targets.square, xs, chunksize=chunksize))
            assert sorted(got) == want
        assert list(pool.imap(targets.square, [])) == []
        it = pool.imap(targets.square, [2, 3])
        assert it.next(timeout=WAIT) == 4
        assert next(it) == 9
        with pytest.raises(StopIteration):
            it.next(timeout=WAIT)

    def test_imap_errors_do_not_stop_the_iteration(self, shared_pool: aioshm.Pool) -> None:
        """A raising item raises at its position in imap; the items after it still come."""
        it = shared_pool.imap(targets.raise_value_error_if_neg, [1, -2, 3])
        assert it.next(timeout=WAIT) == 1
        with pytest.raises(ValueError, match="-2"):
            it.next(timeout=WAIT)
        assert it.next(timeout=WAIT) == 3
        with pytest.raises(StopIteration):
            it.next(timeout=WAIT)

    def test_callbacks(self, shared_pool: aioshm.Pool) -> None:
        """callback and error_callback fire once, with the value or the error, in this thread."""
        pool = shared_pool
        seen: list[tuple[str, Any, threading.Thread]] = []

        def cb(value: Any) -> None:
            seen.append(("ok", value, threading.current_thread()))

        def ecb(error: BaseException) -> None:
            seen.append(("err", error, threading.current_thread()))

        r1 = pool.apply_async(targets.square, (6,), callback=cb, error_callback=ecb)
        assert r1.get(timeout=WAIT) == 36
        r2 = pool.apply_async(targets.raise_value_error, ("bad",), callback=cb, error_callback=ecb)
        with pytest.raises(ValueError, match="bad"):
            r2.get(timeout=WAIT)
        r3 = pool.map_async(targets.square, range(5), callback=cb, error_callback=ecb)
        assert r3.get(timeout=WAIT) == [0, 1, 4, 9, 16]
        r4 = pool.starmap_async(targets.add, [(1, 2), (3, 4)], callback=cb)
        assert r4.get(timeout=WAIT) == [3, 7]
        assert [(kind, v if kind == "ok" else type(v)) for kind, v, _ in seen] == [
            ("ok", 36),
            ("err", ValueError),
            ("ok", [0, 1, 4, 9, 16]),
            ("ok", [3, 7]),
        ]
        assert {t for _, _, t in seen} == {threading.main_thread()}

    def test_get_timeout_ready_successful_wait(
        self, shared_pool: aioshm.Pool, fifos: Callable[[], Fifo]
    ) -> None:
        """get(timeout) raises multiprocessing.TimeoutError; ready/successful/wait as stdlib."""
        fifo, gate = fifos(), fifos()
        result = shared_pool.apply_async(targets.announce_and_wait, (fifo.path, gate.path, "value"))
        try:
            pid = int(fifo.line())
            assert not result.ready()
            with pytest.raises(ValueError, match="not ready"):
                result.successful()
            t0 = time.monotonic()
            with pytest.raises(multiprocessing.TimeoutError):
                result.get(timeout=0.1)
            assert 0.09 <= time.monotonic() - t0 < 5
            assert result.wait(0.05) is None
            assert not result.ready()
        finally:
            gate.open_gate()
        result.wait(WAIT)
        assert result.ready()
        assert result.successful()
        assert result.get(timeout=0) == "value"
        assert fifo.line() == f"done {pid}"
        failed = shared_pool.apply_async(targets.raise_value_error, ("x",))
        failed.wait(WAIT)
        assert failed.ready()
        assert not failed.successful()

    def test_imap_next_timeout(self, shared_pool: aioshm.Pool, fifos: Callable[[], Fifo]) -> None:
        """imap's next(timeout) raises multiprocessing.TimeoutError while the item runs."""
        fifo, gate = fifos(), fifos()
        it = shared_pool.imap(
            functools.partial(targets.announce_and_wait, fifo.path, gate.path), ["v"]
        )
        try:
            with pytest.raises(multiprocessing.TimeoutError):
                it.next(timeout=0.1)
            fifo.line()
        finally:
            gate.open_gate()
        assert it.next(timeout=WAIT) == "v"
        with pytest.raises(StopIteration):
            it.next(timeout=WAIT)

    def test_exceptions_keep_type_and_remote_traceback(self, shared_pool: aioshm.Pool) -> None:
        """A task's exception comes back as its type, with a RemoteTraceback cause; the worker
        survives it."""
        pool = shared_pool
        before = worker_pids(pool)
        with pytest.raises(ValueError, match="boom") as info:
            pool.apply(targets.raise_value_error, ("boom",))
        cause = info.value.__cause__
        assert isinstance(cause, RemoteTraceback)
        assert "raise_value_error" in str(cause)
        with pytest.raises(targets.CustomError) as info2:
            pool.apply(targets.raise_custom, ("custom", 42))
        assert info2.value.code == 42
        assert isinstance(info2.value.__cause__, RemoteTraceback)
        # the stdlib's map fails with the first error
        with pytest.raises(ValueError, match="-3"):
            pool.map(targets.raise_value_error_if_neg, [1, 2, -3, 4])
        # an exception that cannot be pickled arrives as ProcessRaisedException with its name
        with pytest.raises(ProcessRaisedException) as info3:
            pool.apply(targets.raise_unpicklable, ("nope",))
        assert "UnpicklableError" in info3.value.exc_type_name
        assert "raise_unpicklable" in info3.value.remote_traceback
        assert "UnpicklableError" in str(info3.value)
        assert isinstance(info3.value.__cause__, RemoteTraceback)
        assert worker_pids(pool) == before
        assert pool.statistics().workers_replaced == 0

    def test_task_outcomes_are_the_child_runners_reports(self, shared_pool: aioshm.Pool) -> None:
        """A pool task ends like a Process child (one runner, one rebuilder): a task that
        raises KeyboardInterrupt fails alone as ProcessRaisedException naming it and chained
        to it, and its worker lives on (the old worker died of it)."""
        pool = shared_pool
        before = worker_pids(pool)
        with pytest.raises(ProcessRaisedException, match="raised KeyboardInterrupt") as info:
            pool.apply(targets.raise_keyboard_interrupt)
        assert info.value.exc_type_name == "KeyboardInterrupt"
        assert "raise_keyboard_interrupt" in info.value.remote_traceback
        original = info.value.__cause__
        assert isinstance(original, KeyboardInterrupt)
        assert isinstance(original.__cause__, RemoteTraceback)
        assert str(original.__cause__).count("raise_keyboard_interrupt") == 1  # printed once
        assert pool.apply(targets.square, (5,)) == 25
        assert worker_pids(pool) == before
        assert pool.statistics().workers_replaced == 0


@pytest.mark.timeout(60)
def test_with_pool_terminates(fifos: Callable[[], Fifo]) -> None:
    """``with Pool()`` terminates on exit: a running task fails with PoolClosed, the worker
    is gone."""
    fifo = fifos()
    pool = aioshm.Pool(1)
    try:
        with pool:
            running = pool.apply_async(targets.announce_and_block, (fifo.path,))
            pending = pool.apply_async(targets.square, (3,))
            pid = int(fifo.line())
        t0 = time.monotonic()
        for r in (running, pending):
            with pytest.raises(PoolClosed):
                r.get(timeout=5)
        assert time.monotonic() - t0 < 1
        assert gone(pid)
        assert not pool._workers
        with pytest.raises(ValueError, match="not running"):
            pool.apply_async(targets.square, (1,))
    finally:
        shut(pool)


@pytest.mark.timeout(60)
def test_close_join_completes_submitted_work() -> None:
    """``close(); join()`` lets the submitted tasks finish, then the workers exit with code 0."""
    pool = aioshm.Pool(2)
    try:
        procs = [w.proc for w in pool._workers]
        with pytest.raises(ValueError, match="still running"):
            pool.join()
        results = [pool.apply_async(targets.slow_square, (i, 0.02)) for i in range(6)]
        mapped = pool.map_async(targets.square, range(10))
        pool.close()
        with pytest.raises(ValueError, match="not running"):
            pool.apply_async(targets.square, (1,))
        pool.join()
        assert [r.get(timeout=0) for r in results] == [i * i for i in range(6)]
        assert mapped.get(timeout=0) == [i * i for i in range(10)]
        assert [p.exitcode for p in procs] == [0, 0]
        assert all(gone(p.pid) for p in procs)
    finally:
        shut(pool)


@pytest.mark.timeout(60)
def test_terminate_fails_pending_with_pool_closed(fifos: Callable[[], Fifo]) -> None:
    """terminate() with running and queued tasks fails every one with PoolClosed, promptly."""
    fifo = fifos()
    pool = aioshm.Pool(1)
    try:
        running = pool.apply_async(targets.announce_and_block, (fifo.path,))
        queued = [pool.apply_async(targets.square, (i,)) for i in range(4)]
        mapped = pool.map_async(targets.square, range(10))
        pid = int(fifo.line())
        t0 = time.monotonic()
        pool.terminate()
        assert time.monotonic() - t0 < aioshm._pool._pool.GRACE_PERIOD + 2
        for r in [running, *queued, mapped]:
            assert r.ready()
            with pytest.raises(PoolClosed, match="terminated"):
                r.get(timeout=0)
        assert gone(pid)
        pool.join()
    finally:
        shut(pool)


@pytest.mark.timeout(60)
def test_maxtasksperchild_replaces_workers() -> None:
    """maxtasksperchild=2: each worker runs two tasks, then a fresh one takes over."""
    pool = aioshm.Pool(1, maxtasksperchild=2)
    try:
        pids = [pool.apply(targets.getpid) for _ in range(6)]
        assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4] == pids[5]
        assert len(set(pids)) == 3
        # a map across several chunks is not disturbed by the turnover
        assert pool.map(targets.square, range(12), chunksize=1) == [i * i for i in range(12)]
        mapped_pids = pool.map(targets.getpid, range(8), chunksize=1)
        counts = sorted(mapped_pids.count(p) for p in set(mapped_pids))
        assert all(c <= 2 for c in counts)
        assert len(pool._workers) == 1
    finally:
        shut(pool)


@pytest.mark.timeout(60)
def test_initializer_runs_in_every_worker_including_replacements() -> None:
    """initializer(*initargs) runs in each worker, in replacements after a kill, and in
    workers renewed by maxtasksperchild."""
    pool = aioshm.Pool(2, initializer=targets.init_worker, initargs=("tagged",))
    try:
        first = pool.map(targets.init_tag, range(8), chunksize=1)
        assert {tag for _, tag in first} == {"tagged"}
        old = worker_pids(pool)
        kill_and_wait(pool, old)
        again = pool.map(targets.init_tag, range(8), chunksize=1)
        assert {tag for _, tag in again} == {"tagged"}
        assert not {pid for pid, _ in again} & old
        assert len(pool._workers) == 2
        assert pool.statistics().workers_replaced == 2
    finally:
        shut(pool)
    pool = aioshm.Pool(2, initializer=targets.init_worker, initargs=("t2",), maxtasksperchild=1)
    try:
        got = pool.map(targets.init_tag, range(6), chunksize=1)
        assert [tag for _, tag in got] == ["t2"] * 6
        assert len({pid for pid, _ in got}) == 6
    finally:
        shut(pool)


@pytest.mark.timeout(60)
def test_task_sent_to_a_dying_idle_worker_is_not_lost() -> None:
    """A worker killed while idle (an OOM kill, say) fails no task: a task submitted right
    after the kill -- before the pool noticed the death -- must not be blamed for it.

    Fails today: the task goes into the dying worker's channel and is failed with
    ProcessExitedException although it never started (see the report)."""
    pool = aioshm.Pool(1)
    try:
        lost = 0
        for _ in range(5):
            (pid,) = worker_pids(pool)
            os.kill(pid, signal.SIGKILL)
            try:
                assert pool.apply_async(targets.square, (3,)).get(timeout=WAIT) == 9
            except ProcessExitedException:
                lost += 1
        assert lost == 0, f"{lost} of 5 tasks submitted right after an idle worker's kill failed"
    finally:
        shut(pool)


@pytest.mark.timeout(60)
def test_idle_workers_take_tasks_before_any_queues(fifos: Callable[[], Fifo]) -> None:
    """Two tasks on a two-worker pool run at the same time: an idle worker gets a task before
    a busy one gets a second (queued) one.

    Fails today: ``_dispatch`` fills the first worker up to DEPTH=2 before looking at the
    second, so the second task waits behind the first (see the report)."""
    fifo, gate = fifos(), fifos()
    pool = aioshm.Pool(2)
    try:
        results = [
            pool.apply_async(targets.announce_and_wait, (fifo.path, gate.path, i)) for i in range(2)
        ]
        try:
            pids = {int(fifo.line(timeout=5)), int(fifo.line(timeout=5))}
            assert pids == worker_pids(pool)
        finally:
            gate.open_gate(2)
        assert [r.get(timeout=WAIT) for r in results] == [0, 1]
    finally:
        shut(pool)


@pytest.mark.timeout(60)
def test_statistics(fifos: Callable[[], Fifo]) -> None:
    """statistics(): idle/busy workers, pending/running/done tasks, replacements, segments."""
    fifo, gate = fifos(), fifos()
    pool = aioshm.Pool(1)
    try:
        s = pool.statistics()
        assert (s.idle_workers, s.busy_workers, s.tasks_pending, s.tasks_running) == (1, 0, 0, 0)
        assert (s.tasks_done, s.workers_replaced) == (0, 0)
        blocked = pool.apply_async(targets.announce_and_wait, (fifo.path, gate.path, 1))
        rest = [pool.apply_async(targets.square, (i,)) for i in range(3)]
        pid = int(fifo.line())
        s = pool.statistics()
        assert (s.idle_workers, s.busy_workers, s.tasks_running) == (0, 1, 1)
        assert s.tasks_pending == 3 - (aioshm._pool._scheduler.DEPTH - 1)
        assert s.tasks_done == 0
        gate.open_gate()
        assert blocked.get(timeout=WAIT) == 1
        assert [r.get(timeout=WAIT) for r in rest] == [0, 1, 4]
        s = pool.statistics()
        assert (s.idle_workers, s.busy_workers, s.tasks_pending, s.tasks_running) == (1, 0, 0, 0)
        assert s.tasks_done == 4
        kill_and_wait(pool, {pid})
        assert pool.apply(targets.getpid) != pid
        assert pool.statistics().workers_replaced == 1
        base = pool.statistics()
        arr = aioshm.zeros(1000)
        s = pool.statistics()
        assert s.live_segments >= base.live_segments + 1
        assert s.live_segment_bytes >= base.live_segment_bytes + arr.nbytes
        del arr
    finally:
        shut(pool)


@pytest.mark.timeout(60)
def test_progress_callback_reaches_total() -> None:
    """map_async(on_progress=cb): one event per chunk, increasing, ending at done == total."""
    pool = aioshm.Pool(2)
    try:
        events: list[ProgressEvent] = []
        result = pool.map_async(targets.square, range(40), chunksize=4, on_progress=events.append)
        assert result.get(timeout=WAIT) == [i * i for i in range(40)]
        assert len(events) == 10
        assert [e.done for e in events] == sorted(e.done for e in events)
        assert all(e.total == 40 for e in events)
        assert events[-1] == ProgressEvent(40, 40)
    finally:
        shut(pool)


@pytest.mark.timeout(60)
def test_sync_imap_endless_generator_is_bounded() -> None:
    """imap over an endless generator submits at most max_inflight chunks ahead of what was
    consumed -- also when the consumer is slower than the pool (results pile up)."""
    pulled = 0

    def endless() -> Iterator[int]:
        nonlocal pulled
        for i in itertools.count():
            pulled += 1
            yield i

    pool = aioshm.Pool(1)  # one worker runs tasks in submission order: the barrier below works
    try:
        got = []
        for x in pool.imap(targets.square, endless(), max_inflight=3):
            got.append(x)
            if len(got) == 25:
                break
        assert got == [i * i for i in range(25)]
        assert 25 <= pulled <= 25 + 3
        # a slow consumer: after each item, wait until everything submitted so far is done
        pulled = 0
        got = []
        for x in pool.imap(targets.square, endless(), max_inflight=3):
            got.append(x)
            pool.apply(targets.square, (0,))  # the barrier: runs after every earlier task
            if len(got) == 10:
                break
        assert got == [i * i for i in range(10)]
        assert 10 <= pulled <= 10 + 3, f"the generator yielded {pulled} items for 10 results"
        pulled = 0
        got = []
        for x in pool.imap_unordered(targets.square, endless(), chunksize=4, max_inflight=2):
            got.append(x)
            pool.apply(targets.square, (0,))
            if len(got) == 10:
                break
        assert len(set(got)) == 10
        assert pulled <= 4 * (3 + 2)  # ceil(10 / 4) chunks consumed, two more ahead
    finally:
        shut(pool)


# =========================================================================== failures (sync)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("how", "exit_code", "signal_name"),
    [("sigkill", -9, "SIGKILL"), ("segfault", -11, "SIGSEGV"), ("exit7", 7, None)],
)
def test_dying_worker_fails_only_its_task(
    how: str, exit_code: int, signal_name: str | None
) -> None:
    """A worker that dies mid-map fails only the item it ran, with ProcessExitedException
    (exit code, signal name); the others complete; the pool is replaced and usable."""
    pool = aioshm.Pool(2)
    try:
        fn = functools.partial(targets.die_on, doomed=7, how=how)
        it = pool.imap(fn, range(20))
        out: dict[int, Any] = {}
        for x in range(20):
            try:
                out[x] = it.next(timeout=WAIT)
            except ProcessExitedException as exc:
                out[x] = exc
        with pytest.raises(StopIteration):
            it.next(timeout=WAIT)
        err = out.pop(7)
        assert isinstance(err, ProcessExitedException)
        assert err.exit_code == exit_code
        assert err.signal_name == signal_name
        assert (signal_name or f"exit code {exit_code}") in str(err)
        assert gone(err.pid)
        assert out == {x: x * x for x in range(20) if x != 7}
        # the stdlib's map fails as a whole with that error; the pool is still fine after it
        with pytest.raises(ProcessExitedException):
            pool.map(fn, range(10), chunksize=1)
        assert pool.map(targets.square, range(10)) == [x * x for x in range(10)]
        assert len(pool._workers) == 2
        assert all(w.proc.is_alive() for w in pool._workers)
        assert pool.statistics().workers_replaced == 2
    finally:
        shut(pool)


@pytest.mark.timeout(60)
def test_batched_tasks_keep_per_task_failures(fifos: Callable[[], Fifo]) -> None:
    """Small tasks that wait together go to a worker in one record. Each still fails alone: one
    that cannot be rebuilt in the worker, one that kills it (blamed on that task only), and
    the tasks batched behind the dying one run on the replacement."""
    fifo, gate = fifos(), fifos()
    with aioshm.Pool(1) as pool:
        sent: list[int] = []
        send_batch = pool._send_batch

        def counting(worker: Any, limit: int) -> bool:
            before = len(pool._pending)
            ok = send_batch(worker, limit)
            sent.append(before - len(pool._pending))
            return ok

        pool._send_batch = counting  # type: ignore[method-assign]
        # two gated tasks fill the worker's send-ahead depth, so the rest wait together
        gated = [
            pool.apply_async(targets.announce_and_wait, (fifo.path, gate.path, tag))
            for tag in ("g1", "g2")
        ]
        fifo.line()
        rest = [
            pool.apply_async(targets.square, (1,)),
            pool.apply_async(targets.identity, (targets.BadOnLoad(),)),
            pool.apply_async(targets.die_on, (3, 3)),
            pool.apply_async(targets.square, (4,)),
            pool.apply_async(targets.square, (5,)),
        ]
        assert len(pool._pending) == len(rest)
        with pool._mutex:  # room for all of them behind the gated two: one record
            pool._ahead.depth = 8
            pool._dispatch()
        assert sent[-1] == len(rest)
        gate.open_gate(2)
        assert [r.get(WAIT) for r in gated] == ["g1", "g2"]
        assert rest[0].get(WAIT) == 1
        with pytest.raises(RuntimeError, match="cannot be rebuilt"):
            rest[1].get(WAIT)
        with pytest.raises(ProcessExitedException, match="SIGKILL"):
            rest[2].get(WAIT)
        assert [rest[3].get(WAIT), rest[4].get(WAIT)] == [16, 25]
        assert pool.statistics().workers_replaced == 1


@pytest.mark.timeout(60)
def test_unpicklable_arguments_and_results_fail_alone(fifos: Callable[[], Fifo]) -> None:
    """A lambda argument or function, an argument that cannot be rebuilt in the worker, and an
    unpicklable result each fail their own task with a clear error; nothing else is touched."""
    pool = aioshm.Pool(2)
    try:
        before = worker_pids(pool)
        good1 = pool.apply_async(targets.slow_square, (3, 0.05))
        lock = threading.Lock()  # captured, so even cloudpickle cannot send these lambdas
        bad_arg = pool.apply_async(targets.identity, (lambda: lock,))
        bad_fn = pool.apply_async(lambda: lock)
        bad_load = pool.apply_async(targets.identity, (targets.BadOnLoad(),))
        bad_result = pool.apply_async(targets.return_lock)
        good2 = pool.apply_async(targets.square, (4,))
        mapped = pool.map_async(targets.square, range(10))
        assert good1.get(timeout=WAIT) == 9
        assert good2.get(timeout=WAIT) == 16
        assert mapped.get(timeout=WAIT) == [i * i for i in range(10)]
        for r in (bad_arg, bad_fn):
            with pytest.raises(Exception, match="(?i)pickle|lambda") as info:
                r.get(timeout=WAIT)
            assert not isinstance(info.value, ProcessExitedException)
        with pytest.raises(RuntimeError, match="cannot be rebuilt"):
            bad_load.get(timeout=WAIT)
        with pytest.raises(Exception, match="(?i)pickle") as info2:
            bad_result.get(timeout=WAIT)
        assert "lock" in str(info2.value).lower()
        # the map with one unpicklable item fails (stdlib: as a whole); others are untouched
        with pytest.raises(Exception, match="(?i)pickle|lambda"):
            pool.map(targets.identity, [1, lambda: lock, 3], chunksize=1)
        assert pool.map(targets.square, range(5)) == [0, 1, 4, 9, 16]
        assert worker_pids(pool) == before
        assert pool.statistics().workers_replaced == 0
    finally:
        shut(pool)


# =========================================================================== async API

ASYNC = pytest.mark.anyio


@ASYNC
@pytest.mark.timeout(60)
async def test_awaitable_results() -> None:
    """``await`` apply_async/map_async/starmap_async; exceptions keep their type and cause."""
    async with apool(2) as pool:
        with anyio.fail_after(WAIT):
            assert await pool.apply_async(targets.square, (9,)) == 81
            assert await pool.apply_async(targets.power, (2,), {"exp": 10}) == 1024
            assert await pool.map_async(targets.square, range(30)) == [i * i for i in range(30)]
            assert await pool.map_async(targets.square, []) == []
            pairs = [(i, i) for i in range(9)]
            assert await pool.starmap_async(targets.add, pairs, 2) == [2 * i for i in range(9)]
            with pytest.raises(targets.CustomError) as info:
                await pool.apply_async(targets.raise_custom, ("c", 7))
            assert info.value.code == 7
            assert isinstance(info.value.__cause__, RemoteTraceback)
            with pytest.raises(ProcessRaisedException, match="UnpicklableError"):
                await pool.apply_async(targets.raise_unpicklable, ("x",))
            # many awaiters at once (they queue on the pump lock)
            results = [pool.apply_async(targets.square, (i,)) for i in range(50)]
            got: dict[int, int] = {}

            async def one(i: int) -> None:
                got[i] = await results[i]

            async with anyio.create_task_group() as tg:
                for i in range(50):
                    tg.start_soon(one, i)
            assert got == {i: i * i for i in range(50)}
            # a result can be awaited twice
            assert await results[3] == 9


@ASYNC
@pytest.mark.timeout(60)
async def test_async_for_imap() -> None:
    """``async for`` over imap (ordered) and imap_unordered (every result once)."""
    async with apool(2) as pool:
        with anyio.fail_after(WAIT):
            for chunksize in (1, 4):
                got = [x async for x in pool.imap(targets.square, range(30), chunksize)]
                assert got == [i * i for i in range(30)]
                got = [
                    x
                    async for x in pool.imap_unordered(
                        targets.slow_square, range(12), chunksize, max_inflight=3
                    )
                ]
                assert sorted(got) == [i * i for i in range(12)]
            assert [x async for x in pool.imap(targets.square, [])] == []
            # an error in one item raises there; the iteration goes on after it
            it = pool.imap(targets.raise_value_error_if_neg, [1, -1, 2])
            assert await it.__anext__() == 1
            with pytest.raises(ValueError):
                await it.__anext__()
            assert await it.__anext__() == 2
            with pytest.raises(StopAsyncIteration):
                await it.__anext__()


@ASYNC
@pytest.mark.timeout(60)
async def test_async_imap_endless_generator_max_inflight() -> None:
    """``async for`` over imap of an endless generator: stopping after N results, the
    generator yielded at most N + max_inflight items -- also for a slow consumer."""
    pulled = 0

    def endless() -> Iterator[int]:
        nonlocal pulled
        for i in itertools.count():
            pulled += 1
            yield i

    async with apool(1) as pool:  # one worker: tasks run in submission order
        with anyio.fail_after(WAIT):
            # a slow consumer: after each item, wait until everything submitted is done
            pulled = 0
            got = []
            async for x in pool.imap(targets.square, endless(), max_inflight=4):
                got.append(x)
                await pool.apply_async(targets.square, (0,))  # the barrier
                if len(got) == 10:
                    break
            assert got == [i * i for i in range(10)]
            assert 10 <= pulled <= 10 + 4, f"the generator yielded {pulled} items for 10 results"
            # a fast consumer
            pulled = 0
            got = []
            async for x in pool.imap(targets.square, endless(), max_inflight=4):
                got.append(x)
                if len(got) == 30:
                    break
            assert got == [i * i for i in range(30)]
            assert 30 <= pulled <= 30 + 4
            pulled = 0
            got = []
            async for x in pool.imap_unordered(targets.square, endless(), max_inflight=1):
                got.append(x)
                await pool.apply_async(targets.square, (0,))
                if len(got) == 5:
                    break
            assert sorted(got) == [i * i for i in range(5)]
            assert pulled <= 5 + 1
            # the pool is not clogged by what was left in flight
            assert await pool.apply_async(targets.square, (5,)) == 25


@ASYNC
@pytest.mark.timeout(60)
async def test_result_read_by_another_awaiter_wakes_its_owner(fifos: Callable[[], Fifo]) -> None:
    """Task A awaits r1 (it drives the pool, asleep on the epoll fd). r1's result arrives while
    task B awaits an already-finished result. A must still wake up and get r1 (a regression
    test: B's await used to read r1's result off the channel without waking A)."""
    fifo, gate = fifos(), fifos()
    async with apool(1) as pool:
        with anyio.fail_after(WAIT):
            r0 = pool.apply_async(targets.square, (3,))
            assert await r0 == 9
            r1 = pool.apply_async(targets.announce_and_wait, (fifo.path, gate.path, "r1"))
            await fifo.aline()
            (worker,) = pool._workers
            got: list[Any] = []

            async def owner() -> None:
                got.append(await r1)

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(owner)
                await anyio.wait_all_tasks_blocked()  # A holds the pump, asleep on epoll
                gate.open_gate()
                # Block the loop until r1's result sits in the channel, so A cannot run first.
                select.select([worker.results.fileno()], [], [], WAIT)
                assert await r0 == 9
        assert got == ["r1"]
        assert r1.ready()


@ASYNC
@pytest.mark.timeout(60)
async def test_result_completed_in_another_thread_wakes_its_awaiter(
    fifos: Callable[[], Fifo],
) -> None:
    """A task awaits r; a thread blocks in ``r.get()`` (driving the pool with ``poll()``) and
    reads r's result while the loop is held up. The awaiting task still wakes with the value
    (woken through its own loop, never from the foreign thread directly)."""
    fifo, gate = fifos(), fifos()
    async with apool(1) as pool:
        with anyio.fail_after(WAIT):
            r = pool.apply_async(targets.announce_and_wait, (fifo.path, gate.path, "r"))
            await fifo.aline()
        got: list[Any] = []
        in_thread: list[Any] = []

        async def owner() -> None:
            got.append(await r)

        thread = threading.Thread(target=lambda: in_thread.append(r.get(WAIT)))
        try:
            with anyio.fail_after(5):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(owner)
                    await anyio.wait_all_tasks_blocked()  # the owner is parked
                    thread.start()
                    gate.open_gate()
                    thread.join(WAIT)  # holds the loop: only the thread can read the result
                    assert in_thread == ["r"]
        finally:
            if thread.is_alive() or thread.ident is not None:
                thread.join(WAIT)
        assert got == ["r"]


def _asyncio_only(anyio_backend: Any) -> None:
    if anyio_backend[0] != "asyncio":
        pytest.skip("asyncio's future protocol")


@ASYNC
@pytest.mark.timeout(60)
async def test_results_are_asyncio_futures(anyio_backend: Any) -> None:
    """On asyncio a result is a Future-like object: ``gather`` (with and without
    ``return_exceptions``), ``wait``, ``as_completed`` and ``shield`` take it as it is."""
    import asyncio

    _asyncio_only(anyio_backend)
    async with apool(2) as pool:
        with anyio.fail_after(WAIT):
            results = [pool.apply_async(targets.square, (i,)) for i in range(20)]
            assert asyncio.isfuture(results[0])
            assert await asyncio.gather(*results) == [i * i for i in range(20)]
            assert results[0].done() and results[0].result() == 0
            assert results[0].exception() is None and not results[0].cancelled()
            bad = pool.apply_async(targets.raise_value_error, ("nope",))
            with pytest.raises(ValueError, match="nope"):
                await asyncio.gather(pool.apply_async(targets.square, (2,)), bad)
            got = await asyncio.gather(
                bad, pool.apply_async(targets.square, (3,)), return_exceptions=True
            )
            assert isinstance(got[0], ValueError) and got[1] == 9
            more = [pool.apply_async(targets.square, (i,)) for i in range(5)]
            done, pending = await asyncio.wait(more)
            assert not pending and {r.result() for r in done} == {0, 1, 4, 9, 16}
            seen = [
                await f
                for f in asyncio.as_completed(
                    [pool.apply_async(targets.square, (i,)) for i in range(4)]
                )
            ]
            assert sorted(seen) == [0, 1, 4, 9]
            assert await asyncio.shield(pool.apply_async(targets.square, (7,))) == 49
            assert await pool.map_async(targets.square, range(3)) == [0, 1, 4]
            pending_result = pool.apply_async(targets.square, (1,))
            with pytest.raises(asyncio.InvalidStateError):
                pending_result.result()
            assert await pending_result == 1


@ASYNC
@pytest.mark.timeout(60)
async def test_wait_for_a_result_cancels_it(anyio_backend: Any, fifos: Callable[[], Fifo]) -> None:
    """``asyncio.wait_for(result, t)`` cancels the result on timeout, as cancelling an await
    would: a ``cancellable`` task's worker is killed and replaced; any other task runs on and
    its result is discarded. The pool stays usable. The same through ``asyncio.timeout()``,
    which is what ``wait_for`` is built on since Python 3.12 (it no longer calls ``cancel()``
    on what it awaits; the result is cancelled because its awaiting task was)."""
    import asyncio

    _asyncio_only(anyio_backend)
    fifo, gate = fifos(), fifos()
    async with apool(1) as pool:
        with anyio.fail_after(WAIT):
            (worker,) = pool._workers
            r = pool.apply_async(targets.announce_and_block, (fifo.path,), cancellable=True)
            pid = int(await fifo.aline())
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(r, 0.05)
            assert r.cancelled() and r.done()
            with pytest.raises(TaskCancelled):
                r.get(0)
            assert await pool.apply_async(targets.getpid) != pid  # a replacement runs it
            assert worker not in pool._workers
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"

            keep = pool.apply_async(targets.announce_and_wait, (fifo.path, gate.path, "ran"))
            pid2 = int(await fifo.aline())
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(keep, 0.05)
            assert keep.cancelled()
            gate.open_gate()
            assert await pool.apply_async(targets.getpid) == pid2  # the same worker, alive
            assert not keep.cancel()  # done already
            assert await fifo.aline() == f"done {pid2}"

            # Python 3.12+'s wait_for, on any Python
            r = pool.apply_async(targets.announce_and_block, (fifo.path,), cancellable=True)
            pid3 = int(await fifo.aline())
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):
                    await r
            assert r.cancelled() and r.done()
            assert gone(pid3)
            keep = pool.apply_async(targets.announce_and_wait, (fifo.path, gate.path, "ran"))
            pid4 = int(await fifo.aline())
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):
                    await keep
            assert keep.cancelled()
            with pytest.raises(asyncio.CancelledError):
                keep.result()
            gate.open_gate()
            assert await pool.apply_async(targets.getpid) == pid4


@ASYNC
@pytest.mark.timeout(60)
async def test_cancelling_a_gather_of_results_cancels_them(
    anyio_backend: Any, fifos: Callable[[], Fifo]
) -> None:
    """An anyio cancel scope around ``asyncio.gather(*results)`` cancels the results it
    waits on: the running cancellable task's worker is replaced, the queued one is dropped."""
    import asyncio

    _asyncio_only(anyio_backend)
    fifo = fifos()
    async with apool(1) as pool:
        with anyio.fail_after(WAIT):
            running = pool.apply_async(targets.announce_and_block, (fifo.path,), cancellable=True)
            queued = pool.apply_async(targets.square, (3,), cancellable=True)
            pid = int(await fifo.aline())
            with anyio.move_on_after(0.05) as scope:
                await asyncio.gather(running, queued)
            assert scope.cancelled_caught
            assert running.cancelled() and queued.cancelled()
            assert await pool.apply_async(targets.getpid) != pid


@ASYNC
@pytest.mark.timeout(60)
async def test_async_with_pool_closes_or_terminates(fifos: Callable[[], Fifo]) -> None:
    """``async with Pool()`` closes and joins on a normal exit (workers exit 0) and
    terminates on an error (pending awaits get PoolClosed)."""
    with anyio.fail_after(WAIT):
        async with aioshm.Pool(2) as pool:
            procs = [w.proc for w in pool._workers]
            assert await pool.map_async(targets.square, range(8)) == [i * i for i in range(8)]
            late = pool.apply_async(targets.slow_square, (3, 0.1))
        assert await late == 9  # close() lets submitted work finish
        assert [p.exitcode for p in procs] == [0, 0]
        assert not pool._workers

        fifo = fifos()
        pool = aioshm.Pool(1)
        try:
            with pytest.raises(RuntimeError, match="inside"):
                async with pool:
                    running = pool.apply_async(targets.announce_and_block, (fifo.path,))
                    pending = pool.apply_async(targets.square, (2,))
                    pid = int(await fifo.aline())
                    raise RuntimeError("inside")
            for r in (running, pending):
                with pytest.raises(PoolClosed):
                    await r
            assert gone(pid)
        finally:
            await pool.terminate_async()


@ASYNC
@pytest.mark.timeout(60)
async def test_progress_iterator_reaches_total() -> None:
    """``async for ev in result.progress()`` yields increasing events ending at done == total;
    on_progress fires alongside."""
    async with apool(2) as pool:
        with anyio.fail_after(WAIT):
            cb_events: list[ProgressEvent] = []
            result = pool.map_async(
                targets.slow_square, range(24), chunksize=3, on_progress=cb_events.append
            )
            events = [ev async for ev in result.progress()]
            assert events, "no progress event"
            assert [e.done for e in events] == sorted(e.done for e in events)
            assert events[-1] == ProgressEvent(24, 24)
            assert cb_events[-1] == ProgressEvent(24, 24)
            assert len(cb_events) == 8
            assert await result == [i * i for i in range(24)]
            # iterating the progress of a finished map still ends at the total
            later = [ev async for ev in result.progress()]
            assert later[-1] == ProgressEvent(24, 24)


# =========================================================================== failures (async)


@ASYNC
@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["sigkill", "segfault", "exit7"])
async def test_async_dying_worker_fails_only_its_task(how: str) -> None:
    """Awaited tasks: the task whose worker died raises ProcessExitedException, every other
    await resolves to its value, and the pool is whole again."""
    async with apool(2) as pool:
        with anyio.fail_after(WAIT):
            results = [pool.apply_async(targets.die_on, (x, 5, how)) for x in range(16)]
            out = [await settle(r) for r in results]
            err = out.pop(5)
            assert isinstance(err, ProcessExitedException)
            assert err.exit_code == {"sigkill": -9, "segfault": -11, "exit7": 7}[how]
            assert out == [x * x for x in range(16) if x != 5]
            assert await pool.map_async(targets.square, range(6)) == [0, 1, 4, 9, 16, 25]
            assert len(pool._workers) == 2
            assert pool.statistics().workers_replaced == 1


@ASYNC
@pytest.mark.timeout(60)
async def test_external_sigkill_in_the_middle_of_a_map(fifos: Callable[[], Fifo]) -> None:
    """SIGKILL from outside to a busy worker while a map runs: only its task fails
    (signal_name SIGKILL); the map's chunks queued on that worker run elsewhere."""
    fifo = fifos()
    async with apool(2) as pool:
        with anyio.fail_after(WAIT):
            blocker = pool.apply_async(targets.announce_and_block, (fifo.path,))
            pid = int(await fifo.aline())
            mapped = pool.map_async(targets.slow_square, range(20), chunksize=1)
            os.kill(pid, signal.SIGKILL)
            with pytest.raises(ProcessExitedException) as info:
                await blocker
            assert info.value.signal_name == "SIGKILL"
            assert info.value.pid == pid
            assert await mapped == [i * i for i in range(20)]
            assert gone(pid)
            assert pid not in worker_pids(pool)
            assert len(pool._workers) == 2
            assert await pool.apply_async(targets.square, (12,)) == 144


@ASYNC
@pytest.mark.timeout(60)
async def test_chaos_random_worker_kills(anyio_backend: Any) -> None:
    """1,000 small tasks on two workers while workers die: some tasks kill their own worker,
    and a side task SIGKILLs random workers. Every await resolves (value or
    ProcessExitedException), the self-killing tasks are among the failures, other failures are
    bounded by the external kills, and the pool ends healthy."""
    rng = random.Random(1234)
    n = 1000
    doomed = frozenset(rng.sample(range(n), 12))
    outcomes: dict[int, Any] = {}
    external_kills = 0
    done = anyio.Event()
    t0 = time.monotonic()
    async with apool(2) as pool:
        with anyio.fail_after(WAIT):
            results = [pool.apply_async(targets.chaos, (i, doomed)) for i in range(n)]

            async def consume(indices: range) -> None:
                for i in indices:
                    outcomes[i] = await settle(results[i])

            async def killer() -> None:
                nonlocal external_kills
                while not done.is_set() and external_kills < 10:
                    # a random moment, not an ordering: the kills are meant to land anywhere
                    with anyio.move_on_after(rng.uniform(0.01, 0.1)):
                        await done.wait()
                    if done.is_set():
                        return
                    victim = rng.choice(pool._workers).proc
                    if victim.is_alive():
                        os.kill(victim.pid, signal.SIGKILL)
                        external_kills += 1

            async with anyio.create_task_group() as tg:
                tg.start_soon(killer)
                async with anyio.create_task_group() as consumers:
                    for k in range(4):
                        consumers.start_soon(consume, range(k, n, 4))
                done.set()

            assert len(outcomes) == n
            failures = {i: o for i, o in outcomes.items() if isinstance(o, BaseException)}
            assert all(isinstance(o, ProcessExitedException) for o in failures.values()), {
                i: repr(o) for i, o in failures.items() if not isinstance(o, ProcessExitedException)
            }
            assert all(o.signal_name == "SIGKILL" for o in failures.values())
            assert doomed <= failures.keys()
            assert len(failures.keys() - doomed) <= external_kills
            assert all(outcomes[i] == i * i for i in range(n) if i not in failures)
            # healthy: the full complement of live workers, and they work
            assert await pool.map_async(targets.square, range(50)) == [i * i for i in range(50)]
            assert len(pool._workers) == 2
            assert all(w.proc.is_alive() for w in pool._workers)
            stats = pool.statistics()
            assert stats.workers_replaced >= len(doomed)
            assert stats.tasks_pending == 0
            assert stats.busy_workers == 0
    assert time.monotonic() - t0 < 30, "chaos run too slow"


# =========================================================================== cancellation


@ASYNC
@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["move_on_after", "fail_after", "cancel_scope"])
async def test_cancellable_task_kills_its_worker(how: str, fifos: Callable[[], Fifo]) -> None:
    """cancellable=True: cancelling the await kills the worker (reaped, not a zombie), a
    replacement starts, and the next task works; other holders see TaskCancelled."""
    fifo = fifos()
    async with apool(1) as pool:
        with anyio.fail_after(WAIT):
            result = pool.apply_async(targets.announce_and_block, (fifo.path,), cancellable=True)
            pid = int(await fifo.aline())
            assert worker_pids(pool) == {pid}
            t0 = time.monotonic()
            if how == "move_on_after":
                with anyio.move_on_after(0.1) as scope:
                    await result
                assert scope.cancelled_caught
            elif how == "fail_after":
                with pytest.raises(TimeoutError), anyio.fail_after(0.1):
                    await result
            else:
                async with anyio.create_task_group() as tg:
                    started = anyio.Event()

                    async def awaiter() -> None:
                        with anyio.CancelScope() as scope:
                            started.set()
                            await result
                        assert scope.cancelled_caught

                    tg.start_soon(awaiter)
                    await started.wait()
                    await anyio.lowlevel.checkpoint()
                    tg.cancel_scope.cancel()
            # terminate (the worker does not ignore SIGTERM) -- well within the grace period
            assert time.monotonic() - t0 < aioshm._pool._pool.GRACE_PERIOD + 1
            assert gone(pid)
            assert result.ready() and result.cancelled()
            with pytest.raises(TaskCancelled):
                result.get(timeout=0)
            new = worker_pids(pool)
            assert len(new) == 1
            assert pid not in new
            assert await pool.apply_async(targets.getpid) in new
            assert pool.statistics().workers_replaced == 1


@ASYNC
@pytest.mark.timeout(60)
async def test_two_cancellable_tasks_on_one_worker_cancelled_together(
    fifos: Callable[[], Fifo],
) -> None:
    """Two cancellable tasks sent to the same worker (one running, one queued behind it),
    awaited in two tasks that are cancelled at once: both awaits end with the cancellation
    alone, the worker is killed once and replaced.

    Fails today with BusyResourceError: both ``_abandon`` calls run ``stop_async`` on the same
    process and wait on its sentinel at once (see the report)."""
    fifo = fifos()
    async with apool(1) as pool:
        with anyio.fail_after(WAIT):
            running = pool.apply_async(targets.announce_and_block, (fifo.path,), cancellable=True)
            queued = pool.apply_async(targets.getpid, cancellable=True)
            pid = int(await fifo.aline())
            assert [len(w.inflight) for w in pool._workers] == [2]  # both on this worker

            async def awaiter(r: Any) -> None:
                await r  # only the cancellation may end this; any exception fails the test

            async with anyio.create_task_group() as tg:
                for r in (running, queued):
                    tg.start_soon(awaiter, r)
                await anyio.wait_all_tasks_blocked()  # both awaits are parked
                tg.cancel_scope.cancel()
            assert gone(pid)
            assert running.ready()
            assert len(pool._workers) == 1
            assert await pool.apply_async(targets.getpid) != pid


@ASYNC
@pytest.mark.timeout(60)
async def test_cancellable_pending_task_is_dropped(fifos: Callable[[], Fifo]) -> None:
    """Cancelling the await of a cancellable task that was never sent drops it; no worker is
    killed."""
    fifo, gate = fifos(), fifos()
    async with apool(1) as pool:
        with anyio.fail_after(WAIT):
            first = pool.apply_async(targets.announce_and_wait, (fifo.path, gate.path, "a"))
            pid = int(await fifo.aline())
            fill = pool.apply_async(targets.square, (2,))  # takes the worker's second slot
            queued = pool.apply_async(targets.getpid, cancellable=True)
            assert pool.statistics().tasks_pending == 1
            with anyio.move_on_after(0.05) as scope:
                await queued
            assert scope.cancelled_caught
            assert pool.statistics().tasks_pending == 0
            gate.open_gate()
            assert await first == "a"
            assert await fill == 4
            assert worker_pids(pool) == {pid}
            assert pool.statistics().workers_replaced == 0


@ASYNC
@pytest.mark.timeout(60)
async def test_not_cancellable_task_runs_on(fifos: Callable[[], Fifo]) -> None:
    """cancellable=False: cancelling the await leaves the worker running the task; it
    finishes and then serves the next task (same worker)."""
    fifo, gate = fifos(), fifos()
    async with apool(1) as pool:
        with anyio.fail_after(WAIT):
            result = pool.apply_async(targets.announce_and_wait, (fifo.path, gate.path, "first"))
            pid = int(await fifo.aline())
            with anyio.move_on_after(0.1) as scope:
                await result
            assert scope.cancelled_caught
            assert not gone(pid)
            assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
            # the result is cancelled (as a future awaited by a cancelled task), the task
            # runs on and its value is discarded
            assert result.ready() and result.cancelled()
            with pytest.raises(TaskCancelled):
                result.get(0)
            following = pool.apply_async(targets.getpid)
            gate.open_gate()
            assert await fifo.aline() == f"done {pid}"
            assert await following == pid
            assert worker_pids(pool) == {pid}
            assert pool.statistics().workers_replaced == 0


@ASYNC
@pytest.mark.timeout(60)
async def test_terminate_async_fails_pending_awaits(fifos: Callable[[], Fifo]) -> None:
    """terminate_async() while tasks are awaited: each await raises PoolClosed promptly."""
    fifo = fifos()
    pool = aioshm.Pool(1)
    try:
        with anyio.fail_after(WAIT):
            results = [pool.apply_async(targets.announce_and_block, (fifo.path,))]
            results += [pool.apply_async(targets.square, (i,)) for i in range(3)]
            results.append(pool.map_async(targets.square, range(10)))
            outcomes: dict[int, Any] = {}

            async def waiter(i: int) -> None:
                outcomes[i] = await settle(results[i])

            async with anyio.create_task_group() as tg:
                for i in range(len(results)):
                    tg.start_soon(waiter, i)
                pid = int(await fifo.aline())
                t0 = time.monotonic()
                await pool.terminate_async()
            assert time.monotonic() - t0 < aioshm._pool._pool.GRACE_PERIOD + 2
            assert all(isinstance(o, PoolClosed) for o in outcomes.values()), outcomes
            assert len(outcomes) == len(results)
            assert gone(pid)
            with pytest.raises(ValueError):
                pool.apply_async(targets.square, (1,))
            await pool.join_async()
    finally:
        pool.terminate()


# =========================================================================== shared arrays


@ASYNC
@pytest.mark.timeout(60)
async def test_shared_arrays_both_ways_and_no_views_left() -> None:
    """A task mutates a shared array in place (seen here) and returns new arrays (they arrive
    shared); after each task the worker holds no segment views, and its mapped segments stay
    bounded over many tasks."""
    async with apool(1) as pool:
        with anyio.fail_after(WAIT):
            n = 20_000  # 160 KB: above the share threshold
            a = aioshm.zeros(10)
            made, big, was_shared = await pool.apply_async(targets.mutate_and_make, (a, n))
            assert was_shared
            np.testing.assert_array_equal(a, np.ones(10))
            assert aioshm.is_shared(made)
            np.testing.assert_array_equal(made, np.full(n, 7.0))
            assert aioshm.is_shared(big)
            np.testing.assert_array_equal(big, np.arange(n, dtype=np.float64))
            # a plain big array goes in as a handle too, and comes back summed
            plain = np.arange(n, dtype=np.float64)
            assert await pool.apply_async(targets.sum_array, (plain,)) == plain.sum()
            del made, big
            _, _, views = await pool.apply_async(targets.segment_report)
            assert views == 0
            counts = []
            for _ in range(20):
                await pool.apply_async(targets.mutate_and_make, (a, n))
                _, mapped, views = await pool.apply_async(targets.segment_report)
                assert views == 0
                counts.append(mapped)
            assert max(counts) <= counts[0] + 2, counts  # the worker's mappings do not grow
            np.testing.assert_array_equal(a, np.full(10, 21.0))
            # map: every item's array comes back shared
            outs = await pool.map_async(targets.identity, [plain] * 3)
            assert all(aioshm.is_shared(o) for o in outs)
            del outs, a


@ASYNC
@pytest.mark.timeout(60)
async def test_worker_maps_a_shared_array_once_and_unmaps_it_when_the_parent_drops_it() -> None:
    """A worker keeps a received segment mapped between tasks while the parent holds it (the
    same array sent again costs no new mapping); when the parent drops the array the pool
    tells its workers, and the worker unmaps it before its next task."""
    async with apool(1) as pool:
        with anyio.fail_after(WAIT):
            a = aioshm.zeros(1 << 18)  # 2 MiB
            first = await pool.apply_async(targets.segment_of, (a,))
            again = await pool.apply_async(targets.segment_of, (a[::2],))
            assert again == first  # same process, same Segment object, same address
            key = first[1]
            assert key in await pool.apply_async(targets.mapped_keys)
            # another array is mapped beside it
            b = aioshm.ones(1 << 10)
            other = await pool.apply_async(targets.segment_of, (b,))
            assert other[1] != key
            del a
            gc.collect()  # the parent's last view: its segment closes, workers are told
            keys = await pool.apply_async(targets.mapped_keys)
            assert key not in keys, "the worker still maps a segment nobody else holds"
            assert other[1] in keys  # b is still held here: still retained there
            del b
            gc.collect()
            assert other[1] not in await pool.apply_async(targets.mapped_keys)


@ASYNC
@pytest.mark.timeout(60)
async def test_retained_segment_stays_usable_when_sent_again() -> None:
    """A retained mapping is the live segment: a write by the parent between tasks is seen by
    the worker's next task, and the worker's writes are seen here."""
    async with apool(1) as pool:
        with anyio.fail_after(WAIT):
            a = aioshm.zeros(1 << 16)
            assert await pool.apply_async(targets.sum_array, (a,)) == 0.0
            a[:] = 2.0
            assert await pool.apply_async(targets.sum_array, (a,)) == 2.0 * a.size
            await pool.apply_async(targets.mutate_and_make, (a[:10], 5))
            np.testing.assert_array_equal(a[:10], np.full(10, 3.0))


@ASYNC
@pytest.mark.timeout(60)
async def test_await_is_a_checkpoint_in_a_cancelled_scope() -> None:
    """Awaiting a result inside an already-cancelled scope is cancelled, whether the result is
    pending or ready (an await is a checkpoint), and the pool stays usable."""
    async with apool(1) as pool:
        with anyio.fail_after(WAIT):
            ready = pool.apply_async(targets.square, (3,))
            assert await ready == 9
            reached = []
            for result in (ready, pool.apply_async(targets.square, (4,))):
                with anyio.CancelScope() as scope:
                    scope.cancel()
                    await result
                    reached.append(result)  # not reached: the await raised
                assert scope.cancelled_caught
            assert reached == []
            assert await pool.apply_async(targets.square, (5,)) == 25


@ASYNC
@pytest.mark.timeout(60)
async def test_a_long_task_brings_the_send_ahead_depth_back_to_the_minimum() -> None:
    """Short tasks are sent ahead (how far depends on their speed: the benchmark shows it);
    one task longer than the look-ahead budget brings the depth back to the minimum at once,
    so at most a budget's worth of work waits behind an unexpectedly long task."""
    from aioshm._pool._scheduler import AHEAD, DEPTH, MAX_DEPTH

    async with apool(1) as pool:
        with anyio.fail_after(WAIT):
            assert await pool.map_async(targets.square, range(400), chunksize=1) == [
                i * i for i in range(400)
            ]
            assert DEPTH <= pool._ahead.depth <= MAX_DEPTH
            assert await pool.apply_async(targets.slow_square, (2, 20 * AHEAD)) == 4
            assert pool._ahead.depth == DEPTH


# =========================================================================== no threads


@ASYNC
@pytest.mark.timeout(60)
async def test_async_paths_start_no_threads(fifos: Callable[[], Fifo]) -> None:
    """No thread is started while awaiting every async path of a pool (sampled during the
    awaits and in callbacks)."""
    new_threads = new_thread_counter()
    samples: list[int] = []
    stop = anyio.Event()

    async def sampler() -> None:
        while not stop.is_set():
            samples.append(new_threads())
            with anyio.move_on_after(0.002):  # a sampling rate, not synchronisation
                await stop.wait()

    fifo = fifos()
    async with anyio.create_task_group() as tg:
        tg.start_soon(sampler)
        try:
            with anyio.fail_after(WAIT):
                async with aioshm.Pool(2) as pool:
                    await pool.apply_async(targets.slow_square, (2, 0.05))
                    await pool.map_async(
                        targets.slow_square,
                        range(10),
                        chunksize=1,
                        on_progress=lambda _: samples.append(new_threads()),
                    )
                    samples.extend(
                        [
                            new_threads()
                            async for _ in pool.imap_unordered(targets.slow_square, range(6))
                        ]
                    )
                    r = pool.map_async(targets.slow_square, range(6), chunksize=1)
                    samples.extend([new_threads() async for _ in r.progress()])
                    c = pool.apply_async(targets.announce_and_block, (fifo.path,), cancellable=True)
                    await fifo.aline()
                    with anyio.move_on_after(0.05):
                        await c
                    samples.append(new_threads())
                assert await aioshm.run_sync(targets.slow_square, 3, 0.05) == 9
        finally:
            stop.set()
    assert len(samples) > 20
    assert set(samples) == {0}, f"new threads seen: {sorted(set(samples))}"


# =========================================================================== run_sync


@ASYNC
@pytest.mark.timeout(60)
async def test_run_sync_values_kwargs_exceptions() -> None:
    """run_sync returns the value, takes keyword arguments through functools.partial, carries
    arrays, and re-raises exceptions with their type and remote traceback."""
    with anyio.fail_after(WAIT):
        assert await aioshm.run_sync(targets.square, 12) == 144
        assert await aioshm.run_sync(functools.partial(targets.power, 3, exp=4, mod=5)) == 1
        assert await aioshm.run_sync(targets.add, 2, 3) == 5
        with pytest.raises(targets.CustomError) as info:
            await aioshm.run_sync(targets.raise_custom, "rs", 5)
        assert info.value.code == 5
        assert isinstance(info.value.__cause__, RemoteTraceback)
        a = aioshm.zeros(4)
        made, _, _ = await aioshm.run_sync(targets.mutate_and_make, a, 10)
        np.testing.assert_array_equal(a, np.ones(4))
        assert aioshm.is_shared(made)
        pool = current_default_pool()
        assert 1 <= len(pool._workers) <= (os.cpu_count() or 1)
        del made, a


@ASYNC
@pytest.mark.timeout(60)
async def test_run_sync_cancellable_kills_on_timeout(fifos: Callable[[], Fifo]) -> None:
    """run_sync(cancellable=True) under fail_after: the timeout kills the worker running it;
    the next call works on a fresh worker. cancellable=False is shielded: the call completes."""
    fifo = fifos()
    with anyio.fail_after(WAIT):
        pid = await aioshm.run_sync(targets.getpid)
        got: list[str] = []

        async def call() -> None:
            with pytest.raises(TimeoutError), anyio.fail_after(1.0):
                await aioshm.run_sync(targets.announce_and_block, fifo.path, cancellable=True)

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            got.append(await fifo.aline())
        assert got == [str(pid)]
        assert gone(pid)
        pool = current_default_pool()
        assert pid not in worker_pids(pool)
        new = await aioshm.run_sync(targets.getpid)
        assert new != pid
        # not cancellable: shielded, the call completes despite the expired deadline
        t0 = time.monotonic()
        value = None
        with anyio.move_on_after(0.05):
            value = await aioshm.run_sync(targets.slow_square, 4, 0.3)
        assert value == 16
        assert time.monotonic() - t0 >= 0.29
        assert new in worker_pids(pool)
        assert await aioshm.run_sync(targets.getpid) in worker_pids(pool)


@ASYNC
@pytest.mark.timeout(60)
async def test_run_sync_limiter_bounds_concurrency(fifos: Callable[[], Fifo]) -> None:
    """With the default limiter two calls overlap (two workers on two cores); with
    CapacityLimiter(1) they run one after the other."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs two CPUs for the default limiter to allow two calls")
    fifo, gate = fifos(), fifos()
    with anyio.fail_after(WAIT):
        limiter = anyio.CapacityLimiter(1)
        async with anyio.create_task_group() as tg:
            for tag in "cd":
                tg.start_soon(
                    functools.partial(
                        aioshm.run_sync, targets.stamp, fifo.path, tag, None, 0.2, limiter=limiter
                    )
                )
        lines = [await fifo.aline() for _ in range(4)]
        first, second = lines[0][-1], lines[2][-1]
        assert {first, second} == {"c", "d"}
        assert lines == [f"start {first}", f"end {first}", f"start {second}", f"end {second}"]

    # default limiter: both calls must be running at once (each waits for the gate, which
    # opens only once both started). cancellable=True, so that a failure here cannot hang:
    # the deadline kills the workers instead of waiting on them shielded.
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for tag in "ab":
                tg.start_soon(
                    functools.partial(
                        aioshm.run_sync, targets.stamp, fifo.path, tag, gate.path, cancellable=True
                    )
                )
            starts = {await fifo.aline(), await fifo.aline()}
            assert starts == {"start a", "start b"}  # both started before either may end
            gate.open_gate(2)
        assert {await fifo.aline(), await fifo.aline()} == {"end a", "end b"}


@pytest.mark.timeout(90)
@pytest.mark.timeout(60)
def test_pool_awaited_from_successive_event_loops() -> None:
    """A pool made outside any loop is awaited from one ``asyncio.run`` after another (the
    loop that watched its fds is gone by the second run) and from trio in between."""
    import asyncio

    async def use(pool: aioshm.Pool, base: int) -> list[Any]:
        results = [pool.apply_async(targets.square, (base + i,)) for i in range(3)]
        return [await r for r in results]

    with aioshm.Pool(1) as pool:
        assert asyncio.run(use(pool, 0)) == [0, 1, 4]
        assert anyio.run(use, pool, 3, backend="trio") == [9, 16, 25]
        assert asyncio.run(use(pool, 6)) == [36, 49, 64]
        assert pool.apply_async(targets.square, (9,)).get(WAIT) == 81


def test_run_sync_default_pool_stops_at_loop_end() -> None:
    """After ``anyio.run`` returns (asyncio and trio), the default pool's workers are gone,
    even with a cancellable and a shielded call's worker still alive at the loop's end."""
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(TESTS_DIR)!r})
        import anyio, psutil
        import aioshm
        import _pool_targets as targets

        async def main():
            pids = [await aioshm.run_sync(targets.getpid)]
            async with anyio.create_task_group() as tg:
                tg.start_soon(aioshm.run_sync, targets.getpid)
                tg.start_soon(aioshm.run_sync, targets.getpid)
            from aioshm._pool._run_sync import current_default_pool
            return sorted({{w.proc.pid for w in current_default_pool()._workers}} | set(pids))

        report = {{}}
        for backend in ("asyncio", "trio"):
            pids = anyio.run(main, backend=backend)
            alive = [p for p in pids if psutil.pid_exists(p)]
            report[backend] = {{"pids": pids, "alive": alive}}
        print(json.dumps(report))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO_DIR,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for backend in ("asyncio", "trio"):
        assert report[backend]["pids"], report
        assert report[backend]["alive"] == [], report


# =========================================================================== the broken-pool rule

STARTUP_FAILURES = aioshm._pool._scheduler.STARTUP_FAILURES


def _fifo_lines(fifo: Fifo) -> list[str]:
    """Every complete line written to ``fifo`` so far (non-blocking)."""
    fifo._read_some()
    lines = []
    while (line := fifo._take_line()) is not None:
        lines.append(line)
    return lines


def _check_broken(error: BaseException, pids: list[str], processes: int) -> None:
    assert isinstance(error, aioshm.BrokenPool), repr(error)
    assert isinstance(error, aioshm.AioshmError)
    assert "initializer raised ValueError" in str(error)
    cause = error.__cause__
    assert isinstance(cause, ValueError) and "always fails" in str(cause)
    assert isinstance(cause.__cause__, RemoteTraceback)
    assert "failing_initializer" in error.remote_traceback
    # bounded restarts: the rule, plus the workers that were starting when it broke
    assert STARTUP_FAILURES <= len(pids) < STARTUP_FAILURES + processes
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is aioshm.BrokenPool
    assert (again.msg, again.remote_traceback) == (error.msg, error.remote_traceback)


@pytest.mark.timeout(60)
def test_initializer_that_raises_breaks_the_pool_blocking(fifos: Callable[[], Fifo]) -> None:
    """An initializer that always raises: after STARTUP_FAILURES worker deaths in a row the
    pool gives up; pending and later tasks raise BrokenPool (cause: the initializer's
    exception with its remote traceback) and no worker is started any more."""
    fifo = fifos()
    pool = aioshm.Pool(2, initializer=targets.failing_initializer, initargs=(fifo.path,))
    try:
        pending = [pool.apply_async(targets.square, (i,)) for i in range(5)]
        with pytest.raises(aioshm.BrokenPool) as info:
            pool.map(targets.square, range(10))
        for result in pending:
            with pytest.raises(aioshm.BrokenPool):
                result.get(WAIT)
        with pytest.raises(aioshm.BrokenPool):
            pool.apply_async(targets.square, (1,))
        pool.close()
        pool.join()  # the workers left were stopped
        assert not pool._workers
        _check_broken(info.value, _fifo_lines(fifo), 2)
    finally:
        shut(pool)


@ASYNC
@pytest.mark.timeout(60)
async def test_initializer_that_raises_breaks_the_pool(fifos: Callable[[], Fifo]) -> None:
    """The same on the async face: every await ends with BrokenPool, none hangs."""
    fifo = fifos()
    async with apool(2, initializer=targets.failing_initializer, initargs=(fifo.path,)) as pool:
        with anyio.fail_after(WAIT):
            results = [pool.apply_async(targets.square, (i,)) for i in range(5)]
            errors = [await settle(r) for r in results]
            with pytest.raises(aioshm.BrokenPool):
                await pool.map_async(targets.square, range(10))
            with pytest.raises(aioshm.BrokenPool):
                pool.apply_async(targets.square, (1,))
            pool.close()
            await pool.join_async()
        assert not pool._workers
        for error in errors:
            assert isinstance(error, aioshm.BrokenPool)
        _check_broken(errors[0], _fifo_lines(fifo), 2)


def test_a_worker_that_gets_through_start_up_resets_the_count() -> None:
    """Deaths of workers that had started (here: killed while idle) never break a pool."""
    pool = aioshm.Pool(1)
    try:
        for _ in range(STARTUP_FAILURES + 1):
            pid = pool.apply(targets.getpid)
            kill_and_wait(pool, {pid})
        assert pool.apply(targets.square, (4,)) == 16
    finally:
        shut(pool)


_BROKEN_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
import aioshm
import _pool_targets as targets

FACE, BACKEND = {face!r}, {backend!r}
# no `if __name__ == "__main__":` guard: every worker re-runs this and dies at start-up
report = {{}}


def record(exc):
    report.setdefault("errors", []).append(
        [type(exc).__name__, str(exc), type(exc.__cause__).__name__]
    )


if FACE == "blocking":
    pool = aioshm.Pool(2)
    for _ in range(2):  # a later task fails at once too
        try:
            pool.apply(targets.square, (3,))
        except aioshm.BrokenPool as exc:
            record(exc)
    pool.terminate()
    pool.join()
else:
    import anyio

    async def main():
        with anyio.fail_after(30):
            for _ in range(2):
                try:
                    if FACE == "pool":
                        await pool.apply_async(targets.square, (3,))
                    else:
                        await aioshm.run_sync(targets.square, 3)
                except aioshm.BrokenPool as exc:
                    record(exc)
            if FACE == "pool":
                await pool.terminate_async()

    if FACE == "pool":
        pool = aioshm.Pool(2)
    options = {{"use_uvloop": True}} if BACKEND == "uvloop" else {{}}
    anyio.run(main, backend="trio" if BACKEND == "trio" else "asyncio", backend_options=options)
print(json.dumps(report))
"""


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("face", "backend"),
    [
        ("blocking", None),
        ("pool", "asyncio"),
        ("pool", "uvloop"),
        ("pool", "trio"),
        ("run_sync", "asyncio"),
        ("run_sync", "uvloop"),
        ("run_sync", "trio"),
    ],
)
@pytest.mark.parametrize("trigger", ["no_main_guard", "main_from_stdin"])
def test_workers_dying_at_start_up_break_the_pool(
    tmp_path: Path, trigger: str, face: str, backend: str | None
) -> None:
    """A script without a main guard, or read from stdin: its workers die at start-up. The
    pool (and run_sync's default pool) gives up after STARTUP_FAILURES deaths in a row, every
    await and call raises BrokenPool, and stderr holds a bounded number of tracebacks."""
    script = _BROKEN_SCRIPT.format(tests=str(TESTS_DIR), face=face, backend=backend)
    path = tmp_path / "broken_main.py"
    path.write_text(script)
    if trigger == "no_main_guard":
        args, stdin = [sys.executable, str(path)], None
    else:
        args, stdin = [sys.executable, "-"], script
    proc = subprocess.run(
        args, input=stdin, capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    errors = report["errors"]
    assert len(errors) == 2, report
    for name, message, cause in errors:
        assert name == "BrokenPool"
        assert "died at start-up" in message and "__main__" in message
        assert cause == "ProcessExitedException"
    processes = 2 if face != "run_sync" else os.cpu_count() or 1
    tracebacks = proc.stderr.count("Traceback (most recent call last)")
    assert STARTUP_FAILURES <= tracebacks < STARTUP_FAILURES + processes, proc.stderr[-3000:]
    assert "the pool is broken" in proc.stderr  # logged once, at ERROR


# =========================================================================== the cancel-kill race


@ASYNC
@pytest.mark.timeout(60)
async def test_worker_replaced_by_a_blocking_call_is_watched_by_the_loop() -> None:
    """Regression (CI once hung in ``test_cancellable_task_kills_its_worker[asyncio+uvloop]``):
    a worker replaced while the event loop's watch of the pool's fds is started, by a step
    that is not the loop's (there: ``result.get(timeout=0)`` right after the cancel), ate the
    wake-up byte that told the loop to watch the new worker's fds; the next await then parked
    on a watch of the dead worker's fds for ever. Here the replacement happens in a blocking
    ``get`` between two awaits, with no loop iteration in between."""
    async with apool(1) as pool:
        with anyio.fail_after(WAIT):
            pid = await pool.apply_async(targets.getpid)  # the loop now watches this worker
            kill_and_wait(pool, {pid})
            # blocking, in the loop's thread: reaps the worker, starts and uses a new one
            new = pool.apply_async(targets.getpid).get(WAIT)
            assert new != pid
            assert await pool.apply_async(targets.getpid) == new
            assert await pool.apply_async(targets.square, (5,)) == 25


# =========================================================================== faces and logging


@pytest.mark.timeout(60)
def test_each_face_hands_out_its_own_pool() -> None:
    """``aioshm.get_context(m).Pool`` builds ``aioshm.Pool``; ``aioshm.multiprocessing
    .get_context(m).Pool`` stays the stdlib-compatible pool. Both run tasks."""
    import multiprocessing.pool

    import aioshm.multiprocessing as amp

    ctx = aioshm.get_context("spawn")
    assert ctx.get_context("forkserver") is aioshm.get_context("forkserver")
    assert ctx.get_start_method() == "spawn"
    with aioshm.get_context().Pool(1) as pool:
        assert type(pool) is aioshm.Pool
        assert pool._ctx.get_start_method() == aioshm.DEFAULT_START_METHOD
        assert pool.apply(targets.square, (3,)) == 9
    with amp.get_context("forkserver").Pool(1) as stdlib_pool:
        assert isinstance(stdlib_pool, multiprocessing.pool.Pool)
        assert not isinstance(stdlib_pool, aioshm.Pool)
        assert stdlib_pool.apply(targets.square, (4,)) == 16
    with pytest.raises(ValueError, match="nope"):
        aioshm.get_context("nope")


@pytest.mark.timeout(60)
def test_worker_deaths_and_a_broken_pool_are_logged(
    caplog: pytest.LogCaptureFixture, fifos: Callable[[], Fifo]
) -> None:
    """A worker death (and its replacement) is a WARNING of the ``aioshm`` logger, a broken
    pool an ERROR; the library installs no handler."""
    import logging

    assert logging.getLogger("aioshm").handlers == []
    caplog.set_level(logging.INFO, logger="aioshm")
    pool = aioshm.Pool(1)
    try:
        pid = pool.apply(targets.getpid)
        kill_and_wait(pool, {pid})
        assert pool.apply(targets.getpid) != pid
    finally:
        shut(pool)
    deaths = [r for r in caplog.records if r.name == "aioshm" and str(pid) in r.getMessage()]
    assert len(deaths) == 1 and deaths[0].levelno == logging.WARNING
    assert "SIGKILL" in deaths[0].getMessage() and "replacing it" in deaths[0].getMessage()
    caplog.clear()
    fifo = fifos()
    pool = aioshm.Pool(1, initializer=targets.failing_initializer, initargs=(fifo.path,))
    try:
        with pytest.raises(aioshm.BrokenPool):
            pool.apply(targets.square, (1,))
    finally:
        shut(pool)
    levels = [r.levelno for r in caplog.records if r.name == "aioshm"]
    assert levels.count(logging.ERROR) == 1
    assert levels.count(logging.WARNING) == STARTUP_FAILURES

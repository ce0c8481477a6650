"""Awaiting processes and process groups, on asyncio, uvloop and trio (DESIGN.md §2.1, §2.3, §2.4).

* ``await p`` returns the target's return value (starting the process if needed; arrays come
  back shared), re-raises the child's exception as its original type with a
  ``RemoteTraceback`` as ``__cause__``, wraps what cannot be pickled in a clear error, and turns
  a death without a result (SIGKILL, SIGSEGV, ``os._exit``) into ``ProcessExitedException`` at
  once; ``join_async(timeout)``; ``async with p``; cancelling ``await p`` leaves no child
  alive or unreaped; a child's ``KeyboardInterrupt`` is a failure;
* ``await aioshm.spawn(...)``: per-rank results, the first failure stopping the other ranks,
  ``join_async(timeout)``, ``async with ctx``, cancellation that reaps every rank, and a
  warning for ``fork`` under a running loop;
* loop hygiene: no thread is started by any async operation; ``import aioshm.multiprocessing``
  and a child's run never import anyio.

At most two children per test. Children report through pipes and queues, never by sleeping;
every test kills and reaps what it started in ``finally``.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import traceback
import warnings
from collections.abc import Iterable, Iterator
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

import _async_targets as targets
from _threads import new_thread_counter

import aioshm
from aioshm import ProcessExitedException, ProcessRaisedException, RemoteTraceback, _procutil

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


def reap_group(group: Any) -> None:
    """:func:`reap` for every rank of a spawn context, and close its result pipes."""
    if group is None:
        return
    reap(group.processes)
    group._close_all_conns()


def returncode(p: Any) -> int | None:
    """The exit status the process object has *already* collected (no polling, no reaping)."""
    popen = getattr(p, "_popen", None)
    return None if popen is None else popen.returncode


def assert_gone(pid: int) -> None:
    """``pid`` is neither running nor a zombie (it was reaped)."""
    try:
        status = psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return
    raise AssertionError(f"pid {pid} still exists ({status})")


# =========================================================================== await p


@pytest.mark.timeout(60)
async def test_await_process_returns_the_targets_value_starting_it_if_needed() -> None:
    """``await p`` starts an unstarted process and returns what its target returned; awaiting
    a started one works as well."""
    p1 = CTX.Process(target=targets.double, args=(21,))
    p2 = CTX.Process(target=targets.double, args=(50,))
    try:
        with anyio.fail_after(WAIT):
            assert await p1 == 42
            assert p1.exitcode == 0
            p2.start()
            assert await p2 == 100
            assert p2.exitcode == 0
    finally:
        reap([p1, p2])


@pytest.mark.timeout(60)
async def test_arrays_come_back_shared() -> None:
    """A shared argument written by the child is seen by the parent; arrays returned (shared,
    or large) arrive in shared memory with the child's contents."""
    arr = aioshm.ones(1000, dtype=np.float64)
    procs = [
        CTX.Process(target=targets.scale_and_return, args=(arr, 3.0)),
        CTX.Process(target=targets.make_shared, args=(500, 7.0)),
        CTX.Process(target=targets.make_plain, args=(1 << 16, 2.5)),
    ]
    try:
        with anyio.fail_after(WAIT):
            back = await procs[0]
            assert (arr == 3.0).all()  # the child's write, seen through the parent's array
            assert aioshm.is_shared(back)
            back[0] = -1.0  # the returned array maps the same memory
            assert arr[0] == -1.0

            made = await procs[1]
            assert aioshm.is_shared(made)
            assert made.shape == (500,) and (made == 7.0).all()

            plain = await procs[2]  # 512 KiB: above the share threshold
            assert aioshm.is_shared(plain)
            assert plain.shape == (1 << 16,) and (plain == 2.5).all()
    finally:
        reap(procs)


@pytest.mark.timeout(60)
async def test_child_exception_is_reraised_with_its_type_and_remote_traceback() -> None:
    """The child's exception is re-raised as its original type, with a ``RemoteTraceback``
    holding the child's formatted traceback as ``__cause__``."""
    p = CTX.Process(target=targets.raise_value_error, args=("boom 42",))
    try:
        with anyio.fail_after(WAIT), pytest.raises(ValueError, match="boom 42") as info:
            await p
        cause = info.value.__cause__
        assert isinstance(cause, RemoteTraceback)
        assert "Traceback (most recent call last)" in cause.tb
        assert "raise_value_error" in cause.tb
        assert "ValueError: boom 42" in cause.tb
        assert p.exitcode == 1
    finally:
        reap([p])


@pytest.mark.timeout(60)
async def test_unpicklable_exception_becomes_process_raised_exception() -> None:
    """An exception that cannot be pickled comes back as ``ProcessRaisedException`` carrying
    its type name and the traceback text."""
    p = CTX.Process(target=targets.raise_unpicklable, args=("locked out",))
    try:
        with anyio.fail_after(WAIT), pytest.raises(ProcessRaisedException) as info:
            await p
        err = info.value
        assert err.exc_type_name == "_async_targets.UnpicklableError"
        assert "raise_unpicklable" in err.remote_traceback
        assert "locked out" in err.remote_traceback
        assert "UnpicklableError" in str(err)
        assert err.pid == p.pid
    finally:
        reap([p])


@pytest.mark.timeout(60)
async def test_unpicklable_return_value_is_a_clear_error_naming_it() -> None:
    """A return value that cannot be pickled raises an error that names its type."""
    p = CTX.Process(target=targets.return_unpicklable)
    try:
        with anyio.fail_after(WAIT), pytest.raises(Exception) as info:
            await p
        text = str(info.value) + str(info.value.__cause__)
        assert "Unreturnable" in text, text
        assert "pickle" in text.lower(), text
        assert not isinstance(info.value, ProcessExitedException)
    finally:
        reap([p])


@pytest.mark.timeout(60)
async def test_sigkill_during_await_raises_process_exited_within_2_s() -> None:
    """A child SIGKILLed while awaited makes ``await p`` raise ``ProcessExitedException``
    (signal_name ``"SIGKILL"``) in under 2 s from the kill."""
    conn, conn_child = aioshm.Pipe()
    p = CTX.Process(target=targets.ready_then_block, args=(conn_child,))
    caught: dict[str, Any] = {}
    try:
        p.start()
        conn_child.close()

        async def awaiter() -> None:
            try:
                await p
            except ProcessExitedException as exc:
                caught["exc"] = exc
                caught["at"] = time.monotonic()

        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(awaiter)
                pid = await conn.recv_async()
                await anyio.wait_all_tasks_blocked()
                killed_at = time.monotonic()
                os.kill(pid, signal.SIGKILL)
        err = caught["exc"]
        assert err.signal_name == "SIGKILL"
        assert err.exit_code == -signal.SIGKILL
        assert err.pid == pid
        assert caught["at"] - killed_at < 2.0
        assert_gone(pid)
    finally:
        conn.close()
        reap([p])


@pytest.mark.timeout(60)
async def test_segfault_raises_process_exited_with_sigsegv() -> None:
    """A child that segfaults makes ``await p`` raise ``ProcessExitedException`` with
    signal_name ``"SIGSEGV"``."""
    p = CTX.Process(target=targets.segfault)
    try:
        with anyio.fail_after(WAIT), pytest.raises(ProcessExitedException) as info:
            await p
        assert info.value.signal_name == "SIGSEGV"
        assert info.value.exit_code == -signal.SIGSEGV
    finally:
        reap([p])


@pytest.mark.timeout(60)
async def test_os_exit_raises_process_exited_with_the_exit_code() -> None:
    """``os._exit(3)`` makes ``await p`` raise ``ProcessExitedException`` with exit_code 3."""
    p = CTX.Process(target=targets.exit_with, args=(3,))
    try:
        with anyio.fail_after(WAIT), pytest.raises(ProcessExitedException) as info:
            await p
        assert info.value.exit_code == 3
        assert info.value.signal_name is None
    finally:
        reap([p])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
async def test_exit_status_is_exact_under_every_start_method(method: str) -> None:
    """Under every start method, ``await p`` reports ``os._exit(3)`` as exit_code 3, and
    ``join_async()`` returns only once the child is reaped (exitcode known) — every time, not
    just when the sentinel and the kernel's exit bookkeeping happen to agree."""
    ctx = aioshm.get_context(method)
    rounds = 10 if method == "fork" else 4  # (the race shows in about half the runs)
    procs: list[Any] = []
    try:
        with anyio.fail_after(WAIT):
            for _ in range(rounds):
                p = ctx.Process(target=targets.exit_with, args=(3,))
                procs.append(p)
                with pytest.raises(ProcessExitedException) as info:
                    await p
                assert info.value.exit_code == 3, str(info.value)
                assert info.value.signal_name is None
            for _ in range(rounds):
                p = ctx.Process(target=targets.exit_with, args=(0,))
                procs.append(p)
                p.start()
                await p.join_async()
                assert returncode(p) == 0, "join_async() returned before the child was reaped"
    finally:
        reap(procs)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
async def test_await_p_waits_for_the_exit_not_just_the_sentinel(method: str) -> None:
    """A child that closes its inherited fds (the sentinel's write end among them) long before
    it exits is still awaited to its real end: ``await p`` reports the exit code it exits with,
    not an unknown status while the child runs on."""
    ctx = aioshm.get_context(method)
    conn, conn_child = aioshm.Pipe()
    p = ctx.Process(target=targets.close_fds_then_exit, args=(conn_child, 3))
    caught: dict[str, Any] = {}
    try:
        p.start()
        conn_child.close()

        async def awaiter() -> None:
            try:
                await p
            except ProcessExitedException as exc:
                caught["exc"] = exc
                caught["alive"] = psutil.pid_exists(p.pid) and (
                    psutil.Process(p.pid).status() != psutil.STATUS_ZOMBIE
                )

        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(awaiter)
                assert await conn.recv_async() == "closed"
                await anyio.wait_all_tasks_blocked()
                await conn.send_async("exit now")
        err = caught["exc"]
        assert not caught["alive"], f"await p finished while the child still ran: {err}"
        assert err.exit_code == 3, str(err)
    finally:
        conn.close()
        reap([p])


@pytest.mark.timeout(60)
async def test_cancelling_await_p_stops_a_child_whose_sentinel_fired_early() -> None:
    """Cancelling ``await p`` while the child has closed its fds (its sentinel is readable) but
    still runs terminates it at once and propagates the cancellation: the wait for its exit
    does not outlast the cancellation.

    The child exits by itself (code 3) after 5 s of silence, so a parent that waits for that
    instead of stopping it fails this test (returncode 3, not -SIGTERM) rather than hanging."""
    conn, conn_child = aioshm.Pipe()
    p = aioshm.get_context("fork").Process(
        target=targets.close_fds_then_exit, args=(conn_child, 3, 5.0)
    )
    seen: dict[str, Any] = {}
    try:
        p.start()
        conn_child.close()

        async def awaiter() -> None:
            try:
                await p
            except BaseException as exc:
                seen["exc"] = exc
                seen["returncode"] = returncode(p)
                if isinstance(exc, anyio.get_cancelled_exc_class()):
                    raise

        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(awaiter)
                assert await conn.recv_async() == "closed"
                watch = os.dup(p.sentinel)  # (a fd of our own: the awaiter may be on p.sentinel)
                try:
                    await anyio.wait_readable(watch)  # the loop has seen the sentinel fire
                finally:
                    os.close(watch)
                await anyio.wait_all_tasks_blocked()  # and the awaiter has acted on it
                tg.cancel_scope.cancel()
        assert seen["returncode"] == -signal.SIGTERM, (
            f"the child was not stopped on cancellation (returncode {seen['returncode']}); the "
            f"awaiting task ended with {seen['exc']!r} instead of its cancellation"
        )
        assert isinstance(seen["exc"], anyio.get_cancelled_exc_class())
        assert_gone(p.pid)
    finally:
        conn.close()
        reap([p])


@pytest.mark.timeout(60)
async def test_keyboard_interrupt_in_the_child_is_a_failure() -> None:
    """A child's ``KeyboardInterrupt`` raises ``ProcessRaisedException`` (not a success, and
    never a KeyboardInterrupt in the parent), the original chained."""
    p = CTX.Process(target=targets.raise_keyboard_interrupt)
    try:
        with anyio.fail_after(WAIT), pytest.raises(ProcessRaisedException) as info:
            await p
        assert info.value.exc_type_name == "KeyboardInterrupt"
        assert isinstance(info.value.__cause__, KeyboardInterrupt)
        assert p.exitcode != 0
    finally:
        reap([p])


@pytest.mark.timeout(60)
async def test_several_tasks_may_await_one_process() -> None:
    """Several tasks waiting on one process at once (``await p`` and two ``join_async()``, as
    several threads may ``join()`` one process) all see it end; none fails for sharing the
    wait."""
    conn, conn_child = aioshm.Pipe()
    p = CTX.Process(target=targets.wait_for_parent, args=(conn_child,))
    outcomes: dict[str, Any] = {}
    try:
        p.start()
        conn_child.close()

        async def waiter(name: str) -> None:
            try:
                if name == "await p":
                    outcomes[name] = await p
                else:
                    await p.join_async()
                    outcomes[name] = p.exitcode
            except Exception as exc:
                outcomes[name] = exc

        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                for name in ("join_async 1", "join_async 2", "await p"):
                    tg.start_soon(waiter, name)
                await anyio.wait_all_tasks_blocked()
                conn.close()  # releases the child
        assert outcomes == {"join_async 1": 0, "join_async 2": 0, "await p": "released"}
    finally:
        conn.close()
        reap([p])


@pytest.mark.timeout(60)
async def test_join_async_timeout_returns_with_the_child_alive() -> None:
    """``join_async(timeout)`` returns after the timeout with the child still running, and
    returns once it exits when there is no timeout."""
    conn, conn_child = aioshm.Pipe()
    p = CTX.Process(target=targets.wait_for_parent, args=(conn_child,))
    try:
        p.start()
        conn_child.close()
        with anyio.fail_after(WAIT):
            assert await p.join_async(0.1) is None
            assert p.is_alive()
            assert p.exitcode is None
            conn.close()  # releases the child
            await p.join_async()
            assert p.exitcode == 0
    finally:
        conn.close()
        reap([p])


@pytest.mark.timeout(60)
async def test_join_async_timeout_holds_when_the_sentinel_fired_early() -> None:
    """``join_async(timeout)`` honours its timeout for a child that closed its fds (sentinel
    readable) but still runs: it returns with the child alive, it does not wait for the exit.
    (The child exits by itself after 5 s of silence, so a wrong wait ends instead of hanging.)"""
    conn, conn_child = aioshm.Pipe()
    p = aioshm.get_context("fork").Process(
        target=targets.close_fds_then_exit, args=(conn_child, 3, 5.0)
    )
    try:
        p.start()
        conn_child.close()
        with anyio.fail_after(WAIT):
            assert await conn.recv_async() == "closed"
            await p.join_async(0.2)
            assert returncode(p) is None, "join_async(0.2) waited for the child's exit"
            assert p.is_alive()
            await conn.send_async("exit now")
            await p.join_async()
        assert returncode(p) == 3
    finally:
        conn.close()
        reap([p])


@pytest.mark.timeout(60)
async def test_async_with_process_terminates_and_reaps_on_error() -> None:
    """``async with p`` starts the child; an exception in the block terminates and reaps it
    before the exception propagates. Without one, the block waits for the child."""
    conn, conn_child = aioshm.Pipe()
    p = CTX.Process(target=targets.ready_then_block, args=(conn_child,))
    ok = CTX.Process(target=targets.double, args=(1,))
    try:
        with anyio.fail_after(WAIT):
            with pytest.raises(RuntimeError, match="body failed"):
                async with p:
                    conn_child.close()
                    pid = await conn.recv_async()
                    raise RuntimeError("body failed")
            assert returncode(p) == -signal.SIGTERM
            assert_gone(pid)

            async with ok:
                pass
            assert returncode(ok) == 0
    finally:
        conn.close()
        reap([p, ok])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["forkserver", "fork", "spawn"])
async def test_cancelling_await_p_leaves_no_child_alive_or_unreaped(method: str) -> None:
    """Cancelling the task in ``await p`` stops and reaps the child before the cancellation
    propagates (psutil: the pid is gone, not a zombie) — under every start method, including
    those where this process is the child's parent and must reap it itself."""
    conn, conn_child = aioshm.Pipe()
    p = aioshm.get_context(method).Process(target=targets.ready_then_block, args=(conn_child,))
    seen: dict[str, Any] = {}
    try:
        p.start()
        conn_child.close()

        async def awaiter() -> None:
            try:
                await p
            except anyio.get_cancelled_exc_class():
                seen["returncode"] = returncode(p)
                raise

        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(awaiter)
                pid = await conn.recv_async()
                await anyio.wait_all_tasks_blocked()
                tg.cancel_scope.cancel()
        assert seen["returncode"] is not None, "cancellation propagated before the child was reaped"
        assert_gone(pid)
    finally:
        conn.close()
        reap([p])


# =========================================================================== spawn


@pytest.mark.timeout(60)
async def test_spawn_returns_per_rank_results_in_rank_order() -> None:
    """``await aioshm.spawn(fn, args, nprocs=2)`` gives ``[fn(0, ...), fn(1, ...)]``; the ranks'
    writes into a shared array are seen by the parent."""
    arr = aioshm.zeros(2, dtype=np.int64)
    group = None
    try:
        with anyio.fail_after(WAIT):
            group = aioshm.spawn(targets.rank_write, (arr,), nprocs=2)
            assert await group == [0, 10]
        assert arr.tolist() == [1, 2]
        assert [p.exitcode for p in group.processes] == [0, 0]
    finally:
        reap_group(group)


@pytest.mark.timeout(60)
async def test_spawn_first_failure_raises_and_stops_the_other_rank() -> None:
    """Rank 0 raising gives ``ProcessRaisedException`` (error_index, pid, the original chained)
    after rank 1, blocked forever, was terminated and reaped."""
    ready = CTX.Queue()
    group = None
    try:
        with anyio.fail_after(WAIT):
            group = aioshm.spawn(targets.rank0_raises_rank1_blocks, (ready,), nprocs=2)
            pids = group.pids()
            with pytest.raises(ProcessRaisedException) as info:
                await group
        err = info.value
        assert err.error_index == 0
        assert err.pid == pids[0]
        assert isinstance(err.__cause__, ValueError)
        assert "rank 0 failed" in str(err.__cause__)
        assert "rank0_raises_rank1_blocks" in err.remote_traceback
        # aioshm.spawn prints the child's traceback once: in the message, not in the chain
        assert err.__cause__.__cause__ is None
        printed = "".join(traceback.format_exception(err))
        assert printed.count('raise ValueError("rank 0 failed")') == 1
        with anyio.fail_after(WAIT), pytest.raises(ProcessRaisedException):
            await group.join_async()  # again by every later call (it used to return True)
        assert returncode(group.processes[1]) == -signal.SIGTERM
        for pid in pids:
            assert_gone(pid)
    finally:
        ready.close()
        reap_group(group)


@pytest.mark.timeout(60)
async def test_spawn_rank_killed_by_sigkill_raises_process_exited() -> None:
    """A rank that dies of SIGKILL gives ``ProcessExitedException`` with its signal name; the
    other rank is stopped and reaped."""
    ready = CTX.Queue()
    group = None
    try:
        with anyio.fail_after(WAIT):
            group = aioshm.spawn(targets.rank0_killed_rank1_blocks, (ready,), nprocs=2)
            pids = group.pids()
            with pytest.raises(ProcessExitedException) as info:
                await group
        assert info.value.error_index == 0
        assert info.value.signal_name == "SIGKILL"
        assert info.value.exit_code == -signal.SIGKILL
        assert returncode(group.processes[1]) is not None
        for pid in pids:
            assert_gone(pid)
    finally:
        ready.close()
        reap_group(group)


@pytest.mark.timeout(60)
async def test_spawn_join_async_timeout_is_false_while_running() -> None:
    """``join_async(timeout)`` returns False while the ranks run, True once they are done."""
    r, w = aioshm.Pipe(duplex=False)
    group = None
    try:
        with anyio.fail_after(WAIT):
            group = aioshm.spawn(targets.rank_wait_for_parent, (r,), nprocs=2)
            r.close()
            assert await group.join_async(0.1) is False
            assert all(p.is_alive() for p in group.processes)
            w.close()  # EOF releases both ranks
            while not await group.join_async(WAIT):
                pass
            assert group.results == [0, 1]
            assert await group == [0, 1]
    finally:
        r.close()
        w.close()
        reap_group(group)


@pytest.mark.timeout(60)
async def test_async_with_spawn_context() -> None:
    """``async with aioshm.spawn(...)`` waits for the ranks on a clean exit, and stops and reaps
    them when the block raises."""
    ready = CTX.Queue()
    ok = failing = None
    try:
        with anyio.fail_after(WAIT):
            async with aioshm.spawn(targets.rank_return, nprocs=2) as ok:
                pass
            assert ok.results == [0, 1]
            assert [p.exitcode for p in ok.processes] == [0, 0]

            with pytest.raises(RuntimeError, match="block failed"):
                async with aioshm.spawn(
                    targets.rank_ready_then_block, (ready,), nprocs=2
                ) as failing:
                    for _ in range(2):
                        await ready.get_async()
                    raise RuntimeError("block failed")
            assert [returncode(p) for p in failing.processes] == [-signal.SIGTERM] * 2
            for pid in failing.pids():
                assert_gone(pid)
    finally:
        ready.close()
        reap_group(ok)
        reap_group(failing)


@pytest.mark.timeout(60)
async def test_cancelling_the_awaiting_task_reaps_every_rank_first() -> None:
    """Cancelling the task that awaits a spawn context terminates and reaps every rank before
    the cancellation propagates."""
    ready = CTX.Queue()
    group = None
    seen: dict[str, Any] = {}
    try:
        with anyio.fail_after(WAIT):
            group = aioshm.spawn(targets.rank_ready_then_block, (ready,), nprocs=2)

            async def awaiter() -> None:
                try:
                    await group
                except anyio.get_cancelled_exc_class():
                    seen["returncodes"] = [returncode(p) for p in group.processes]
                    raise

            async with anyio.create_task_group() as tg:
                tg.start_soon(awaiter)
                for _ in range(2):
                    await ready.get_async()
                await anyio.wait_all_tasks_blocked()
                tg.cancel_scope.cancel()
        assert None not in seen["returncodes"], seen
        for pid in group.pids():
            assert_gone(pid)
    finally:
        ready.close()
        reap_group(group)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sniffio_there", [True, False], ids=["sniffio", "no-sniffio"])
async def test_spawn_with_fork_under_a_running_loop_warns(
    sniffio_there: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``start_method="fork"`` while an event loop runs emits aioshm's RuntimeWarning, pointing
    at the caller's line (and works), with sniffio importable or not (anyio no longer installs
    it). From Python 3.12 a fork in a multi-threaded process also warns (the stdlib's
    DeprecationWarning): that one may come too, nothing else."""
    if not sniffio_there:
        monkeypatch.setitem(sys.modules, "sniffio", None)  # ``import sniffio`` fails
    group = None
    try:
        with anyio.fail_after(WAIT):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                group = aioshm.spawn(targets.rank_return, nprocs=1, start_method="fork")
            assert await group == [0]
    finally:
        reap_group(group)
    ours = [w for w in caught if w.category is RuntimeWarning]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "'fork' while an event loop is running" in str(ours[0].message)
    assert ours[0].filename == __file__
    others = [w for w in caught if w not in ours]
    for w in others:
        assert w.category is DeprecationWarning and "fork()" in str(w.message), w


# =========================================================================== loop hygiene


@pytest.mark.timeout(60)
async def test_async_operations_start_no_thread() -> None:
    """Pipes, queues, processes and spawn contexts are awaited without a single helper thread:
    no thread outside the starting set exists during (sampled at every tick while the awaits
    run) or after. (Threads there before may end: trio retires idle cached workers.)"""
    new_threads = new_thread_counter()
    samples: list[int] = []
    stop = anyio.Event()

    async def sampler() -> None:
        while not stop.is_set():
            samples.append(new_threads())
            await anyio.lowlevel.checkpoint()
            await anyio.wait_all_tasks_blocked()

    a, b = aioshm.Pipe()
    q = CTX.JoinableQueue(8)
    arr = aioshm.zeros(1 << 16, dtype=np.float64)  # 512 KiB: a handle, with its fd
    procs = [
        CTX.Process(target=targets.write_into_arrays, args=(b,)),
        CTX.Process(target=targets.get_n, args=(q, 6)),
    ]
    group = None
    try:
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(sampler)
                procs[0].start()
                b.close()
                await a.send_async((arr, 4.0))
                assert await a.recv_async() == ("done", True)
                a.close()
                assert await procs[0] == 1
                for i in range(6):
                    await q.put_async((i, arr[:8]))
                procs[1].start()
                got = await procs[1]
                assert [i for i, _ in got] == list(range(6))
                for _ in range(6):
                    q.task_done()
                await q.join_async()
                group = aioshm.spawn(targets.rank_write, (arr,), nprocs=2)
                assert await group == [0, 10]
                stop.set()
        assert (arr[2:] == 4.0).all()
        assert len(samples) > 10
        assert set(samples) == {0}, f"new threads seen: {sorted(set(samples))}"
        assert new_threads() == 0
    finally:
        a.close()
        q.close()
        reap(procs)
        reap_group(group)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
async def test_a_child_run_through_the_drop_in_never_imports_anyio(method: str) -> None:
    """A child started through ``aioshm.multiprocessing`` that uses a queue and a shared array
    has no anyio (nor sniffio, trio, uvloop) in ``sys.modules``."""
    import aioshm.multiprocessing as amp

    mp = amp.get_context(method)
    q = mp.Queue()
    arr = aioshm.zeros(16, dtype=np.float64)
    p = mp.Process(target=targets.anyio_modules_after_work, args=(q, arr))
    try:
        p.start()
        with anyio.fail_after(WAIT):
            head = await q.get_async()
            modules = await q.get_async()
        p.join(WAIT)  # (the child is exiting; the exit status is tested elsewhere)
        assert p.exitcode == 0
        assert (head == 1.0).all() and (arr == 1.0).all()
        assert modules == []
    finally:
        q.close()
        reap([p])


@pytest.mark.timeout(60)
def test_import_aioshm_multiprocessing_never_imports_anyio() -> None:
    """In a fresh interpreter, ``import aioshm.multiprocessing`` and a spawn child's run (queue,
    shared array, return value) leave anyio out of ``sys.modules`` on both sides."""
    script = textwrap.dedent(
        """
        import json, sys
        sys.path.insert(0, sys.argv[1])
        import aioshm.multiprocessing as mp
        after_import = sorted(m for m in sys.modules if m.split(".")[0] in ("anyio", "sniffio"))
        import _async_targets as targets
        import numpy as np
        from aioshm import zeros
        if __name__ == "__main__":
            ctx = mp.get_context("spawn")
            q = ctx.Queue()
            arr = zeros(4)
            p = ctx.Process(target=targets.anyio_modules_after_work, args=(q, arr))
            p.start()
            head, child = q.get(timeout=30), q.get(timeout=30)
            p.join(30)
            parent = sorted(m for m in sys.modules if m.split(".")[0] in ("anyio", "sniffio"))
            print(json.dumps({"after_import": after_import, "child": child, "parent": parent,
                              "exitcode": p.exitcode, "arr": arr.tolist()}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(TESTS_DIR)],
        capture_output=True,
        text=True,
        timeout=50,
        cwd=REPO_DIR,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {
        "after_import": [],
        "child": [],
        "parent": [],
        "exitcode": 0,
        "arr": [1.0, 1.0, 1.0, 1.0],
    }


@pytest.mark.timeout(90)
def test_forkserver_children_do_not_rerun_the_main_script(tmp_path: Path) -> None:
    """A script started as ``python script.py``: its top level runs in the parent and once in
    the fork server (with the parent's ``sys.path`` and ``sys.argv``: it imports a module from
    its own folder and reads its arguments), never again in a child, whether the child is a rank
    of ``aioshm.spawn``, an ``aioshm.Process`` or an ``aioshm.Pool`` worker; targets defined
    in the script resolve in the children, which do not see the variable that carried the path.
    """
    runs = tmp_path / "runs"
    (tmp_path / "sibling.py").write_text("RANKS = 2\n")
    script = tmp_path / "main_script.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, os, sys
            import sibling
            with open({str(runs)!r}, "a") as f:
                f.write(json.dumps([os.getpid(), sys.argv[1:]]) + "\\n")
            import aioshm

            def rank(i):
                return os.getpid(), sys.modules["__main__"].__file__, \\
                    os.environ.get("AIOSHM_FORKSERVER_MAIN")

            async def main():
                ranks = await aioshm.spawn(rank, nprocs=sibling.RANKS)
                proc = await aioshm.Process(target=rank, args=(0,))
                async with aioshm.Pool(1) as pool:
                    worker = await pool.apply_async(rank, (0,))
                from multiprocessing import forkserver
                print(json.dumps({{"parent": os.getpid(), "children": ranks + [proc, worker],
                                  "server": forkserver._forkserver._forkserver_pid}}))

            if __name__ == "__main__":
                import anyio
                anyio.run(main)
            """
        )
    )
    out = subprocess.run(
        [sys.executable, str(script), "--flag"],
        capture_output=True,
        text=True,
        timeout=80,
        cwd=REPO_DIR,  # not the script's folder: the server must take the parent's sys.path
        check=False,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    ran = [json.loads(line) for line in runs.read_text().splitlines()]
    assert sorted(ran) == sorted([[report["parent"], ["--flag"]], [report["server"], ["--flag"]]])
    children = report["children"]
    assert len({pid for pid, _, _ in children}) == 4
    for pid, main_file, env in children:
        assert pid not in (report["parent"], report["server"])
        assert main_file == str(script)
        assert env is None


@pytest.mark.timeout(90)
def test_a_main_script_that_raises_on_import_leaves_the_fork_server_up(tmp_path: Path) -> None:
    """A main script that raises when imported outside the parent (``__name__`` is not
    ``"__main__"`` there) does not take the fork server down, whether the stdlib's server imports
    the script itself (CPython 3.13.8+, 3.14) or not: each forkserver child, through
    ``aioshm.Process``, the drop-in's forkserver context or its default context when that is
    forkserver, runs the script again and exits 1 with the script's error, as a spawn child
    would; no start fails with a connection error from a dead server."""
    script = tmp_path / "raising_main.py"
    script.write_text(
        textwrap.dedent(
            """
            import json, sys
            if __name__ != "__main__":
                raise RuntimeError("raising_main: not importable outside the parent")
            import aioshm
            import aioshm.multiprocessing as mp

            results = []
            for ctx in (aioshm, mp.get_context("forkserver"), mp, aioshm):
                if ctx is mp and mp.get_start_method() != "forkserver":
                    continue
                p = ctx.Process(target=print)
                try:
                    p.start()
                    p.join(30)
                    results.append(p.exitcode)
                except Exception as exc:
                    results.append(f"{type(exc).__name__}: {exc}")
            print(json.dumps(results))
            """
        )
    )
    out = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=80,
        cwd=tmp_path,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert results and set(results) == {1}, (results, out.stderr)
    assert out.stderr.count("raising_main: not importable outside the parent") >= len(results)


@pytest.mark.timeout(60)
def test_stdlib_forkserver_imports_main_matches_what_the_stdlib_does(tmp_path: Path) -> None:
    """``_procutil.stdlib_forkserver_imports_main()`` (told from the stdlib's code) agrees with
    what a plain stdlib fork server does with the main script, aioshm not imported: it imports
    the script itself (the child does not run it again) exactly when the function says so."""
    runs = tmp_path / "runs"
    script = tmp_path / "plain_main.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, multiprocessing, os, sys
            with open({str(runs)!r}, "a") as f:
                f.write(f"{{os.getpid()}}\\n")
            if __name__ == "__main__":
                p = multiprocessing.get_context("forkserver").Process(target=print)
                p.start()
                p.join(30)
                print(json.dumps([p.pid, p.exitcode, "aioshm" in sys.modules]))
            """
        )
    )
    out = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=50,
        cwd=tmp_path,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    child, exitcode, aioshm_imported = json.loads(out.stdout.strip().splitlines()[-1])
    assert (exitcode, aioshm_imported) == (0, False)
    pids = [int(line) for line in runs.read_text().split()]
    assert len(pids) == 2  # the parent, and either the server or the child
    child_ran_it = child in pids
    assert child_ran_it is not _procutil.stdlib_forkserver_imports_main()

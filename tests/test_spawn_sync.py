"""The synchronous process groups (``aioshm._spawn``) and process helpers (``aioshm._procutil``).

A port of torch's ``test/test_multiprocessing_spawn.py`` behaviours, run under spawn, forkserver
and fork, plus what aioshm adds: return values, original exception types, unpicklable
exceptions and results, a child's KeyboardInterrupt as a failure, children dying with their
parent. At most two ranks per test; no test synchronises by sleeping.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import threading
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_DIR = TESTS_DIR.parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

import _spawn_targets as targets

from aioshm import _procutil, _spawn
from aioshm._exceptions import (
    ProcessExitedException,
    ProcessRaisedException,
)

START_METHODS = ["spawn", "forkserver", "fork"]
SPAWN_LOGGER = "aioshm._spawn"

Starter = Callable[..., _spawn.ProcessContext]


@pytest.fixture(params=START_METHODS)
def method(request: pytest.FixtureRequest) -> str:
    """Each start method in turn."""
    value: str = request.param
    return value


@pytest.fixture
def start(method: str) -> Iterator[Starter]:
    """``start(fn, args, nprocs=2)``: a non-joined group; anything left running is killed after."""
    started: list[_spawn.ProcessContext] = []

    def starter(
        fn: Callable[..., object], args: tuple[object, ...] = (), nprocs: int = 2
    ) -> _spawn.ProcessContext:
        ctx = _spawn.start_processes(fn, args, nprocs=nprocs, join=False, start_method=method)
        assert isinstance(ctx, _spawn.ProcessContext)
        started.append(ctx)
        return ctx

    yield starter
    for ctx in started:
        for process in ctx.processes:
            if process.is_alive():
                process.kill()
            process.join()
        ctx._close_all_conns()
    started.clear()


def join_all(ctx: _spawn.ProcessContext, **kwargs: float | None) -> None:
    """torch's loop: call ``join`` until it returns True."""
    while not ctx.join(**kwargs):
        pass


def assert_all_reaped(ctx: _spawn.ProcessContext) -> None:
    """No rank of ``ctx`` is alive, every one was reaped, every result pipe is closed."""
    for process in ctx.processes:
        assert not process.is_alive()
        assert process.exitcode is not None
    assert not ctx._conns
    assert not ctx.sentinels


def sync_pipe() -> tuple[multiprocessing.connection.Connection, ...]:
    """A one-way pipe used only for its EOF."""
    return multiprocessing.Pipe(duplex=False)


# --------------------------------------------------------------------------- success


def test_success(method: str) -> None:
    """Two ranks that return normally: ``join=True`` returns None and leaves nothing behind."""
    assert _spawn.start_processes(targets.success, nprocs=2, start_method=method) is None


def test_success_non_blocking(start: Starter) -> None:
    """``join=False``: repeated ``join()`` eventually returns True, and then keeps doing so."""
    ctx = start(targets.success)
    join_all(ctx)
    assert ctx.join()
    assert ctx.join(timeout=0)
    assert_all_reaped(ctx)


def test_join_timeout_returns_false_while_running(start: Starter) -> None:
    """``join(timeout=0)`` returns False while ranks run; True once they have been released."""
    reader, writer = sync_pipe()
    ctx = start(targets.wait_for_release, (reader, writer))
    reader.close()
    assert ctx.join(timeout=0) is False
    assert ctx.join(timeout=0.01) is False
    writer.close()  # the ranks see EOF and return
    join_all(ctx)
    assert ctx.results == [0, 1]


def test_first_argument_index_and_results(start: Starter) -> None:
    """``fn`` gets its rank first, then ``args``; ``results`` come back in rank order."""
    ctx = start(targets.return_rank, (100,))
    join_all(ctx)
    pids = ctx.pids()
    assert ctx.results == [(0, 100, pids[0]), (1, 101, pids[1])]


def test_pids(start: Starter) -> None:
    """``pids()`` lists the rank processes' pids in rank order."""
    ctx = start(targets.child_facts)
    pids = ctx.pids()
    assert pids == [p.pid for p in ctx.processes]
    join_all(ctx)
    assert [r["pid"] for r in ctx.results] == pids


def test_results_larger_than_pipe_buffer(start: Starter) -> None:
    """Return values far bigger than a pipe buffer arrive whole (join drains while waiting)."""
    nbytes = 4 << 20
    ctx = start(targets.return_blob, (nbytes,))
    join_all(ctx)
    assert ctx.results[0] == b"\x00" * nbytes
    assert ctx.results[1] == b"\x01" * nbytes
    assert_all_reaped(ctx)


def test_child_arms_one_parent_watch_thread(start: Starter, method: str) -> None:
    """Each rank runs exactly one parent-death watch thread; the parent gets none."""
    before = {t.name for t in threading.enumerate()}
    ctx = start(targets.child_facts)
    join_all(ctx)
    for facts in ctx.results:
        assert facts["threads"].count("aioshm-parent-watch") == 1
    assert "aioshm-parent-watch" not in before | {t.name for t in threading.enumerate()}
    if method == "spawn":  # spawn children run a fresh interpreter
        assert any("spawn_main" in part for part in ctx.results[0]["cmdline"])


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize("failing_rank", [0, 1])
def test_exception_single(start: Starter, failing_rank: int) -> None:
    """One rank raises: ProcessRaisedException naming it, with the original ValueError as cause."""
    ctx = start(targets.exception_single, (failing_rank,))
    with pytest.raises(ProcessRaisedException) as info:
        join_all(ctx)
    err = info.value
    assert re.search(rf"\nValueError: legitimate exception from process {failing_rank}$", str(err))
    assert str(err).startswith(f"\n\n-- Process {failing_rank} terminated with the following")
    assert err.error_index == failing_rank
    assert err.pid == ctx.pids()[failing_rank]
    assert err.exc_type_name == "ValueError"
    assert "legitimate exception" in err.remote_traceback
    assert isinstance(err.__cause__, ValueError)
    assert str(err.__cause__) == f"legitimate exception from process {failing_rank}"
    # the traceback is in the message; the chain does not print it a second time
    assert err.__cause__.__cause__ is None
    printed = "".join(traceback.format_exception(err))
    assert printed.count('raise ValueError(f"legitimate exception') == 1
    assert_all_reaped(ctx)


def test_exception_all(start: Starter) -> None:
    """Every rank raises: the error names one of them."""
    ctx = start(targets.exception_all)
    with pytest.raises(ProcessRaisedException) as info:
        join_all(ctx)
    index = info.value.error_index
    assert index in (0, 1)
    assert re.search(rf"\nValueError: legitimate exception from process {index}$", str(info.value))
    assert_all_reaped(ctx)


def test_terminate_signal(start: Starter) -> None:
    """A rank killed by SIGABRT: ProcessExitedException "terminated with signal SIGABRT"."""
    ctx = start(targets.terminate_signal)
    with pytest.raises(ProcessExitedException, match=r"process 0 terminated with signal SIGABRT"):
        join_all(ctx)
    assert_all_reaped(ctx)


@pytest.mark.parametrize("grace_period", [None, 20])
def test_terminate_exit(
    start: Starter, grace_period: float | None, caplog: pytest.LogCaptureFixture
) -> None:
    """``sys.exit(123)`` in rank 0 → exit code 123.

    With no grace period the blocked sibling is SIGTERMed (and that is logged); with 20 s the
    sibling, which waits for rank 0 to go, exits by itself and nothing is logged.
    """
    caplog.set_level(logging.INFO, logger=SPAWN_LOGGER)
    reader, writer = sync_pipe()
    sibling_waits = grace_period is not None
    ctx = start(targets.terminate_exit, (reader, writer, sibling_waits))
    reader.close()
    writer.close()
    with pytest.raises(ProcessExitedException) as info:
        join_all(ctx, grace_period=grace_period)
    err = info.value
    assert str(err) == "process 0 terminated with exit code 123"
    assert (err.error_index, err.exit_code, err.signal_name) == (0, 123, None)
    pid1 = ctx.pids()[1]
    if grace_period is None:
        assert f"Terminating process {pid1} via signal SIGTERM" in caplog.text
        assert ctx.processes[1].exitcode == -signal.SIGTERM
    else:
        assert caplog.text == ""
        assert ctx.processes[1].exitcode == 0
    assert_all_reaped(ctx)


def test_success_first_then_exception(start: Starter) -> None:
    """Rank 0 exits cleanly first, rank 1 raises later: the join still raises for rank 1."""
    reader, writer = sync_pipe()
    ctx = start(targets.success_first_then_exception, (reader, writer))
    reader.close()
    writer.close()
    with pytest.raises(ProcessRaisedException, match="after process 0 exited") as info:
        join_all(ctx)
    assert info.value.error_index == 1
    assert ctx.processes[0].exitcode == 0
    assert ctx.results == ["rank 0 done", None]  # what the successful rank returned
    assert_all_reaped(ctx)
    with pytest.raises(ProcessRaisedException, match="after process 0 exited"):
        ctx.join()  # a failed group keeps failing


def test_child_keyboard_interrupt_is_a_failure(start: Starter) -> None:
    """A child's KeyboardInterrupt fails the group (torch counted it as success)."""
    ctx = start(targets.keyboard_interrupt)
    with pytest.raises(ProcessRaisedException) as info:
        join_all(ctx)
    err = info.value
    assert err.error_index == 0
    assert err.exc_type_name == "KeyboardInterrupt"
    assert isinstance(err.__cause__, KeyboardInterrupt)
    assert ctx.processes[0].exitcode == 1
    assert_all_reaped(ctx)


def test_external_sigterm(start: Starter) -> None:
    """A rank SIGTERMed from outside: ProcessExitedException with the signal's name."""
    ctx = start(targets.block)
    os.kill(ctx.pids()[0], signal.SIGTERM)
    with pytest.raises(ProcessExitedException) as info:
        join_all(ctx)
    err = info.value
    assert (err.error_index, err.exit_code, err.signal_name) == (0, -signal.SIGTERM, "SIGTERM")
    assert str(err) == "process 0 terminated with signal SIGTERM"
    assert_all_reaped(ctx)


@pytest.mark.parametrize(
    ("kind", "type_name"),
    [
        ("unpicklable", "_spawn_targets.UnpicklableError"),
        ("bad_init", "_spawn_targets.BadInitError"),
    ],
)
def test_unpicklable_exception(start: Starter, kind: str, type_name: str) -> None:
    """An exception that cannot be rebuilt in the parent still arrives: type name and traceback."""
    ctx = start(targets.raise_custom, (kind,), nprocs=1)
    with pytest.raises(ProcessRaisedException) as info:
        join_all(ctx)
    err = info.value
    assert err.__cause__ is None
    assert err.exc_type_name == type_name
    assert type_name.rsplit(".", 1)[1] in err.remote_traceback
    assert "from process 0" in err.remote_traceback
    assert err.remote_traceback in str(err)
    assert_all_reaped(ctx)


def test_unpicklable_result_is_a_failure(start: Starter) -> None:
    """A return value that cannot be pickled fails the rank with a PicklingError naming it."""
    ctx = start(targets.return_unpicklable, nprocs=1)
    with pytest.raises(ProcessRaisedException) as info:
        join_all(ctx)
    err = info.value
    assert isinstance(err.__cause__, pickle.PicklingError)
    message = str(err.__cause__)
    assert "process 0" in message
    assert "_thread.lock" in message
    assert "return_unpicklable" in message
    assert ctx.processes[0].exitcode == 1
    assert_all_reaped(ctx)


def test_result_that_cannot_be_rebuilt_is_a_failure(start: Starter) -> None:
    """A result that pickles in the child but fails to load in the parent fails its rank."""
    ctx = start(targets.return_fails_to_load, nprocs=1)
    with pytest.raises(ProcessRaisedException, match="could not be received") as info:
        join_all(ctx)
    err = info.value
    assert isinstance(err.__cause__, RuntimeError)
    assert err.exc_type_name == "RuntimeError"
    assert "cannot be rebuilt in the parent" in err.remote_traceback
    assert ctx.processes[0].exitcode == 0
    assert_all_reaped(ctx)


def test_huge_traceback_does_not_deadlock(start: Starter) -> None:
    """A traceback far bigger than a pipe buffer arrives whole while the child blocks sending."""
    nbytes = 2 << 20
    ctx = start(targets.raise_big, (nbytes,), nprocs=1)
    with pytest.raises(ProcessRaisedException) as info:
        join_all(ctx)
    assert str(info.value.__cause__) == "x" * nbytes
    assert_all_reaped(ctx)


def test_exceptions_pickle_round_trip(start: Starter) -> None:
    """Both exception types (constructed, and as raised by a join) survive pickling."""
    raised = ProcessRaisedException("msg", 1, 42, "ValueError", "tb text")
    exited = ProcessExitedException("msg", 1, 42, -6, "SIGABRT")
    for original in (raised, exited):
        clone = pickle.loads(pickle.dumps(original))
        assert type(clone) is type(original)
        assert clone.__dict__ == original.__dict__
        assert str(clone) == str(original)
    ctx = start(targets.exception_all, nprocs=1)
    with pytest.raises(ProcessRaisedException) as info:
        join_all(ctx)
    clone = pickle.loads(pickle.dumps(info.value))
    assert (clone.error_index, clone.pid, clone.exc_type_name) == (0, ctx.pids()[0], "ValueError")
    assert str(clone) == str(info.value)


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_start_failure_leaves_nothing(method: str) -> None:
    """A target that cannot be pickled for the children fails the start, leaving nothing."""
    lock = threading.Lock()  # captured, so even cloudpickle cannot send the lambda
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        _spawn.start_processes(lambda rank: lock, nprocs=2, start_method=method)


class _Interrupted(Exception):
    """Raised by the test's SIGUSR2 handler in the parent."""


def test_interrupted_join_stops_the_ranks(method: str) -> None:
    """An exception in the parent while it joins (here from a signal handler) stops every rank.

    Rank 0 signals the parent; the handler raises while the parent starts or joins the group.
    The exception propagates, and no rank is left running or unreaped.
    """

    def handler(signum: int, frame: object) -> None:
        raise _Interrupted

    previous = signal.signal(signal.SIGUSR2, handler)
    try:
        with pytest.raises(_Interrupted):
            _spawn.start_processes(
                targets.signal_parent_then_block,
                (int(signal.SIGUSR2),),
                nprocs=2,
                start_method=method,
            )
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert multiprocessing.active_children() == []  # every rank was reaped


# --------------------------------------------------------------------------- spawn()


def test_spawn_warns_on_other_start_method() -> None:
    """``spawn(start_method="fork")`` warns (FutureWarning) and uses spawn anyway."""
    with pytest.warns(FutureWarning, match=r"only supports start_method=spawn \(got: fork\)"):
        ctx = _spawn.spawn(targets.child_facts, nprocs=1, join=False, start_method="fork")
    assert isinstance(ctx, _spawn.ProcessContext)
    join_all(ctx)
    assert any("spawn_main" in part for part in ctx.results[0]["cmdline"])


def test_spawn_join_true_returns_none_and_raises() -> None:
    """``spawn(join=True)`` returns None on success and raises on a failing rank."""
    assert _spawn.spawn(targets.success, nprocs=2) is None
    with pytest.raises(ProcessRaisedException):
        _spawn.spawn(targets.exception_all, nprocs=1)


def test_parallel_start_forkserver(monkeypatch: pytest.MonkeyPatch) -> None:
    """``TORCH_MP_PARALLEL_START=1`` with forkserver starts the ranks from a thread pool."""
    monkeypatch.setenv(_spawn.ENV_VAR_PARALLEL_START, "1")
    ctx = _spawn.start_processes(
        targets.return_rank, (7,), nprocs=2, join=False, start_method="forkserver"
    )
    assert isinstance(ctx, _spawn.ProcessContext)
    join_all(ctx)
    assert [r[:2] for r in ctx.results] == [(0, 7), (1, 8)]


# --------------------------------------------------------------------------- parent death

_PARENT_SCRIPT = textwrap.dedent(
    """
    import multiprocessing, signal, sys
    sys.path[:0] = [{tests!r}, {repo!r}]
    import _spawn_targets
    from aioshm import _spawn

    if __name__ == "__main__":
        reader, writer = multiprocessing.Pipe(duplex=False)
        ctx = _spawn.start_processes(
            _spawn_targets.report_pid_then_block, (writer,), nprocs=2, join=False,
            start_method={method!r},
        )
        writer.close()
        pids = [reader.recv() for _ in range(2)]
        print(" ".join(map(str, pids)), flush=True)
        while True:
            signal.pause()
    """
)


def _gone_or_zombie(procs: list[psutil.Process]) -> list[psutil.Process]:
    """The processes of ``procs`` that still run (a zombie has stopped running)."""
    alive = []
    for proc in procs:
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.NoSuchProcess:
            pass
    return alive


def test_children_die_with_parent(method: str, tmp_path: Path) -> None:
    """SIGKILL the process that started the ranks: the ranks are gone within 10 s.

    Under spawn and fork the parent-death signal does it; under forkserver the ranks are the
    fork server's children, so the watch on the parent's sentinel does it.
    """
    script = tmp_path / "parent.py"
    script.write_text(
        _PARENT_SCRIPT.format(tests=str(TESTS_DIR), repo=str(REPO_DIR), method=method)
    )
    with subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True
    ) as parent:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        ranks = [psutil.Process(int(pid)) for pid in line.split()]
        try:
            assert len(ranks) == 2
            parent.kill()
            parent.wait()
            _, alive = psutil.wait_procs(ranks, timeout=10)
            assert _gone_or_zombie(alive) == []
        finally:
            for proc in ranks:
                try:
                    proc.kill()
                except psutil.NoSuchProcess:
                    pass


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=str(REPO_DIR),
        timeout=60,
        check=False,
    )


def test_arm_parent_death_watch_in_main_process_starts_no_thread() -> None:
    """Outside a multiprocessing child, arming sets PDEATHSIG=SIGKILL but starts no thread."""
    result = _run_python(
        """
        import ctypes, threading
        from aioshm import _procutil
        _procutil.arm_parent_death_watch()
        sig = ctypes.c_int(0)
        ctypes.CDLL(None, use_errno=True).prctl(2, ctypes.byref(sig), 0, 0, 0)  # PR_GET_PDEATHSIG
        print(sig.value, threading.active_count())
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(int(signal.SIGKILL)), "1"]


def test_arm_parent_death_watch_kills_an_orphan() -> None:
    """When the parent is not the expected one any more (it died before prctl), the child dies."""
    result = _run_python(
        """
        import os
        from aioshm import _procutil
        _procutil.arm_parent_death_watch(expected_ppid=os.getppid() + 1)
        print("survived")
        """
    )
    assert result.returncode == -signal.SIGKILL
    assert "survived" not in result.stdout


# --------------------------------------------------------------------------- _procutil


def test_thread_name_round_trip() -> None:
    """``_set_thread_name`` / ``_get_thread_name`` round-trip, cut to the kernel's 15 bytes."""
    seen: list[str] = []

    def body() -> None:
        _procutil._set_thread_name("aioshm-test")
        seen.append(_procutil._get_thread_name())
        _procutil._set_thread_name("a-name-longer-than-fifteen-bytes")
        seen.append(_procutil._get_thread_name())

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    if not sys.platform.startswith("linux"):
        assert seen == ["", ""]
    else:
        assert seen == ["aioshm-test", "a-name-longer-t"]


def test_register_after_fork_runs_in_child() -> None:
    """``register_after_fork(func)`` runs ``func`` in the child of ``os.fork()``, not the parent."""
    result = _run_python(
        """
        import os
        from aioshm import _procutil
        calls = []
        _procutil.register_after_fork(lambda: calls.append(os.getpid()))
        pid = os.fork()
        if pid == 0:
            os._exit(0 if calls == [os.getpid()] else 1)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), len(calls))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "0"]


def test_raise_fd_limit() -> None:
    """``raise_fd_limit`` lifts the soft RLIMIT_NOFILE to the hard limit (capped at 2**20)."""
    result = _run_python(
        """
        import resource
        from aioshm import _procutil
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        _procutil.raise_fd_limit()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        cap = 1 << 20
        want = cap if hard == resource.RLIM_INFINITY else min(hard, cap)
        print(soft == want)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"

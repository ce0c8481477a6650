"""Process lifetime: children die with a SIGKILLed parent, whatever start methods were mixed."""

from __future__ import annotations

import json
import multiprocessing.connection
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import _lifetime_targets as targets
import anyio
import pytest

import aioshm
from aioshm import ProcessExitedException

REPO_DIR = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(os, "pidfd_open"),
    reason="parent-death handling and pidfds are Linux features",
)


def _read_line(proc: subprocess.Popen[str], deadline: float) -> str:
    """The first stdout line of ``proc``, waited for on its fd up to ``deadline``."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    while True:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError("the parent script printed nothing in time")
        return proc.stdout.readline()


def _wait_all_dead(pidfds: dict[int, int], deadline: float) -> set[int]:
    """Wait (on the pidfds) until every process exited or ``deadline``; return the living."""
    alive = dict(pidfds)
    while alive:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        ready, _, _ = select.select(list(alive.values()), [], [], remaining)
        for pid, fd in list(alive.items()):
            if fd in ready:
                del alive[pid]
    return set(alive)


FORK_AFTER_FORKSERVER = """
    import json, os, sys, threading
    import aioshm
    import aioshm.multiprocessing as mp

    def block(rank=0):
        threading.Event().wait()

    if __name__ == "__main__":
        ranks = mp.start_processes(block, nprocs=2, join=False, start_method="forkserver")
        pool = aioshm.Pool(1, context="forkserver")
        worker = pool.apply(os.getpid)
        # then fork children of the stdlib's kind, which outlive their parent by design: the
        # drop-in Pool under "fork" and a plain Process; and a fork rank
        fork_pool = mp.get_context("fork").Pool(1)
        lingering = [fork_pool.apply(os.getpid)]
        fork_ranks = mp.start_processes(block, nprocs=1, join=False, start_method="fork")
        plain = mp.get_context("fork").Process(target=block)
        plain.start()
        lingering.append(plain.pid)
        from multiprocessing import forkserver
        server = forkserver._forkserver._forkserver_pid
        print(json.dumps([[*ranks.pids(), worker, *fork_ranks.pids(), server], lingering]),
              flush=True)
        sys.stdin.read()
"""


@pytest.mark.timeout(90)
def test_children_die_with_a_sigkilled_parent_after_a_fork_child(tmp_path: Path) -> None:
    """Forkserver ranks and an ``aioshm.Pool`` worker, then fork-started children (the
    drop-in Pool's worker and a plain ``Process``, which outlive their parent as stdlib ones
    do, and a rank): after a SIGKILL of the parent every rank, the worker and the fork server
    die. (A forked child used to inherit the write ends of the forkserver children's parent
    sentinels and the server's keep-alive pipe: while it lived, neither the sentinel watch nor
    PDEATHSIG fired.)"""
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(FORK_AFTER_FORKSERVER))
    parent = subprocess.Popen(
        [sys.executable, str(script)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO_DIR,
    )
    pidfds: dict[int, int] = {}
    try:
        pids, lingering = json.loads(_read_line(parent, time.monotonic() + 60))
        assert len({*pids, *lingering}) == 7 and parent.pid not in pids
        for pid in [*pids, *lingering]:
            pidfds[pid] = os.pidfd_open(pid)
        parent.kill()
        parent.wait(30)
        survivors = _wait_all_dead({pid: pidfds[pid] for pid in pids}, time.monotonic() + 30)
        assert not survivors, (
            f"outlived their SIGKILLed parent: {sorted(pids.index(p) for p in survivors)}"
        )
        # the stdlib-kind children did live on (holding whatever they inherited)
        assert not select.select([pidfds[pid] for pid in lingering], [], [], 0)[0]
    finally:
        for fd in pidfds.values():
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.close(fd)
        if parent.poll() is None:
            parent.kill()
            parent.wait(30)
        for stream in (parent.stdin, parent.stdout):
            if stream is not None:
                stream.close()


# --------------------------------------------------------------------------- torn reports


def test_killed_while_writing_its_report_is_process_exited_blocking() -> None:
    """A child SIGKILLed in the middle of its report is ``ProcessExitedException`` naming the
    signal (it used to be ``ProcessRaisedException`` with ``signal_name=None``)."""
    p = aioshm.get_context("forkserver").Process(target=targets.write_torn_report_and_die)
    p.start()
    try:
        with pytest.raises(ProcessExitedException) as info:
            p.result(timeout=60)
        assert info.value.signal_name == "SIGKILL"
        assert info.value.exit_code == -signal.SIGKILL
        assert info.value.pid == p.pid
    finally:
        p.join(30)
        p.close()


@pytest.mark.anyio
@pytest.mark.parametrize("dead_first", [False, True], ids=["running", "dead-first"])
async def test_killed_while_writing_its_report_is_process_exited_async(dead_first: bool) -> None:
    """The same on the async face, whether the child is still running when the await starts
    or already dead (then its pipe is drained without blocking, and the torn frame found)."""
    p = aioshm.get_context("forkserver").Process(target=targets.write_torn_report_and_die)
    try:
        if dead_first:
            p.start()
            assert multiprocessing.connection.wait([p.sentinel], 60)
        with anyio.fail_after(60), pytest.raises(ProcessExitedException) as info:
            await p
        assert info.value.signal_name == "SIGKILL"
    finally:
        p.join(30)
        p.close()


# --------------------------------------------------------------------------- the fd table

LOW_FD_LIMIT = """
    import json, os, resource
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    import numpy as np
    import aioshm
    from aioshm._shm import _segment

    aioshm.set_share_threshold(0)  # every array travels as a (recycled) segment
    a, b = aioshm.Pipe()
    # batches of distinct sizes (1, 3, 9, 27, 81 pages): no batch can reuse another's segments
    for k in range(5):
        batch = [np.full(3**k * 512, k, dtype=np.float64) for _ in range(12)]
        for arr in batch:
            a.send(arr)
        for _ in batch:
            got = b.recv()
            assert got[0] == k
            del got
        del batch
    idle = len(_segment._idle)
    # a full fd table: a new segment closes the idle ones rather than fail
    fillers = []
    try:
        while True:
            fillers.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
    arr = aioshm.zeros(10)
    ok = bool(arr.sum() == 0)
    for fd in fillers:
        os.close(fd)
    print(json.dumps({"idle": idle, "budget": _segment.idle_fd_budget(), "ok": ok,
                      "fillers": len(fillers), "after": len(_segment._idle)}))
"""


@pytest.mark.timeout(60)
def test_idle_segments_never_exhaust_a_low_fd_limit() -> None:
    """At ``RLIMIT_NOFILE=64``, 60 distinct recycled segments sent and dropped leave at most
    an eighth of the limit idle (they used to keep every fd: FdLimitError on a receiver that
    held no array), and with the table full a new segment trims the idle ones and succeeds."""
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(LOW_FD_LIMIT)],
        capture_output=True,
        text=True,
        timeout=50,
        cwd=REPO_DIR,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["budget"] == 8
    assert 0 < report["idle"] <= 8
    assert report["fillers"] > 0 and report["ok"]
    assert report["after"] == 0  # trimmed to make room


# --------------------------------------------------------------------------- clean exit

CLEAN_EXIT = """
    import json, os, sys
    import numpy as np
    import aioshm
    import aioshm.multiprocessing as mp

    aioshm.set_sharing_strategy("file_system")
    KEPT = aioshm.zeros(1000)  # a module global's named array, alive at exit

    def produce(q):
        aioshm.set_sharing_strategy("file_system")
        for i in range(2):
            q.put(aioshm.full(100, i))  # a child's messages, one of them never received
        q.put(np.arange(100_000))  # a value copy

    if __name__ == "__main__":
        q = aioshm.Queue()
        for i in range(3):
            q.put(np.full(100_000, i))  # value copies into recycled segments, never received
        q.put(KEPT)
        a, b = aioshm.Pipe()
        a.send(aioshm.ones(10))  # and on a pipe
        other = mp.Queue()
        child = mp.get_context("spawn").Process(target=produce, args=(other,))
        child.start()
        first = other.get(timeout=30)
        child.join(30)
        assert first[0] == 0 and child.exitcode == 0
        print(json.dumps(sorted(os.listdir(os.environ["AIOSHM_SHM_DIR"]))), flush=True)
"""


@pytest.mark.timeout(90)
def test_file_system_leaves_nothing_after_a_clean_exit(tmp_path: Path) -> None:
    """Under ``file_system``, a program that exits cleanly with unreceived queue and pipe
    messages (its own and a finished child's) and a module global's named array leaves its
    segment directory empty (names and tickets used to stay)."""
    script = tmp_path / "clean_exit.py"
    script.write_text(textwrap.dedent(CLEAN_EXIT))
    shm_dir = tempfile.mkdtemp(prefix="exit-", dir=os.environ.get("AIOSHM_SHM_DIR"))
    env = {k: v for k, v in os.environ.items() if k != "AIOSHM_SESSION"}  # a program of its own
    env["AIOSHM_SHM_DIR"] = shm_dir
    try:
        out = subprocess.run(
            [sys.executable, str(script)],
            capture_output=True,
            text=True,
            timeout=80,
            cwd=REPO_DIR,
            env=env,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        before_exit = json.loads(out.stdout.strip().splitlines()[-1])
        assert any(".t" in name for name in before_exit)  # tickets of unreceived messages
        assert len(before_exit) >= 8
        assert os.listdir(shm_dir) == []
    finally:
        shutil.rmtree(shm_dir, ignore_errors=True)

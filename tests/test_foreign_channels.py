"""Arrays on channels aioshm does not own outlive their sender (Note [Foreign channels]).

Importing aioshm registers its ndarray reducer with ``ForkingPickler``, so stdlib queues and
pipes, the stdlib ``Pool`` and ``ProcessPoolExecutor`` use it too. There the message must be
self-contained: the stdlib's ``DupFd`` fallback made the receiver connect back to the sender
for the fd, so a sender that had exited left a ``ConnectionRefusedError``. The queue and pipe
tests read the raw message, wait for the sender to exit, and only then unpickle it; the pool
tests use workers that exit after every task. The leak check proves nothing stays in
``/dev/shm``.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
from collections.abc import Iterator
from multiprocessing import forkserver, resource_tracker
from multiprocessing.reduction import ForkingPickler
from typing import Any

import _foreign_targets as targets
import numpy as np
import pytest

from aioshm import _shm

METHODS = ["fork", "forkserver", "spawn"]
STRATEGIES = ["file_descriptor", "file_system"]
WAIT = 60.0  # safety net for a child that crashed; never used for synchronisation

pytestmark = pytest.mark.timeout(120)


def stdlib_context(method: str) -> Any:
    """The *stdlib* context, with its session-long helpers started before the fd baseline."""
    if method != "fork":
        resource_tracker.ensure_running()
    if method == "forkserver":
        forkserver.ensure_running()
    return multiprocessing.get_context(method)


@pytest.fixture(params=STRATEGIES)
def strategy(request: pytest.FixtureRequest) -> Iterator[str]:
    """The sharing strategy of this process and of the senders."""
    old = _shm.get_sharing_strategy()
    _shm.set_sharing_strategy(request.param)
    try:
        yield request.param
    finally:
        _shm.set_sharing_strategy(old)


def check_arrays(received: tuple[np.ndarray, np.ndarray], strategy: str) -> None:
    plain, shared = received
    expected = np.arange(targets.N, dtype=np.float64)
    np.testing.assert_array_equal(plain, expected)
    np.testing.assert_array_equal(shared, expected[::-1])
    # an anonymous segment cannot be named: its array travels by value; a named one stays shared
    assert _shm.is_shared(shared) == (strategy == "file_system")
    if strategy == "file_system":
        seg = _shm.segment_buffer_of(shared).segment  # type: ignore[union-attr]
        assert seg.name is not None


@pytest.mark.parametrize("method", METHODS)
def test_stdlib_queue_item_outlives_its_producer(method: str, strategy: str) -> None:
    ctx = stdlib_context(method)
    q = ctx.Queue()
    proc = ctx.Process(target=targets.put_arrays, args=(q, strategy))
    proc.start()
    try:
        assert q._reader.poll(WAIT), "the producer sent nothing"
        raw = q._reader.recv_bytes()
        proc.join(WAIT)
        assert proc.exitcode == 0
        check_arrays(ForkingPickler.loads(raw), strategy)  # the producer is gone
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
        q.close()
        q.join_thread()


@pytest.mark.parametrize("method", METHODS)
def test_stdlib_pipe_message_outlives_its_sender(method: str, strategy: str) -> None:
    ctx = stdlib_context(method)
    mine, theirs = ctx.Pipe()
    proc = ctx.Process(target=targets.send_arrays, args=(theirs, strategy))
    proc.start()
    theirs.close()
    try:
        assert mine.poll(WAIT), "the sender sent nothing"
        raw = mine.recv_bytes()
        proc.join(WAIT)
        assert proc.exitcode == 0
        check_arrays(ForkingPickler.loads(raw), strategy)
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
        mine.close()


@pytest.mark.parametrize("method", ["forkserver", "spawn"])  # max_tasks_per_child refuses fork
def test_process_pool_executor_results_outlive_their_workers(method: str, strategy: str) -> None:
    ctx = stdlib_context(method)
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx, max_tasks_per_child=1) as ex:
        futures = [ex.submit(targets.make_array, i) for i in range(3)]
        futures.append(ex.submit(targets.make_shared, 3))
        results = [f.result(timeout=WAIT) for f in futures]
        arg = np.ones(targets.N)
        assert ex.submit(targets.total, arg).result(timeout=WAIT) == targets.N
    for i, r in enumerate(results):
        np.testing.assert_array_equal(r, np.full(targets.N, float(i)))


@pytest.mark.parametrize("method", METHODS)
def test_stdlib_pool_results_outlive_their_workers(method: str, strategy: str) -> None:
    ctx = stdlib_context(method)
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        results = pool.map(targets.make_array, range(3), chunksize=1)
        results.append(pool.apply(targets.make_shared, (3,)))
        assert pool.apply(targets.total, (np.ones(targets.N),)) == targets.N
        pool.close()
        pool.join()
    for i, r in enumerate(results):
        np.testing.assert_array_equal(r, np.full(targets.N, float(i)))

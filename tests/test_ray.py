"""The Ray backend (``aioshm.RayBackend``), side by side with the local backend.

Runs only inside a loopback-only network namespace (Ray binds every interface otherwise)::

    unshare -n sh -c 'ip link set lo up && AIOSHM_IN_NETNS=1 .venv/bin/python -m pytest tests/test_ray.py'

(``scripts/test.sh`` does this as its own stage). The module skips when Ray is not installed
or ``AIOSHM_IN_NETNS`` is not set.

One local cluster (``num_cpus=2``) serves the module; the tests that SIGKILL workers get a
fresh one. Behaviour that the two backends share is one test parametrized over ``backend``
(``local``/``ray``) and over asyncio/trio (the trio runs go through the fd-based bridge). A
Ray cluster starts worker processes, threads and fds whenever it likes, so only the Ray
variants are marked ``allow_leaks``; the module teardown proves the cluster is gone (no
``raylet``/``gcs_server``/``ray::`` process left, private temp directory deleted).

Remote tasks report through files (tick counts) and return values, never through timing.
"""

from __future__ import annotations

import importlib.util
import os
import queue
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import psutil
import pytest

if importlib.util.find_spec("ray") is None:
    pytest.skip("ray is not installed (pip install aioshm[ray])", allow_module_level=True)
if not os.environ.get("AIOSHM_IN_NETNS"):
    pytest.skip(
        "Ray tests run only in a loopback-only network namespace: "
        "unshare -n sh -c 'ip link set lo up && AIOSHM_IN_NETNS=1 pytest tests/test_ray.py'",
        allow_module_level=True,
    )

import aioshm
from aioshm import ProcessExitedException, ProcessRaisedException, RemoteTraceback

TESTS_DIR = Path(__file__).resolve().parent
REPO_DIR = TESTS_DIR.parent
WAIT = 30.0  # bound on every awaited section

RAY_LEAKS = pytest.mark.allow_leaks("processes", "threads", "fds")
pytestmark = [
    pytest.mark.timeout(90),
    # Ray logs through `logging`; some of its dependencies emit DeprecationWarnings at import
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


# --------------------------------------------------------------------------- remote targets
# Ray workers import this module by name (PYTHONPATH is set for the cluster below); local
# workers get the parent's sys.path from multiprocessing.


def square(x: int) -> int:
    return x * x


def add(a: int, b: int = 0) -> int:
    return a + b


def array_facts(a: np.ndarray) -> tuple[bool, float, str]:
    """(writeable, sum, the /proc/self/maps region holding the data) as seen in the worker."""
    ptr = a.__array_interface__["data"][0]
    region = "?"
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= ptr < hi:
                region = parts[5].strip() if len(parts) > 5 else "[anonymous]"
                break
    return bool(a.flags.writeable), float(a.sum()), region


def make_array(n: int) -> np.ndarray:
    return np.full(n, 7.0)


def boom() -> None:
    try:
        {}["missing"]
    except KeyError as exc:
        raise ValueError("bad value 42") from exc


class CustomError(Exception):
    def __init__(self, msg: str, code: int) -> None:
        super().__init__(msg, code)
        self.code = code


def raise_custom(msg: str, code: int) -> None:
    raise CustomError(msg, code)


def kill_self(*_: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def ticker(path: str, n: int = 1000, dt: float = 0.02) -> int:
    for _ in range(n):
        with open(path, "a") as f:
            f.write(".")
        time.sleep(dt)
    return n


def rank_value(rank: int, k: int) -> tuple[int, int]:
    return rank, rank * k


def fail_fast_rank(rank: int, bad: int, tick_dir: str) -> None:
    if rank == bad:
        path = os.path.join(tick_dir, "0")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and ticks(path) < 3:  # rank 0 is running
            time.sleep(0.01)
        raise RuntimeError(f"rank {rank} failed")
    ticker(os.path.join(tick_dir, str(rank)))


def spawn_ticker(rank: int, tick_dir: str) -> None:
    ticker(os.path.join(tick_dir, str(rank)))


def spawn_kill(rank: int) -> None:
    if rank == 1:
        kill_self()
    time.sleep(30)


def producer(rank: int, q: Any, n: int) -> int:
    for i in range(n):
        q.put((rank, i, np.full(4, float(i))))
    return n


def ticks(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(
    scope="module",
    params=[pytest.param("asyncio", id="asyncio"), pytest.param("trio", id="trio")],
)
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _ray_processes() -> list[str]:
    """Descendants of this process that belong to Ray."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            text = " ".join(proc.cmdline()) or proc.name()
        except psutil.Error:
            continue
        if any(
            m in text for m in ("raylet", "gcs_server", "ray::", "ray/dashboard", "ray/_private")
        ):
            found.append(f"{proc.pid} {text[:100]}")
    return found


def _start(num_cpus: int = 2) -> aioshm.RayBackend:
    path = os.environ.get("PYTHONPATH", "")
    if str(TESTS_DIR) not in path.split(os.pathsep):  # workers import this module by name
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS_DIR), path) if p)
    rb = aioshm.RayBackend("local", num_cpus=num_cpus, log_to_driver=False)
    anyio.run(rb.start)
    return rb


def _stop_and_prove_gone(rb: aioshm.RayBackend) -> None:
    temp_dir = rb._temp_dir
    anyio.run(rb.aclose)
    assert temp_dir is not None and not os.path.exists(temp_dir), "Ray's temp dir remains"
    left = _ray_processes()
    assert not left, f"Ray processes left after aclose(): {left}"
    import ray

    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[aioshm.RayBackend]:
    """The module's cluster; its teardown proves the cluster shut down completely."""
    rb = _start()
    try:
        yield rb
    finally:
        _stop_and_prove_gone(rb)


@pytest.fixture
def fresh_ray(ray_cluster: aioshm.RayBackend) -> Iterator[aioshm.RayBackend]:
    """A cluster of its own, for tests that kill workers (the module's is paused meanwhile)."""
    anyio.run(ray_cluster.aclose)
    rb = _start()
    try:
        yield rb
    finally:
        _stop_and_prove_gone(rb)
        ray_cluster._started = False
        fresh = _start()
        ray_cluster.__dict__.update(fresh.__dict__)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> Any:
    if request.param == "local":
        return aioshm.local_backend
    return request.getfixturevalue("ray_cluster")


@pytest.fixture
def killer_backend(request: pytest.FixtureRequest) -> Any:
    if request.param == "local":
        return aioshm.local_backend
    return request.getfixturevalue("fresh_ray")


# Marks on fixture params do not reach the item's markers (the leak check reads those), so the
# backends are parametrized indirectly.
BOTH = pytest.mark.parametrize(
    "backend",
    [pytest.param("local", id="local"), pytest.param("ray", id="ray", marks=RAY_LEAKS)],
    indirect=True,
)
KILLER = pytest.mark.parametrize(
    "killer_backend",
    [pytest.param("local", id="local"), pytest.param("ray", id="ray", marks=RAY_LEAKS)],
    indirect=True,
)


@pytest.fixture(autouse=True)
def _trim_pool() -> Iterator[None]:
    yield
    from aioshm._shm import trim

    trim()


async def wait_ticks(path: str, n: int) -> None:
    with anyio.fail_after(WAIT):
        while ticks(path) < n:  # noqa: ASYNC110  (another process writes the file)
            await anyio.sleep(0.01)


async def assert_stopped(path: str) -> None:
    """No tick appears for a while: the task really stopped (not only the await)."""
    before = ticks(path)
    await anyio.sleep(0.5)
    assert ticks(path) == before, "the task kept running after its cancellation"


# --------------------------------------------------------------------------- shared behaviour


@BOTH
@pytest.mark.anyio
async def test_run_sync_returns_the_value(backend: Any) -> None:
    with anyio.fail_after(WAIT):
        assert await aioshm.run_sync(square, 12, backend=backend) == 144
        assert await backend.run_sync(add, 2, 3) == 5


@BOTH
@pytest.mark.anyio
async def test_array_argument_is_zero_copy_read_only_on_ray(backend: Any) -> None:
    a = aioshm.zeros(1 << 17)  # 1 MiB, an aioshm shared array
    a[:] = 1.0
    with anyio.fail_after(WAIT):
        writeable, total, region = await aioshm.run_sync(array_facts, a, backend=backend)
    assert total == float(1 << 17)
    if backend.name == "ray":
        assert not writeable, "arrays reach Ray workers as read-only views"
        assert "plasma" in region, f"not a view of Ray's shared-memory store: {region}"
    else:
        assert writeable, "shared arrays are writable on the local backend"


@BOTH
@pytest.mark.anyio
async def test_original_exception_with_remote_traceback(backend: Any) -> None:
    with anyio.fail_after(WAIT), pytest.raises(ValueError, match="bad value 42") as info:
        await aioshm.run_sync(boom, backend=backend)
    assert type(info.value) is ValueError
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "KeyError" in cause.tb and "bad value 42" in cause.tb
    assert "\x1b[" not in cause.tb


@BOTH
@pytest.mark.anyio
async def test_custom_exception_type_and_args(backend: Any) -> None:
    with anyio.fail_after(WAIT), pytest.raises(CustomError) as info:
        await aioshm.run_sync(raise_custom, "custom", 7, backend=backend)
    assert type(info.value) is CustomError
    assert info.value.args == ("custom", 7) and info.value.code == 7
    assert isinstance(info.value.__cause__, RemoteTraceback)


@KILLER
@pytest.mark.anyio
async def test_dead_worker_is_process_exited(killer_backend: Any) -> None:
    start = time.monotonic()
    with anyio.fail_after(WAIT), pytest.raises(ProcessExitedException):
        await aioshm.run_sync(kill_self, backend=killer_backend)
    assert time.monotonic() - start < 10
    # the backend still works afterwards
    with anyio.fail_after(WAIT):
        assert await aioshm.run_sync(square, 3, backend=killer_backend) == 9
    with anyio.fail_after(WAIT), pytest.raises(ProcessExitedException) as info:
        await aioshm.spawn(spawn_kill, (), 2, backend=killer_backend)
    assert info.value.error_index == 1


@BOTH
@pytest.mark.anyio
async def test_cancelling_run_sync_stops_the_task(backend: Any, tmp_path: Path) -> None:
    path = str(tmp_path / "ticks")
    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tg:

            async def call() -> None:
                await aioshm.run_sync(ticker, path, cancellable=True, backend=backend)

            tg.start_soon(call)
            await wait_ticks(path, 3)
            tg.cancel_scope.cancel()
    await assert_stopped(path)


@BOTH
@pytest.mark.anyio
async def test_cancelling_a_cancellable_pool_task_stops_it(backend: Any, tmp_path: Path) -> None:
    path = str(tmp_path / "ticks")
    with anyio.fail_after(WAIT):
        async with aioshm.Pool(2, backend=backend) as pool:
            result = pool.apply_async(ticker, (path,), cancellable=True)
            with anyio.move_on_after(0) as scope:
                scope.deadline = anyio.current_time() + 60
                async with anyio.create_task_group() as tg:

                    async def cancel_when_ticking() -> None:
                        await wait_ticks(path, 3)
                        scope.cancel()

                    tg.start_soon(cancel_when_ticking)
                    await result
            assert scope.cancelled_caught
            await assert_stopped(path)
            assert await pool.apply_async(square, (4,)) == 16


@BOTH
@pytest.mark.anyio
async def test_spawn_results_in_rank_order(backend: Any) -> None:
    with anyio.fail_after(WAIT):
        results = await aioshm.spawn(rank_value, (10,), 3, backend=backend)
    assert results == [(0, 0), (1, 10), (2, 20)]


@BOTH
@pytest.mark.anyio
async def test_spawn_fail_fast_stops_the_other_ranks(backend: Any, tmp_path: Path) -> None:
    with anyio.fail_after(WAIT), pytest.raises(ProcessRaisedException) as info:
        await aioshm.spawn(fail_fast_rank, (1, str(tmp_path)), 2, backend=backend)
    err = info.value
    assert err.error_index == 1
    assert type(err.__cause__) is RuntimeError
    # the remote traceback is printed once, in torch's message, on both backends
    assert err.__cause__.__cause__ is None
    assert "rank 1 failed" in str(err)
    printed = "".join(traceback.format_exception(err))
    assert printed.count('raise RuntimeError(f"rank {rank} failed")') == 1
    assert ticks(str(tmp_path / "0")) >= 3
    await assert_stopped(str(tmp_path / "0"))


@BOTH
@pytest.mark.anyio
async def test_cancelling_spawn_stops_every_rank(backend: Any, tmp_path: Path) -> None:
    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tg:

            async def run() -> None:
                await aioshm.spawn(spawn_ticker, (str(tmp_path),), 2, backend=backend)

            tg.start_soon(run)
            await wait_ticks(str(tmp_path / "0"), 3)
            await wait_ticks(str(tmp_path / "1"), 3)
            tg.cancel_scope.cancel()
    for rank in (0, 1):
        await assert_stopped(str(tmp_path / str(rank)))


@BOTH
@pytest.mark.anyio
async def test_spawn_join_async_timeout(backend: Any, tmp_path: Path) -> None:
    ctx = aioshm.spawn(rank_value, (1,), 2, backend=backend)
    with anyio.fail_after(WAIT):
        while not await ctx.join_async(timeout=5):
            pass
    assert ctx.results == [(0, 0), (1, 1)]


@BOTH
@pytest.mark.anyio
async def test_pool_map_starmap_imap(backend: Any) -> None:
    with anyio.fail_after(WAIT):
        async with aioshm.Pool(2, backend=backend) as pool:
            assert await pool.map_async(square, range(20)) == [x * x for x in range(20)]
            assert await pool.starmap_async(add, [(1, 2), (3, 4)]) == [3, 7]
            assert await pool.apply_async(add, (1,), {"b": 41}) == 42
            assert [x async for x in pool.imap(square, range(10))] == [x * x for x in range(10)]
            got = [x async for x in pool.imap_unordered(square, range(10), chunksize=3)]
            assert sorted(got) == [x * x for x in range(10)]
            with pytest.raises(ValueError, match="bad value 42"):
                await pool.apply_async(boom)


@BOTH
@pytest.mark.anyio
async def test_queue_put_get_with_arrays(backend: Any) -> None:
    q = aioshm.Queue(backend=backend)
    try:
        with anyio.fail_after(WAIT):
            await q.put_async(np.arange(5.0))
            np.testing.assert_array_equal(await q.get_async(), np.arange(5.0))
            assert await aioshm.spawn(producer, (q, 3), 1, backend=backend) == [3]
            items = [await q.get_async() for _ in range(3)]
        assert [(r, i) for r, i, _ in items] == [(0, 0), (0, 1), (0, 2)]
        np.testing.assert_array_equal(items[2][2], np.full(4, 2.0))
    finally:
        q.close()
        if backend.name == "local":
            q.join_thread()


@BOTH
@pytest.mark.anyio
async def test_queue_maxsize_shutdown_and_async_for(backend: Any) -> None:
    """``maxsize`` given by keyword holds; shutdown wakes a waiting get, refuses puts, and lets
    ``async for`` drain what is left."""
    q = aioshm.Queue(maxsize=1, backend=backend)
    try:
        with anyio.fail_after(WAIT):
            await q.put_async(1)
            with pytest.raises(queue.Full):
                q.put_nowait(2)
            with pytest.raises(queue.Full):
                await q.put_async(2, timeout=0.05)
            assert q.full()
            assert await q.get_async() == 1

            async def waiter() -> None:
                with pytest.raises(aioshm.QueueShutDown):
                    await q.get_async()

            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter)
                await anyio.wait_all_tasks_blocked()
                q.shutdown()
        with pytest.raises(aioshm.QueueShutDown):
            await q.put_async(3)
        with pytest.raises(aioshm.QueueShutDown):
            q.put(3)
    finally:
        q.close()
        if backend.name == "local":
            q.join_thread()
    q = aioshm.Queue(backend=backend)
    try:
        with anyio.fail_after(WAIT):
            for i in range(3):
                await q.put_async(i)
            q.shutdown()
            assert [item async for item in q] == [0, 1, 2]
    finally:
        q.close()
        if backend.name == "local":
            q.join_thread()


@BOTH
@pytest.mark.anyio
async def test_joinable_queue(backend: Any) -> None:
    q = aioshm.JoinableQueue(backend=backend)
    try:
        with anyio.fail_after(WAIT):
            await q.put_async("job")
            assert await q.get_async() == "job"
            q.task_done()
            await q.join_async()
            q.join()
            with pytest.raises(ValueError, match="too many times"):
                q.task_done()
    finally:
        q.close()
        if backend.name == "local":
            q.join_thread()


@pytest.mark.parametrize(
    "name", [pytest.param("local", id="local"), pytest.param("ray", id="ray", marks=RAY_LEAKS)]
)
def test_example_runs_on_both_backends(name: str) -> None:
    """examples/backends.py runs unchanged on each backend (its own cluster for Ray)."""
    out = subprocess.run(
        [sys.executable, str(REPO_DIR / "examples" / "backends.py"), "--backend", name],
        check=False,
        capture_output=True,
        text=True,
        timeout=80,
        cwd=REPO_DIR,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"backend={name}: ok" in out.stdout


# --------------------------------------------------------------------------- Ray only


@RAY_LEAKS
@pytest.mark.anyio
async def test_ray_arrays_come_back_read_only_and_handles(ray_cluster: Any) -> None:
    with anyio.fail_after(WAIT):
        back = await ray_cluster.run_sync(make_array, 1 << 17)
        assert back.shape == (1 << 17,) and not back.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            back[0] = 1.0
        a = np.arange(1 << 17, dtype=np.float64)
        handle = await ray_cluster.put_array(a)
        assert handle.shape == a.shape and handle.nbytes == a.nbytes
        writeable, total, region = await ray_cluster.run_sync(array_facts, handle)
        assert (writeable, total) == (False, float(a.sum())) and "plasma" in region
        view = await ray_cluster.get_array(handle)
        np.testing.assert_array_equal(view, a)
        assert not view.flags.writeable


@RAY_LEAKS
def test_ray_pool_blocking_methods_outside_the_loop(ray_cluster: Any) -> None:
    with ray_cluster.Pool(2) as pool:
        assert pool.map(square, range(8)) == [x * x for x in range(8)]
        assert pool.apply(add, (2, 3)) == 5
        assert pool.apply_async(square, (9,)).get(timeout=WAIT) == 81
        assert list(pool.imap(square, range(4))) == [0, 1, 4, 9]
        with pytest.raises(CustomError):
            pool.apply(raise_custom, ("x", 1))
    q = ray_cluster.Queue()
    try:
        q.put(np.ones(3))
        np.testing.assert_array_equal(q.get(timeout=WAIT), np.ones(3))
    finally:
        q.close()


@RAY_LEAKS
@pytest.mark.anyio
async def test_ray_non_cancellable_run_sync_is_shielded(ray_cluster: Any, tmp_path: Path) -> None:
    """As locally: cancelling a cancellable=False call waits for it to finish."""
    path = str(tmp_path / "ticks")
    with anyio.fail_after(WAIT):
        with anyio.move_on_after(0.2):
            await ray_cluster.run_sync(ticker, path, 20, 0.02)
        assert ticks(path) == 20


def test_import_aioshm_does_not_import_ray() -> None:
    code = "import sys, aioshm; aioshm.Pool; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

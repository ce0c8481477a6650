"""``RayBackend``: aioshm's ``spawn``, ``Pool``, ``run_sync`` and ``Queue`` on a Ray cluster.

Install with ``pip install aioshm[ray]``. Nothing here is imported until
``aioshm.RayBackend`` is first used (``import aioshm`` never imports Ray)::

    async with aioshm.RayBackend("local", num_cpus=2) as rb:
        results = await aioshm.spawn(fn, (a,), nprocs=2, backend=rb)
        value = await aioshm.run_sync(f, x, backend=rb)
        async with aioshm.Pool(2, backend=rb) as pool:
            squares = await pool.map_async(square, range(100))

Lifecycle
    ``address="local"`` starts a private local cluster (``num_cpus`` CPUs, a private
    ``_temp_dir`` under the system temp directory, no dashboard); ``address=None`` connects to
    ``$RAY_ADDRESS`` when it is set and starts a local cluster otherwise; any other address
    (``"auto"``, ``"host:port"``, ``"ray://..."``) connects to that cluster. If this process is
    already connected to Ray, the backend uses that connection and never shuts it down.
    ``aclose()`` shuts down only what ``start()`` started: ``ray.shutdown()``, then every
    process the cluster started that is still alive after a grace period (Ray's
    ``DashboardAgent``/``RuntimeEnvAgent`` can outlive a shutdown) is SIGKILLed, and the private
    temp directory (Ray's ``session_*`` logs) is deleted. Ray is one connection per process:
    two backends in one process share it.

    Networking: Ray on Linux listens on every interface and advertises the routable address
    (``_node_ip_address="127.0.0.1"`` is overridden). Run it in a loopback-only network
    namespace (``unshare -n``, as aioshm's CI does) to keep a local cluster on 127.0.0.1.

Threads
    ``ray.init`` and ``ray.shutdown`` block for seconds, so they never run on the event loop:
    ``start()`` starts one *owner thread* per backend that runs ``ray.init``, then sleeps on an
    event until ``aclose()`` asks it to run ``ray.shutdown`` and exit. It is the only thread
    this module starts. It cannot be a pooled ``anyio.to_thread`` worker: Ray starts its daemons
    with ``PR_SET_PDEATHSIG``, which fires when the *thread* that started them exits, and a
    pooled worker thread retires when idle, killing the cluster (GCS and raylet) with it.
    Everything else is non-blocking on the event loop.

Awaiting Ray objects (asyncio and trio alike)
    Ray's ``await ref`` works only on asyncio. Here every wait goes through ``ref.future()``
    (a ``concurrent.futures.Future`` that Ray completes from its own callback thread) and a
    done-callback that writes one byte to an ``os.pipe``; the awaiting task sleeps in
    ``anyio.wait_readable`` on the read end. No thread hop, no blocking call on the loop, and the
    same code path on asyncio, uvloop and trio. The blocking methods (``Pool.apply``,
    ``AsyncResult.get``, ``Queue.get``...) use ``ray.get``/``Future.result`` and are meant for
    code that does not run on an event loop (or for Ray workers).

Arrays: read-only on Ray, writable on the local backend
    An ndarray (an aioshm shared array or any other) passed as a top-level positional or
    keyword argument is put into Ray's object store once per call (``ray.put``; the same array
    passed to all ranks of a ``spawn`` is put once) and reaches the worker as a **read-only,
    zero-copy view** of the plasma store in ``/dev/shm``. ``await rb.put_array(a)`` puts it once
    for many calls: pass the returned :class:`RayArrayHandle` instead of the array. Arrays
    returned by tasks come back the same way (read-only views). Writing to them raises
    ``ValueError: assignment destination is read-only``: copy first (``a.copy()``) if you need
    a writable array. On the local backend, by contrast, a shared array is the *same* writable
    memory in every process, so workers can fill an output array in place; code that must run
    on both backends returns its results instead of writing into its arguments.

Errors, exactly as on the local backend
    A task's exception is re-raised as its original type (never Ray's ``RayTaskError``
    wrapper) with an :class:`aioshm.RemoteTraceback` (the remote traceback text, ANSI colour
    codes stripped) as ``__cause__``; a ``spawn`` rank's exception becomes
    :class:`aioshm.ProcessRaisedException` (``error_index``; the original as ``__cause__``). A
    worker that dies (SIGKILL, segfault, OOM killer, lost node) gives
    :class:`aioshm.ProcessExitedException` at once: tasks run with ``max_retries=0``, so Ray
    never retries a crash silently.

Cancellation
    ``spawn``: cancelling the awaiting task (or the first failing rank) force-cancels the other
    ranks (``ray.cancel(ref, force=True)``, which kills their workers; Ray replaces them).
    ``run_sync(cancellable=True)`` and ``Pool.apply_async(..., cancellable=True)`` force-cancel
    their task when the await is cancelled; with ``cancellable=False`` the local semantics hold:
    ``run_sync`` is shielded until the call finishes, a pool task runs on and its result is
    dropped. ``Pool.terminate()`` force-cancels whatever is running.

Differences from the local backend
    Ranks and pool tasks are Ray tasks (one CPU each by default): ranks beyond the cluster's
    free CPUs wait for one, so ranks that must talk to each other need enough CPUs. A pool's
    ``processes`` bounds the tasks it has in flight (default: the cluster's CPUs); its
    ``initializer`` runs once per Ray worker process and pool, and ``maxtasksperchild`` maps to
    Ray's ``max_calls``. ``daemon`` and ``start_method`` of ``spawn`` are ignored. Callbacks
    run in whichever thread or task drives the pool, as locally.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import importlib
import math
import os
import queue as _queue
import re
import select
import shutil
import signal
import tempfile
import threading
import time
import types
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import anyio
import anyio.lowlevel
import numpy as np

from ._exceptions import (
    PoolClosed,
    ProcessExitedException,
    ProcessRaisedException,
    QueueShutDown,
    RemoteTraceback,
    TaskCancelled,
)
from ._pool._api import PoolAPI
from ._pool._results import AsyncResult
from ._process import _type_name

# Ray ships inline types (py.typed) that mypy would analyse in full; it is used untyped here.
ray: Any = importlib.import_module("ray")
_rex: Any = importlib.import_module("ray.exceptions")

__all__ = (
    "RayArrayHandle",
    "RayAsyncResult",
    "RayBackend",
    "RayJoinableQueue",
    "RayPool",
    "RayQueue",
    "RaySpawnContext",
)

#: Seconds to wait for force-cancelled tasks to report back before giving up on them.
CANCEL_WAIT = 10.0
#: Seconds to let the cluster's own processes exit after ``ray.shutdown()`` before SIGKILL.
SHUTDOWN_GRACE = 3.0

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_PID = re.compile(r"\(pid=(\d+)")
_TASK_OPTIONS: dict[str, Any] = {"max_retries": 0, "retry_exceptions": False}


# --------------------------------------------------------------------------- worker side


def _invoke(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The one remote function: ``fn(*args, **kwargs)`` (ObjectRef arguments arrive resolved)."""
    return fn(*args, **kwargs)


_initialized_pools: set[str] = set()


def _pool_invoke(
    pool_id: str,
    initializer: Callable[..., object] | None,
    initargs: tuple[Any, ...],
    fn: Callable[..., Any],
    *args: Any,
    **kwargs: Any,
) -> Any:
    """A pool task: run the pool's initializer once per worker process, then the call."""
    if initializer is not None and pool_id not in _initialized_pools:
        _initialized_pools.add(pool_id)
        initializer(*initargs)
    return fn(*args, **kwargs)


_invoke_remote: Any = ray.remote(**_TASK_OPTIONS)(_invoke)
_pool_remote: Any = ray.remote(**_TASK_OPTIONS)(_pool_invoke)
_remotes: weakref.WeakKeyDictionary[Callable[..., Any], Any] = weakref.WeakKeyDictionary()


def _submit(fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    """Submit ``fn(*args)``; the ObjectRef of its result.

    A plain function without a closure becomes a Ray remote function once (exported to the
    cluster once, as ``@ray.remote`` does; the task is named after it); anything else (bound
    methods, closures, callable objects) travels with each call through :func:`_invoke`.
    """
    if isinstance(fn, types.FunctionType) and fn.__closure__ is None:
        remote = _remotes.get(fn)
        if remote is None:
            remote = _remotes[fn] = ray.remote(**_TASK_OPTIONS)(fn)
        return remote.remote(*args)
    return _invoke_remote.remote(fn, *args)


# --------------------------------------------------------------------------- error mapping


def _died(exc: BaseException) -> bool:
    return isinstance(
        exc,
        (
            _rex.WorkerCrashedError,
            _rex.RayActorError,
            _rex.NodeDiedError,
            _rex.OutOfMemoryError,
            _rex.ObjectLostError,
            _rex.LocalRayletDiedError,
        ),
    )


def _remote_text(exc: BaseException) -> str:
    return _ANSI.sub("", str(exc))


def _remote_pid(text: str) -> int:
    found = _PID.search(text)
    return int(found.group(1)) if found else -1


def translate(exc: BaseException) -> BaseException:
    """Ray's exception for a task → the exception the local backend would raise.

    ``RayTaskError(E)`` → the original ``E`` with a :class:`RemoteTraceback` as ``__cause__``;
    a dead worker → :class:`ProcessExitedException`; a cancelled task → :class:`TaskCancelled`.
    Anything else is returned unchanged.
    """
    if isinstance(exc, _rex.TaskCancelledError):
        return TaskCancelled("the Ray task was cancelled")
    if isinstance(exc, _rex.RayTaskError):
        cause = getattr(exc, "cause", None)
        text = _remote_text(exc)
        if isinstance(cause, _rex.TaskCancelledError):
            return TaskCancelled("the Ray task was cancelled")
        if isinstance(cause, BaseException) and _died(cause):
            return translate(cause)
        if isinstance(cause, Exception) and not isinstance(cause, _rex.RayError):
            cause.__cause__ = RemoteTraceback(text)
            return cause
        name = _type_name(type(cause)) if cause is not None else "an exception"
        error = ProcessRaisedException(
            f"a Ray task raised {name}:\n{text}", 0, _remote_pid(text), name, text
        )
        error.__cause__ = RemoteTraceback(text)
        return error
    if _died(exc):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return ProcessExitedException(
            f"the Ray worker running this task died: {_ANSI.sub('', first)}", 0, -1, -1, None
        )
    return exc


def _outcome(fut: cf.Future[Any]) -> Any:
    """The value of a completed Ray future, or raise its translated exception."""
    try:
        return fut.result()
    except BaseException as exc:
        error = translate(exc)
    raise error


# --------------------------------------------------------------------------- the loop bridge


class _Wakeup:
    """A pipe written by done-callbacks (in Ray's thread) and awaited with ``wait_readable``."""

    __slots__ = ("_closed", "_lock", "_r", "_w")

    def __init__(self) -> None:
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._lock = threading.Lock()
        self._closed = False

    def fire(self, _: object = None) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                os.write(self._w, b"\0")
            except OSError:  # full: the reader is woken anyway
                pass

    async def wait(self) -> None:
        await anyio.wait_readable(self._r)
        try:
            while os.read(self._r, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.close(self._r)
            os.close(self._w)


async def wait_futures(futures: Sequence[cf.Future[Any]], *, any_done: bool = False) -> None:
    """Wait until every future (or, with ``any_done``, one of them) is done; loop-agnostic."""

    def satisfied() -> bool:
        done = [f.done() for f in futures]
        return any(done) if any_done else all(done)

    if not futures or satisfied():
        await anyio.lowlevel.checkpoint()
        return
    wakeup = _Wakeup()
    try:
        for fut in futures:
            if not fut.done():
                fut.add_done_callback(wakeup.fire)
        while not satisfied():
            await wakeup.wait()
    finally:
        wakeup.close()


async def _shielded_wait(futures: Sequence[cf.Future[Any]], limit: float = CANCEL_WAIT) -> None:
    with anyio.CancelScope(shield=True), anyio.move_on_after(limit):
        await wait_futures(futures)


def _force_cancel(refs: Iterable[Any]) -> None:
    for ref in refs:
        with contextlib.suppress(Exception):  # already finished, or the cluster is gone
            ray.cancel(ref, force=True)


# --------------------------------------------------------------------------- arrays


@dataclass(frozen=True)
class RayArrayHandle:
    """An array in Ray's object store (``await rb.put_array(a)``).

    Pass it as a task argument instead of the array (it is not put again), or
    ``await rb.get_array(handle)`` for a read-only zero-copy view.
    """

    engine_ref: Any
    shape: tuple[int, ...]
    dtype: str
    nbytes: int


def _prepare(
    args: Sequence[Any], kwargs: dict[str, Any] | None = None, memo: dict[int, Any] | None = None
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Top-level arrays → one ``ray.put`` each (shared by ``memo``); handles → their refs."""
    memo = {} if memo is None else memo
    keep: list[Any] = []  # the arrays stay alive while ids are memo keys

    def convert(x: Any) -> Any:
        if isinstance(x, RayArrayHandle):
            return x.engine_ref
        if isinstance(x, np.ndarray) and x.dtype != object:
            key = id(x)
            if key not in memo:
                memo[key] = ray.put(x)
                keep.append(x)
            return memo[key]
        return x

    return tuple(convert(a) for a in args), {k: convert(v) for k, v in (kwargs or {}).items()}


# --------------------------------------------------------------------------- process cleanup


def _proc_table() -> dict[int, tuple[int, str]]:
    """``{pid: (ppid, start time)}`` from ``/proc`` (empty where there is no ``/proc``)."""
    table: dict[int, tuple[int, str]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return table
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        table[int(name)] = (int(fields[1]), fields[19].decode())
    return table


def _is_ray(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"ray" in f.read()
    except OSError:
        return False


def _descendants(roots: Iterable[int]) -> set[tuple[int, str]]:
    """``(pid, start time)`` of every live descendant of ``roots`` that belongs to Ray.

    Only processes whose command line names Ray count: a fork server or resource tracker
    that this process started meanwhile is not the cluster's to kill.
    """
    table = _proc_table()
    children: dict[int, list[int]] = collections.defaultdict(list)
    for pid, (ppid, _) in table.items():
        children[ppid].append(pid)
    found: set[tuple[int, str]] = set()
    stack = list(roots)
    while stack:
        for child in children.get(stack.pop(), ()):
            if _is_ray(child):
                found.add((child, table[child][1]))
                stack.append(child)
    return found


def _alive(procs: set[tuple[int, str]]) -> set[tuple[int, str]]:
    table = _proc_table()
    alive = set()
    for pid, start in procs:
        entry = table.get(pid)
        if entry is None or entry[1] != start:
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != b"Z":
            alive.add((pid, start))
    return alive


def _reap(procs: set[tuple[int, str]]) -> None:
    """Collect the exit status of those of ``procs`` that are exited children of this process
    (Ray's daemons are the driver's children). No other child is touched: its owner (a
    ``multiprocessing`` process, say) reaps it."""
    me = os.getpid()
    table = _proc_table()
    for pid, start in procs:
        if table.get(pid) == (me, start):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


def _wait_gone(procs: set[tuple[int, str]], timeout: float) -> set[tuple[int, str]]:
    """Wait up to ``timeout`` for ``procs`` to exit, on pidfds (no polling), and reap those
    that are our children; return those still alive. Without pidfds (Linux < 5.3) it does
    not wait."""
    deadline = time.monotonic() + timeout
    fds: dict[int, tuple[int, str]] = {}
    try:
        for pid, start in _alive(procs):
            try:
                fds[os.pidfd_open(pid)] = (pid, start)
            except ProcessLookupError:
                continue
            except OSError:
                break
        live = _alive(set(fds.values()))  # checked after opening: no pid reused meanwhile
        pending = {fd for fd, proc in fds.items() if proc in live}
        poller = select.poll()
        for fd in pending:
            poller.register(fd, select.POLLIN)
        while pending and (remaining := deadline - time.monotonic()) > 0:
            for fd, _ in poller.poll(max(1, math.ceil(remaining * 1000))):
                poller.unregister(fd)
                pending.discard(fd)
        _reap(procs)
        return _alive(procs)
    finally:
        for fd in fds:
            os.close(fd)


# --------------------------------------------------------------------------- the backend


class _OwnerThread:
    """The thread that runs ``ray.init``, idles, and runs ``ray.shutdown``.

    Ray starts its daemons with ``PR_SET_PDEATHSIG`` (kernel fate sharing), which fires when
    the *thread* that forked them exits, not the process. A pooled worker thread
    (``anyio.to_thread``) retires after a while and would take the cluster with it, so the
    thread that starts the cluster lives, blocked on an event, until the cluster is shut down.
    Its results reach the event loop through futures awaited with :func:`wait_futures`.
    """

    def __init__(self, init: Callable[[], None], shutdown: Callable[[], None]) -> None:
        self._init, self._shutdown = init, shutdown
        self.started: cf.Future[None] = cf.Future()
        self.stopped: cf.Future[None] = cf.Future()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._main, name="aioshm-ray-owner", daemon=True)
        self.thread.start()

    def _main(self) -> None:
        try:
            self._init()
        except BaseException as exc:
            self.started.set_exception(exc)
            return
        self.started.set_result(None)
        self.stop.wait()
        try:
            self._shutdown()
        except BaseException as exc:
            self.stopped.set_exception(exc)
        else:
            self.stopped.set_result(None)


class RayBackend:
    """aioshm's calls on a Ray cluster (see the module docstring).

    :param address: ``"local"`` (a new local cluster), ``None`` (``$RAY_ADDRESS`` or a new
        local cluster) or the address of a running cluster.
    :param num_cpus: CPUs of a new local cluster (ignored when connecting).
    :param namespace: Ray namespace of this driver.
    :param init_kwargs: passed to ``ray.init`` unchanged.
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        *,
        num_cpus: int | None = None,
        namespace: str | None = None,
        **init_kwargs: Any,
    ) -> None:
        self.address = address
        self.num_cpus = num_cpus
        self.namespace = namespace
        self.init_kwargs = init_kwargs
        self._started = False
        self._owns = False
        self._temp_dir: str | None = None
        self._procs: set[tuple[int, str]] = set()
        self._owner: _OwnerThread | None = None

    def __repr__(self) -> str:
        state = "started" if self._started else "stopped"
        return f"<RayBackend address={self.address!r} {state}>"

    # -- lifecycle ------------------------------------------------------------------------------
    def _local(self) -> bool:
        if self.address == "local":
            return True
        return self.address is None and not os.environ.get("RAY_ADDRESS")

    def _init(self) -> None:
        kwargs = dict(self.init_kwargs)
        if self.namespace is not None:
            kwargs["namespace"] = self.namespace
        before = _descendants([os.getpid()])
        if self._local():
            self._temp_dir = tempfile.mkdtemp(prefix="aioshm-ray-")
            kwargs.setdefault("_temp_dir", self._temp_dir)
            kwargs.setdefault("include_dashboard", False)
            if self.num_cpus is not None:
                kwargs["num_cpus"] = self.num_cpus
            address: str | None = "local"
        else:
            address = self.address
        try:
            ray.init(address=address, **kwargs)
        except BaseException:
            self._cleanup_files()
            raise
        self._procs = _descendants([os.getpid()]) - before

    def _shutdown(self) -> None:
        # the agents start lazily as children of the raylet: take the tree again before it goes
        self._procs |= _descendants(pid for pid, _ in _alive(self._procs))
        try:
            ray.shutdown()
        finally:
            left = _wait_gone(self._procs, SHUTDOWN_GRACE)
            for pid, _ in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            _wait_gone(left, SHUTDOWN_GRACE)
            self._procs = set()
            self._cleanup_files()

    def _cleanup_files(self) -> None:
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None

    async def start(self) -> None:
        """Connect to the cluster, or start a local one (``ray.init`` in the owner thread)."""
        if self._started:
            return
        if ray.is_initialized():  # this process is already connected: share that connection
            self._owns = False
            self._started = True
            await anyio.lowlevel.checkpoint()
            return
        owner = _OwnerThread(self._init, self._shutdown)
        with anyio.CancelScope(shield=True):
            await wait_futures([owner.started])
        owner.started.result()  # raise what ray.init raised
        self._owner = owner
        self._owns = True
        self._started = True

    async def aclose(self) -> None:
        """Shut down what :meth:`start` started (``ray.shutdown`` in the owner thread)."""
        if not self._started:
            return
        self._started = False
        owner, self._owner = self._owner, None
        if owner is None:
            await anyio.lowlevel.checkpoint()
            return
        self._owns = False
        owner.stop.set()
        with anyio.CancelScope(shield=True):
            await wait_futures([owner.stopped])
        owner.thread.join()  # it has returned: this does not block
        owner.stopped.result()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _check(self) -> None:
        if not self._started and not ray.is_initialized():
            raise RuntimeError("RayBackend is not started: use 'await rb.start()' or 'async with'")

    def cluster_cpus(self) -> int:
        """CPUs of the cluster (at least 1)."""
        self._check()
        return max(1, int(ray.cluster_resources().get("CPU", 1)))

    # -- the Backend interface ------------------------------------------------------------------
    def spawn(
        self,
        fn: Callable[..., object],
        args: Sequence[object],
        nprocs: int,
        *,
        daemon: bool = False,
        start_method: str | None = None,
    ) -> RaySpawnContext:
        """Run ``fn(rank, *args)`` for each rank as a Ray task; ``await`` the context."""
        self._check()
        return RaySpawnContext(fn, tuple(args), nprocs)

    def Pool(
        self,
        processes: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: Sequence[object] = (),
        maxtasksperchild: int | None = None,
    ) -> RayPool:
        """A pool with the face of :class:`aioshm.Pool` whose tasks are Ray tasks."""
        self._check()
        return RayPool(
            processes if processes is not None else self.cluster_cpus(),
            initializer,
            tuple(initargs),
            maxtasksperchild,
        )

    async def run_sync(
        self, fn: Callable[..., Any], *args: Any, cancellable: bool = False, limiter: Any = None
    ) -> Any:
        """``fn(*args)`` as a Ray task; see :func:`aioshm.run_sync` for the cancellation rules."""
        self._check()
        if limiter is not None:
            async with limiter:
                return await self._run(fn, args, cancellable)
        return await self._run(fn, args, cancellable)

    async def _run(self, fn: Callable[..., Any], args: tuple[Any, ...], cancellable: bool) -> Any:
        call_args, _ = _prepare(args)
        ref = _submit(fn, call_args)
        fut = ref.future()
        if not cancellable:
            with anyio.CancelScope(shield=True):
                await wait_futures([fut])
            return _outcome(fut)
        try:
            await wait_futures([fut])
        except BaseException:
            _force_cancel([ref])
            await _shielded_wait([fut])
            raise
        return _outcome(fut)

    def Queue(self, maxsize: int = 0) -> RayQueue:
        """A queue actor with the face of :class:`aioshm.Queue`."""
        self._check()
        return RayQueue(maxsize)

    def JoinableQueue(self, maxsize: int = 0) -> RayJoinableQueue:
        """A queue actor with the face of :class:`aioshm.JoinableQueue`."""
        self._check()
        return RayJoinableQueue(maxsize)

    async def put_array(self, a: Any) -> RayArrayHandle:
        """Put ``a`` into the object store once; pass the handle to tasks instead of ``a``."""
        self._check()
        arr = np.asarray(a)
        ref = ray.put(arr)
        await anyio.lowlevel.checkpoint()
        return RayArrayHandle(ref, tuple(arr.shape), arr.dtype.str, int(arr.nbytes))

    async def get_array(self, handle: Any) -> Any:
        """The array behind ``handle``: a read-only zero-copy view of the object store."""
        self._check()
        ref = handle.engine_ref if isinstance(handle, RayArrayHandle) else handle
        fut = ref.future()
        await wait_futures([fut])
        return _outcome(fut)


# --------------------------------------------------------------------------- spawn


class RaySpawnContext:
    """The ranks of ``spawn`` on Ray: ``await ctx`` → per-rank results in rank order."""

    def __init__(self, fn: Callable[..., object], args: tuple[Any, ...], nprocs: int) -> None:
        call_args, _ = _prepare(args)  # one put per array, shared by every rank
        self.nprocs = nprocs
        self.results: list[Any] = [None] * nprocs
        self._refs = [_submit(fn, (rank, *call_args)) for rank in range(nprocs)]
        self._futures: list[cf.Future[Any]] = [ref.future() for ref in self._refs]
        self._left = set(range(nprocs))

    def __repr__(self) -> str:
        return f"<RaySpawnContext nprocs={self.nprocs} running={len(self._left)}>"

    def __await__(self) -> Generator[Any, None, list[Any]]:
        return self._all_results().__await__()

    async def _all_results(self) -> list[Any]:
        while not await self.join_async():
            pass
        return list(self.results)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            await self._stop_all()
        else:
            await self._all_results()

    async def join_async(
        self, timeout: float | None = None, grace_period: float | None = None
    ) -> bool:
        """True once every rank finished; False when ``timeout`` expires first.

        The first failing rank force-cancels the others and raises. ``grace_period`` is
        accepted for the local backend's signature; Ray's force cancel is immediate.
        """
        if not self._left:
            await anyio.lowlevel.checkpoint()
            return True
        try:
            with anyio.move_on_after(math.inf if timeout is None else timeout):
                await wait_futures([self._futures[i] for i in self._left], any_done=True)
        except BaseException:
            await self._stop_all()
            raise
        return await self._collect_async()

    def join(self, timeout: float | None = None, grace_period: float | None = None) -> bool:
        """Blocking :meth:`join_async` (not on an event loop)."""
        if self._left:
            cf.wait(
                [self._futures[i] for i in self._left],
                timeout=timeout,
                return_when=cf.FIRST_COMPLETED,
            )
        failure = self._collect()
        if failure is not None:
            self._stop_all_sync()
            raise failure
        return not self._left

    def _collect(self) -> BaseException | None:
        """Take the finished ranks' results; the error of the first failed rank, if any."""
        failure: BaseException | None = None
        for index in sorted(self._left):
            fut = self._futures[index]
            if not fut.done():
                continue
            self._left.discard(index)
            try:
                self.results[index] = fut.result()
            except BaseException as exc:
                if failure is None:
                    failure = self._error(index, exc)
        return failure

    async def _collect_async(self) -> bool:
        failure = self._collect()
        if failure is not None:
            await self._stop_all()
            raise failure
        return not self._left

    def _error(self, index: int, exc: BaseException) -> BaseException:
        text = _remote_text(exc)
        translated = translate(exc)
        if isinstance(translated, ProcessExitedException | TaskCancelled):
            return ProcessExitedException(
                f"process {index} terminated: {translated}", index, -1, -1, None
            )
        remote = translated.__cause__
        tb = remote.tb if isinstance(remote, RemoteTraceback) else text
        error = ProcessRaisedException(
            f"\n\n-- Process {index} terminated with the following error:\n{tb}",
            index,
            _remote_pid(text),
            _type_name(type(translated)),
            tb,
        )
        error.__cause__ = translated
        if isinstance(remote, RemoteTraceback):  # the message holds it: print it once
            translated.__cause__ = None
        return error

    async def _stop_all(self) -> None:
        left = sorted(self._left)
        self._left.clear()
        if not left:
            return
        _force_cancel(self._refs[i] for i in left)
        await _shielded_wait([self._futures[i] for i in left])

    def _stop_all_sync(self) -> None:
        left = sorted(self._left)
        self._left.clear()
        _force_cancel(self._refs[i] for i in left)
        cf.wait([self._futures[i] for i in left], timeout=CANCEL_WAIT)


# --------------------------------------------------------------------------- pool


class _Job:
    __slots__ = ("args", "cancellable", "fn", "future", "index", "kwds", "ref", "result")

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwds: dict[str, Any],
        result: AsyncResult,
        index: int | None,
        cancellable: bool,
    ) -> None:
        self.fn, self.args, self.kwds = fn, args, kwds
        self.result = result
        self.index = index
        self.cancellable = cancellable
        self.ref: Any = None
        self.future: cf.Future[Any] | None = None


RayAsyncResult = AsyncResult  # the results and iterators are the local pool's


class RayPool(PoolAPI):
    """``aioshm.Pool``'s face on Ray: at most ``processes`` tasks in flight.

    Whoever waits drives the pool (as locally): an awaiting task or a blocking ``get`` takes
    finished tasks, completes their results and submits pending ones. No thread of its own.
    """

    def __init__(
        self,
        processes: int,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        maxtasksperchild: int | None = None,
    ) -> None:
        if processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if maxtasksperchild is not None and (
            not isinstance(maxtasksperchild, int) or maxtasksperchild <= 0
        ):
            raise ValueError("maxtasksperchild must be a positive int or None")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        self._processes = processes
        self._initializer = initializer
        self._initargs = initargs
        self._id = uuid.uuid4().hex
        self._remote = (
            _pool_remote
            if maxtasksperchild is None
            else _pool_remote.options(max_calls=maxtasksperchild)
        )
        self._pending: collections.deque[_Job] = collections.deque()
        self._running: list[_Job] = []
        self._state = "RUN"
        self._mutex = threading.RLock()

    def __repr__(self) -> str:
        return f"<RayPool state={self._state} pool_size={self._processes}>"

    # -- the pump -------------------------------------------------------------------------------
    def _submit(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwds: dict[str, Any],
        result: AsyncResult,
        index: int | None,
        cancellable: bool = False,
    ) -> None:
        job = _Job(fn, args, kwds, result, index, cancellable)
        with self._mutex:
            result._jobs.add(job)
            self._pending.append(job)
            self._step()

    def _step(self) -> None:
        """Complete finished tasks, then submit pending ones up to ``processes`` in flight."""
        with self._mutex:
            still = []
            for job in self._running:
                assert job.future is not None
                if job.future.done():
                    self._complete(job)
                else:
                    still.append(job)
            self._running = still
            while self._pending and len(self._running) < self._processes:
                job = self._pending.popleft()
                try:
                    args, kwds = _prepare(job.args, job.kwds)
                    job.ref = self._remote.remote(
                        self._id, self._initializer, self._initargs, job.fn, *args, **kwds
                    )
                except Exception as exc:  # e.g. an argument that cannot be pickled
                    job.result._job_done(job, None, exc)
                    continue
                job.future = job.ref.future()
                job.fn = job.args = job.kwds = None  # type: ignore[assignment]
                self._running.append(job)

    def _complete(self, job: _Job) -> None:
        assert job.future is not None
        try:
            value, error = job.future.result(), None
        except BaseException as exc:
            value, error = None, translate(exc)
        job.ref = None
        job.result._job_done(job, value, error)

    def _running_futures(self) -> list[cf.Future[Any]]:
        with self._mutex:
            return [job.future for job in self._running if job.future is not None]

    def _drive_until(self, done: Callable[[], bool], timeout: float | None) -> None:
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        while True:
            self._step()
            if done():
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            futures = self._running_futures()
            if not futures:
                return  # nothing runs and nothing can be submitted: done() cannot change
            cf.wait(
                futures,
                timeout=None if remaining == math.inf else remaining,
                return_when=cf.FIRST_COMPLETED,
            )

    def _forget(self, job: _Job) -> None:
        """``job``'s result finished early (a map's first error): drop it if not sent."""
        with self._mutex:
            if job.ref is None and job in self._pending:
                self._pending.remove(job)

    def _notify(self, waiter: Any) -> None:  # no task waits on a result here but the driver
        waiter.wake()

    async def _drive_until_async(
        self, done: Callable[[], bool], result: AsyncResult | None = None
    ) -> None:
        await anyio.lowlevel.checkpoint_if_cancelled()
        while True:
            self._step()
            if done():
                await anyio.lowlevel.cancel_shielded_checkpoint()
                return
            futures = self._running_futures()
            if not futures:
                await anyio.lowlevel.checkpoint()
                return
            await wait_futures(futures, any_done=True)

    async def _abandon(self, result: AsyncResult) -> None:
        """The awaiting task was cancelled before ``result`` was ready."""
        with self._mutex:
            jobs = list(result._jobs)
            for job in jobs:
                if job.ref is None and job in self._pending:  # not submitted: drop it
                    self._pending.remove(job)
                    result._jobs.discard(job)
            kill = [job for job in jobs if job.cancellable and job.ref is not None]
        if not kill:
            return  # not cancellable: it runs on and its result is dropped
        _force_cancel(job.ref for job in kill)
        await _shielded_wait([job.future for job in kill if job.future is not None])
        self._step()
        result._finish(None, TaskCancelled("the awaiting task was cancelled; the task was stopped"))

    # -- closing ----------------------------------------------------------------------------------
    def close(self) -> None:
        """Accept no more work; :meth:`join` waits for the submitted work."""
        with self._mutex:
            if self._state == "RUN":
                self._state = "CLOSE"

    def _terminate_now(self) -> list[cf.Future[Any]]:
        with self._mutex:
            self._state = "TERMINATE"
            jobs = list(self._pending) + self._running
            self._pending.clear()
            self._running = []
        _force_cancel(job.ref for job in jobs if job.ref is not None)
        for job in jobs:
            job.result._job_done(
                job, None, PoolClosed("the pool was terminated before this task finished")
            )
        return [job.future for job in jobs if job.future is not None]

    def terminate(self) -> None:
        """Force-cancel running tasks; pending and running tasks fail with ``PoolClosed``."""
        cf.wait(self._terminate_now(), timeout=CANCEL_WAIT)

    async def terminate_async(self) -> None:
        """Awaitable :meth:`terminate`."""
        await _shielded_wait(self._terminate_now())

    def join(self) -> None:
        """Block until the submitted work is done (after :meth:`close` or :meth:`terminate`)."""
        if self._state == "RUN":
            raise ValueError("Pool is still running")
        self._drive_until(lambda: not self._pending and not self._running, None)

    async def join_async(self) -> None:
        """Awaitable :meth:`join`."""
        if self._state == "RUN":
            raise ValueError("Pool is still running")
        await self._drive_until_async(lambda: not self._pending and not self._running)


# --------------------------------------------------------------------------- queue


class _QueueActor:
    """The Ray actor behind :class:`RayQueue`: an ``asyncio.Queue`` (``maxsize``, ``task_done``,
    ``join``) plus aioshm's shutdown: puts then raise :class:`QueueShutDown`, gets drain what
    is left first, and every waiting put or get wakes and raises it."""

    def __init__(self, maxsize: int) -> None:
        import asyncio

        self.queue: Any = asyncio.Queue(maxsize)
        self.shut = False
        self.wake: Any = None  # an asyncio.Event, made in the actor's loop on first wait

    async def _race(self, op: Any, timeout: float | None, timed_out: type[Exception]) -> Any:
        import asyncio

        if self.wake is None:
            self.wake = asyncio.Event()
        task = asyncio.ensure_future(op)
        stop = asyncio.ensure_future(self.wake.wait())
        try:
            done, _ = await asyncio.wait(
                {task, stop}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stop.cancel()
        if task in done:
            return task.result()
        task.cancel()  # an asyncio.Queue put/get cancelled before it completed loses nothing
        if stop in done:
            raise QueueShutDown("the Ray queue is shut down")
        raise timed_out

    async def put(self, item: Any, timeout: float | None) -> None:
        if self.shut:
            raise QueueShutDown("the Ray queue is shut down")
        await self._race(self.queue.put(item), timeout, _queue.Full)

    async def get(self, timeout: float | None) -> Any:
        if self.shut:
            return self.get_nowait()
        return await self._race(self.queue.get(), timeout, _queue.Empty)

    def put_nowait(self, item: Any) -> None:
        import asyncio

        if self.shut:
            raise QueueShutDown("the Ray queue is shut down")
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            raise _queue.Full from None

    def get_nowait(self) -> Any:
        import asyncio

        try:
            return self.queue.get_nowait()
        except asyncio.QueueEmpty:
            if self.shut:
                raise QueueShutDown("the Ray queue is shut down and empty") from None
            raise _queue.Empty from None

    def qsize(self) -> int:
        return int(self.queue.qsize())

    def full(self) -> bool:
        return bool(self.queue.full())

    def task_done(self) -> None:
        try:
            self.queue.task_done()
        except ValueError:
            raise ValueError("task_done() called too many times") from None

    async def join(self) -> None:
        await self.queue.join()

    def shutdown(self) -> None:
        import asyncio

        self.shut = True
        if self.wake is None:
            self.wake = asyncio.Event()
        self.wake.set()


class RayQueue:
    """``aioshm.Queue``'s face on a Ray actor: ``maxsize``, the blocking and awaitable methods,
    ``shutdown()`` and ``async for``.

    Picklable: pass it to Ray tasks (ranks, pool tasks), which use the blocking methods.
    ``queue.Full``/``queue.Empty`` as in the stdlib; :class:`aioshm.QueueShutDown` once shut down.
    """

    def __init__(self, maxsize: int = 0) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int):
            raise TypeError(f"maxsize must be an int, got {maxsize!r}")
        self._maxsize = max(0, maxsize)
        self._actor: Any = (
            ray.remote(_QueueActor).options(max_concurrency=1000).remote(self._maxsize)
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} maxsize={self._maxsize}>"

    @staticmethod
    def _check_timeout(timeout: float | None) -> None:
        if timeout is not None and timeout < 0:
            raise ValueError("'timeout' must be a non-negative number")

    @staticmethod
    def _get(ref: Any) -> Any:
        try:
            return ray.get(ref)
        except _rex.RayError as exc:
            error = translate(exc)
        raise error

    # -- blocking -------------------------------------------------------------------------------
    def put(self, obj: Any, block: bool = True, timeout: float | None = None) -> None:
        """Put ``obj``, waiting up to ``timeout`` for room (``queue.Full`` after it)."""
        self._check_timeout(timeout)
        actor = self._actor
        self._get(actor.put.remote(obj, timeout) if block else actor.put_nowait.remote(obj))

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Take an item, waiting up to ``timeout`` (``queue.Empty`` after it)."""
        self._check_timeout(timeout)
        actor = self._actor
        return self._get(actor.get.remote(timeout) if block else actor.get_nowait.remote())

    def put_nowait(self, obj: Any) -> None:
        self.put(obj, False)

    def get_nowait(self) -> Any:
        return self.get(False)

    def qsize(self) -> int:
        return int(self._get(self._actor.qsize.remote()))

    def empty(self) -> bool:
        return self.qsize() == 0

    def full(self) -> bool:
        return bool(self._get(self._actor.full.remote()))

    def shutdown(self) -> None:
        """Shut the queue down everywhere: later puts raise :class:`aioshm.QueueShutDown`; gets
        drain what is left, then raise it. Every waiting put or get wakes up."""
        self._get(self._actor.shutdown.remote())

    def close(self) -> None:
        """Kill the queue actor (items still in it are lost)."""
        if self._actor is not None:
            ray.kill(self._actor)
            self._actor = None

    def join_thread(self) -> None:
        """Stdlib compatibility: there is no feeder thread."""

    def cancel_join_thread(self) -> None:
        """Stdlib compatibility: nothing to cancel."""

    # -- async ----------------------------------------------------------------------------------
    async def put_async(self, obj: Any, block: bool = True, timeout: float | None = None) -> None:
        """Awaitable :meth:`put`."""
        self._check_timeout(timeout)
        actor = self._actor
        await self._await(actor.put.remote(obj, timeout) if block else actor.put_nowait.remote(obj))

    async def get_async(self, block: bool = True, timeout: float | None = None) -> Any:
        """Awaitable :meth:`get`."""
        self._check_timeout(timeout)
        actor = self._actor
        return await self._await(actor.get.remote(timeout) if block else actor.get_nowait.remote())

    async def __aiter__(self) -> AsyncIterator[Any]:
        """``async for item in q``: get items until the queue is shut down and drained."""
        while True:
            try:
                item = await self.get_async()
            except QueueShutDown:
                return
            yield item

    @staticmethod
    async def _await(ref: Any) -> Any:
        fut = ref.future()
        await wait_futures([fut])  # cancelling drops the call (a late item stays queued)
        return _outcome(fut)


class RayJoinableQueue(RayQueue):
    """``aioshm.JoinableQueue``'s face on a Ray actor: :class:`RayQueue` plus ``task_done()``,
    ``join()`` and ``join_async()``."""

    def task_done(self) -> None:
        """Mark one item taken with ``get()`` as processed."""
        self._get(self._actor.task_done.remote())

    def join(self) -> None:
        """Block until every item put has been marked done."""
        self._get(self._actor.join.remote())

    async def join_async(self) -> None:
        """Awaitable :meth:`join`."""
        await self._await(self._actor.join.remote())

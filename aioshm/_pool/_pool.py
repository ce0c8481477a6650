"""``aioshm.Pool`` and ``aioshm.run_sync``: a worker pool with both faces and no helper threads.

The whole stdlib ``multiprocessing.Pool`` API with its blocking semantics, plus: awaitable
``AsyncResult`` (``await pool.apply_async(f, args)``, ``await pool.map_async(f, xs)``),
``async for`` over ``imap``/``imap_unordered`` (lazy, with a bound on tasks in flight),
``async with Pool(...)``, per-task kill on cancellation, ``statistics()`` and progress events.

How it works::

    submit ──► pending deque ──► dispatch (2..MAX_DEPTH tasks in flight per worker)
                                     │ one SOCK_SEQPACKET record per task (never torn, never
                                     │ blocks the loop; big payloads spill to memfds)
                                     ▼
                               worker process (aioshm._pool._worker, blocking loop)
                                     │ one record per result
                                     ▼
    AsyncResult ◄── _step(): read results, reap dead workers, replace them, dispatch

The books (which job is pending, in flight on which worker, ended) and every decision (which
worker gets the next batch and how many, whom a death blames, which workers to stop, start or
retire) are the sans-IO :class:`~aioshm._pool._scheduler.Scheduler`'s: the pool tells it what
happened and applies what it answers.

``_step()`` never blocks. Whoever waits drives it: a blocking call (``get``, ``wait``, ``map``,
``join``…) polls the workers' fds in its own thread. On asyncio, a task awaiting a result
parks on a future while the event loop itself watches one epoll fd covering every result
channel, sentinel and the wake-up pipe (:class:`~aioshm._transport._waits.LoopWatch`) and
steps the pool from its callback. Elsewhere (trio, and waits on other conditions: ``join``,
progress, ``imap``) one awaiting task at a time drives, waiting on such an epoll fd, while the
others park until it hands over. So the async face runs no thread at all, and callbacks run
in whichever thread, task or loop callback drives the pool.

Failures: a worker that dies fails only the task it was running (the oldest one it was sent;
it runs them in order) with :class:`~aioshm.ProcessExitedException`; tasks queued behind it are
sent elsewhere, and a replacement starts. A task's exception comes back as its original type
with the remote traceback as ``__cause__``; an unpicklable argument or result fails that task
alone.
"""

from __future__ import annotations

import collections
import itertools
import logging
import multiprocessing
import os
import pickle
import select
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from multiprocessing.context import BaseContext
from typing import TYPE_CHECKING, Any, Final, Self, overload

import anyio
import anyio.lowlevel

from .. import _procutil, _reduction
from .._backend import resolve
from .._connection import RecordChannel, record_pair
from .._context import DEFAULT_START_METHOD
from .._exceptions import (
    BrokenPool,
    PoolClosed,
    ProcessExitedException,
    ProtocolError,
    TaskCancelled,
    signal_name_of,
)
from .._process import Lost, rebuild_failure, report_of
from .._shm import _segment
from .._transport._proc import stop_async
from .._transport._waits import (
    LoopWatch,
    MultiWait,
)
from .._wire._pool import SWEEP, decode_init_failed
from .._wire._report import Report, Returned
from ._drivers import PoolDrivers, _Waiter
from ._results import AsyncResult, PoolStatistics
from ._scheduler import DEPTH, JobState, Scheduler, WorkerState
from ._worker import TaskCounter, worker_main

if TYPE_CHECKING:
    from .._backend import Backend, LocalBackend
    from ._api import PoolAPI

__all__ = ("Pool",)

#: Small tasks without fds are sent to a worker together, up to about this many bytes per record.
BATCH_BYTES: Final = 16 * 1024
#: Seconds a ``run_sync`` worker may stay idle before it is retired (anyio's value).
WORKER_MAX_IDLE_TIME: Final = 300.0
GRACE_PERIOD: Final = 2.0
#: Worker deaths, replacements and broken pools are logged here (no handler installed).
log = logging.getLogger("aioshm")

_IN, _OUT = select.POLLIN, select.POLLOUT
_job_ids = itertools.count()


# --------------------------------------------------------------------------- workers and jobs


class _Job(JobState):
    __slots__ = ("args", "fn", "index", "kwds", "result")

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwds: dict[str, Any],
        result: AsyncResult,
        index: int | None,
        cancellable: bool,
    ) -> None:
        super().__init__(next(_job_ids), cancellable)
        self.fn, self.args, self.kwds = fn, args, kwds
        self.result = result
        self.index = index


class _Worker(WorkerState):
    __slots__ = (
        "init_error",
        "proc",
        "results",
        "results_fd",
        "sentinel",
        "taken",
        "tasks",
    )

    inflight: collections.deque[_Job]  # type: ignore[assignment]

    def __init__(
        self,
        proc: Any,
        tasks: RecordChannel,
        results: RecordChannel,
        taken: TaskCounter,
        budget: int | None,
    ):
        super().__init__(budget, time.monotonic())
        self.proc = proc
        self.sentinel: int = proc.sentinel
        self.tasks = tasks
        self.results = results
        self.results_fd = results.fileno()
        self.taken = taken  # task records the worker took off its channel (shared page)
        self.init_error: tuple[BaseException, str] | None = None  # its initializer raised

    def close_channels(self) -> None:
        self.tasks.close()
        self.results.close()
        self.taken.close()


# --------------------------------------------------------------------------- the pool


class Pool(PoolDrivers):
    """A process pool: the stdlib ``multiprocessing.Pool`` API, awaitable, without threads.

    :param processes: number of workers (default ``os.cpu_count()``).
    :param initializer: called as ``initializer(*initargs)`` in every worker at start.
    :param maxtasksperchild: a worker is replaced after this many tasks.
    :param context: a start-method context or name (default: forkserver on Linux).
    """

    _IMAP_AHEAD = 2 * DEPTH

    @overload
    def __new__(
        cls,
        processes: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
        maxtasksperchild: int | None = None,
        context: str | BaseContext | None = None,
        *,
        backend: LocalBackend | None = None,
    ) -> Self: ...
    @overload
    def __new__(  # type: ignore[misc]  # another engine's pool: the same face, not a Pool
        cls,
        processes: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
        maxtasksperchild: int | None = None,
        context: str | BaseContext | None = None,
        *,
        backend: Backend,
    ) -> PoolAPI: ...
    def __new__(cls, *args: Any, backend: Any = None, **kwargs: Any) -> Any:
        engine = resolve(backend)  # once: TypeError for what is no backend
        if engine is not None:
            kwargs.pop("context", None)
            kwargs.pop("_lazy", None)
            return engine.Pool(*args, **kwargs)  # another engine's pool, same face
        return super().__new__(cls)

    def __init__(
        self,
        processes: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
        maxtasksperchild: int | None = None,
        context: str | BaseContext | None = None,
        *,
        backend: Backend | None = None,
        _lazy: bool = False,
    ) -> None:
        if processes is None:
            processes = os.cpu_count() or 1
        if processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if maxtasksperchild is not None and (
            not isinstance(maxtasksperchild, int) or maxtasksperchild <= 0
        ):
            raise ValueError("maxtasksperchild must be a positive int or None")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if context is None or isinstance(context, str):
            context = multiprocessing.get_context(context or DEFAULT_START_METHOD)
        self._ctx: Any = context
        self._processes = processes
        self._initializer = initializer
        self._initargs = tuple(initargs)
        self._maxtasks = maxtasksperchild
        # the jobs and workers: Pool does the I/O, the scheduler keeps the books and decides
        self._sched: Scheduler[_Job, _Worker] = Scheduler(maxtasksperchild)
        self._workers: list[_Worker] = self._sched.workers
        self._pending: collections.deque[_Job] = self._sched.pending
        self._jobs: dict[int, _Job] = self._sched.jobs
        self._mutex = threading.RLock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._generation = 0
        self._ahead = self._sched.ahead  # tasks in flight per worker
        self._woken = False  # a byte is in the wake-up pipe
        self._parked = 0  # drivers waiting on the pool's fds (they need a wake-up on changes)
        self._driving = False  # an awaiting task drives the pool
        self._driver_thread = 0  # the thread of its event loop
        self._followers: dict[_Waiter, None] = {}  # the tasks awaiting while it does, oldest first
        self._generic: list[_Waiter] = []  # those whose condition is not one result
        self._foreign: collections.deque[_Waiter] = collections.deque()  # woken by other threads
        self._waiter: MultiWait | None = None
        self._watch: LoopWatch | None = None  # asyncio: the loop watching the pool's fds
        self._watching = 0  # tasks awaiting a result through it
        self._watch_idle = 0  # its callbacks since the last such task left
        self._waiter_key: tuple[int, list[tuple[int, int]]] | None = None
        self._lazy = _lazy  # run_sync's pool starts workers on demand
        self._startup = self._sched.startup  # workers dead at start-up in a row
        self._broken: tuple[str, BaseException, str] | None = None  # (why, cause, traceback)
        self._guard: Any = None
        _pools.add(self)
        try:
            self._start_workers()
        except BaseException:
            self._kill_all()
            raise

    @property
    def _state(self) -> str:  # type: ignore[override]
        """ "RUN", then "CLOSE" or "TERMINATE" (the scheduler's)."""
        return self._sched.state

    def __repr__(self) -> str:
        return f"<{type(self).__name__} state={self._state} pool_size={self._processes}>"

    # -- workers ----------------------------------------------------------------------------
    def _start_worker(self) -> None:
        task_r, task_w = record_pair()
        res_r, res_w = record_pair()
        taken = TaskCounter()
        proc = self._ctx.Process(
            target=worker_main,
            args=(task_r, res_w, self._initializer, self._initargs, self._maxtasks, taken),
            daemon=True,
        )
        proc.name = proc.name.replace("Process", "PoolWorker")
        try:
            if self._ctx.get_start_method() == "forkserver":
                _procutil.ensure_forkserver()  # the server imports the main script once
            proc.start()
        except BaseException:
            for ch in (task_r, task_w, res_r, res_w):
                ch.close()
            taken.close()
            raise
        finally:
            _reduction.release_spawn_fds(getattr(proc, "_popen", None))
        task_r.close()
        res_w.close()
        self._sched.worker_started(_Worker(proc, task_w, res_r, taken, self._maxtasks))
        self._generation += 1
        if self._parked:
            self._wake()  # who waits on the pool's fds must watch this worker's too

    def _start_workers(self) -> None:
        """Start the workers the scheduler asks for (replacements; a lazy pool's on demand)."""
        for _ in range(self._sched.workers_to_start(self._processes, self._lazy)):
            self._start_worker()

    def _remove_worker(self, worker: _Worker) -> None:
        self._sched.worker_removed(worker)
        worker.close_channels()
        self._generation += 1
        if self._parked:
            self._wake()

    # -- submitting ---------------------------------------------------------------------------
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
            if not self._sched.submitted(job):  # broken (e.g. an imap's next chunk)
                result._finish(None, self._broken_error())
                return
            result._jobs.add(job)
            generation = self._generation
            if self._lazy:
                self._start_workers()  # on demand
            self._dispatch()
            if self._parked and (self._pending or self._generation != generation):
                self._wake()  # the driver must watch other fds now

    def _forget(self, job: _Job) -> None:
        self._sched.forget(job)

    # -- the pump -----------------------------------------------------------------------------
    def _step(self, ready: set[int] | None = None) -> None:
        """Read results, reap dead workers (failing their running task), refill, dispatch.

        ``ready``: the fds a wait found ready (only those are read); None reads everything.
        """
        with self._mutex:
            done_before = self._sched.done
            self._step_locked(ready)
            if (
                self._sched.done != done_before
                and self._driving
                and self._driver_thread != threading.get_ident()
            ):
                self._wake()  # the driving task may wait for a result read here: wake it
            self._refresh_watch()

    def _step_locked(self, ready: set[int] | None) -> None:
        if self._woken and (ready is None or self._wake_r in ready):
            try:
                while os.read(self._wake_r, 512):
                    pass
            except OSError:
                pass
            self._woken = False
        dead = False
        for worker in self._workers:
            if ready is None or worker.results_fd in ready or worker.sentinel in ready:
                self._read_results(worker)
            dead = dead or worker.eof or (ready is not None and worker.sentinel in ready)
        if dead:
            for worker in list(self._workers):
                if (worker.eof or ready is None or worker.sentinel in ready) and (
                    not worker.proc.is_alive()
                ):
                    self._worker_died(worker)
        if len(self._workers) < self._processes:
            self._start_workers()
        self._dispatch()
        for worker in self._sched.idle_to_exit():
            if not worker.tasks.closed:
                self._send_exit(worker)

    def _read_results(self, worker: _Worker) -> None:
        results = worker.results
        while not results.closed:
            try:
                got = results.try_recv_record()
            except EOFError:
                if not worker.eof:
                    self._sched.worker_exiting(worker)
                    self._generation += 1  # stop watching its result channel
                return
            if got is None:
                return
            report: Report | Lost
            try:
                msg = results.decode(*got)
            except Exception as exc:  # it cannot be unpickled here
                report = Lost(exc)
            else:
                report = report_of(msg)
                if type(report) is Lost and self._init_failed(worker, msg):
                    continue  # no task's outcome: the worker exits now
            job, stop = self._sched.result(worker, time.monotonic())
            if job is not None:
                if type(report) is Returned and report.key == job.id:
                    self._complete(job, report.value, None)
                else:
                    self._complete(job, None, _task_failure(report, job, worker))
            if stop:  # the next task it runs was cancelled by its awaiter
                worker.proc.terminate()

    def _init_failed(self, worker: _Worker, msg: object) -> bool:
        """Whether ``msg``, no outcome report, is the worker's ``init-failed`` record (then
        the initializer's error is kept for the broken-pool rule)."""
        try:
            init = decode_init_failed(msg)
        except ProtocolError:
            return False
        if init is None:
            return False
        pid = worker.proc.pid or -1
        error = rebuild_failure(init, None, who="the pool's initializer", pid=pid)
        assert error is not None  # a raised report always makes one
        worker.init_error = (error, init.traceback)
        return True

    def _complete(self, job: _Job, value: Any, error: BaseException | None) -> None:
        self._sched.ended(job)
        job.fn = job.args = job.kwds = None  # type: ignore[assignment]
        job.result._job_done(job, value, error)

    def _worker_died(self, worker: _Worker) -> None:
        self._read_results(worker)  # what it sent before dying is still there
        worker.proc.join()  # not alive any more: returns at once
        exitcode = worker.proc.exitcode
        death = self._sched.worker_died(
            worker,
            worker.taken.value,
            worker.taken.started,
            exitcode,
        )
        breaking = death.breaks
        if death.at_startup or (
            exitcode not in (0, None) and self._state == "RUN" and not worker.stopping
        ):
            log.warning(
                "pool worker %s (pid %s) died%s with %s%s",
                worker.proc.name,
                worker.proc.pid,
                " at start-up" if death.at_startup else "",
                _exit_text(exitcode),
                "" if breaking or self._broken is not None else "; replacing it",
            )
        elif worker.stopping and self._state == "RUN" and self._broken is None:
            log.info(
                "pool worker %s (pid %s) stopped; replacing it", worker.proc.name, worker.proc.pid
            )
        if death.blamed is not None:  # it died running its oldest task
            name = signal_name_of(exitcode) if exitcode is not None else None
            what = f"signal {name}" if name else f"exit code {exitcode}"
            error = ProcessExitedException(
                f"pool worker {worker.proc.name} (pid {worker.proc.pid}) terminated with {what} "
                "while running this task",
                0,
                worker.proc.pid or -1,
                exitcode if exitcode is not None else -1,
                name,
            )
            self._complete(death.blamed, None, error)
        self._remove_worker(worker)
        _close_popen(worker.proc)
        if breaking:
            self._break(worker, exitcode)

    def _break(self, worker: _Worker, exitcode: int | None) -> None:
        """Give up (the broken-pool rule): fail every task, stop the workers left, start none."""
        n = self._startup.deaths
        if worker.init_error is not None:
            cause, tb_text = worker.init_error
            why = (
                f"the pool's initializer raised {type(cause).__name__} in {n} workers in a "
                f"row: {cause}"
            )
        else:
            tb_text = ""
            why = (
                f"{n} pool workers in a row died at start-up (the last, pid {worker.proc.pid}, "
                f"with {_exit_text(exitcode)}), before reaching their task loop. Does the script "
                'start the pool outside an `if __name__ == "__main__":` guard, or can the '
                "workers not import its main module (read from stdin)? The worker printed its "
                "traceback to its stderr"
            )
            cause = ProcessExitedException(
                f"pool worker {worker.proc.name} (pid {worker.proc.pid}) died at start-up with "
                f"{_exit_text(exitcode)}",
                0,
                worker.proc.pid or -1,
                exitcode if exitcode is not None else -1,
                signal_name_of(exitcode) if exitcode is not None else None,
            )
        self._broken = (f"the pool is broken: {why}", cause, tb_text)
        log.error("%s; it starts no more workers and fails every task", self._broken[0])
        jobs, stop = self._sched.break_pool()
        for job in jobs:
            self._complete(job, None, self._broken_error())
        for other in stop:
            if other.proc.is_alive():
                other.proc.terminate()

    def _broken_error(self) -> BrokenPool | None:
        if self._broken is None:
            return None
        why, cause, tb_text = self._broken
        error = BrokenPool(why, tb_text)
        error.__cause__ = cause
        return error

    def _dispatch(self) -> None:
        """Send pending tasks, each batch to the ready worker with the fewest tasks in flight."""
        pending = self._pending
        if not pending:
            return
        sched = self._sched
        ready = [w for w in sched.ready() if not w.tasks.closed]
        while pending and ready:
            worker, limit = sched.dispatch_plan(ready)
            if not self._send_batch(worker, limit):
                ready.remove(worker)  # its channel is full
                continue
            if sched.full(worker):
                ready.remove(worker)

    def _send_batch(self, worker: _Worker, limit: int) -> bool:
        """Send up to ``limit`` pending tasks to ``worker`` in one record: small tasks without
        fds go together (one syscall here and one in the worker for all of them), any other
        alone. A task that cannot be pickled fails alone. False if the channel is full."""
        pending = self._pending
        jobs: list[_Job] = []
        payloads: list[Any] = []
        size = 0
        record: Any = None
        fds: list[int] = []
        owned: list[bool] = []
        # the batch is the front of the pending queue: the scheduler takes it off when sent
        while len(jobs) < min(limit, len(pending)) and size < BATCH_BYTES:
            job = pending[len(jobs)]
            try:
                data, fds, owned = worker.tasks.encode((job.id, job.fn, job.args, job.kwds))
            except Exception as exc:  # the task cannot be pickled: it fails alone
                self._sched.forget(job)
                self._complete(job, None, exc)
                continue
            if fds or len(data) > BATCH_BYTES:
                if jobs:  # it goes on its own, next
                    _reduction.close_owned(fds, owned)
                    fds, owned = [], []
                    break
                record = data
            jobs.append(job)
            payloads.append(data)
            size += len(data)
            if record is not None:
                break
        if not jobs:
            return True
        if record is None:
            if len(payloads) == 1:
                record = payloads[0]
            else:  # a list of pickles (bytes only: this pickle cannot fail)
                record = pickle.dumps([bytes(p) for p in payloads], pickle.HIGHEST_PROTOCOL)
        try:
            sent = worker.tasks.try_send_record(record, fds)
        except OSError:
            sent = False
        finally:
            _reduction.close_owned(fds, owned)
        if not sent:
            return False  # they stay pending
        self._sched.sent(worker, jobs, time.monotonic())
        return True

    def _send_exit(self, worker: _Worker) -> None:
        try:
            worker.tasks.try_send_record(_reduction.dumps(None)[0], [])
        except OSError:
            pass
        worker.tasks.close()

    def _wait_fds(self) -> list[tuple[int, int]]:
        fds = [(self._wake_r, _IN)]
        for worker in self._workers:
            if not worker.results.closed and not worker.eof:
                fds.append((worker.results.fileno(), _IN))
            fds.append((worker.sentinel, _IN))
            if self._pending and not worker.tasks.closed and self._sched.can_take(worker):
                fds.append((worker.tasks.fileno(), _OUT))
        return fds

    def _cancel(self, result: AsyncResult) -> None:
        """``result.cancel()``, without waiting: like :meth:`_abandon`, except that a stopped
        worker is terminated now and killed after the grace period by a loop timer (its
        death is then seen, reaped and replaced like any other), and the result is marked
        cancelled at once, even if its task runs on."""
        with self._mutex:
            stop, _, _ = self._drop_jobs(result)
            result._cancelled = True
            result._finish(None, TaskCancelled("the result was cancelled"))
        loop = result.get_loop()
        for worker in stop:
            worker.proc.terminate()
            loop.call_later(GRACE_PERIOD, _kill_if_alive, worker.proc)
        if self._parked:
            self._wake()

        # the watched set changes with the workers and, while tasks wait for room in a full
        # channel, with their send-ahead state: the _step above brought it up to date

    def _drop_jobs(self, result: AsyncResult) -> tuple[list[_Worker], bool, bool]:
        """Give up ``result``'s jobs (under the mutex): drop the unsent ones, mark the sent
        cancellable ones abandoned and mark for stopping the workers running one of them.
        Returns ``(workers to stop, some job was cancelled, some job was dropped)``."""
        gone, stop, cancelled = self._sched.cancel(list(result._jobs))
        result._jobs.difference_update(gone)
        return stop, cancelled, bool(gone)

    async def _abandon(self, result: AsyncResult) -> None:
        """The awaiting task was cancelled before ``result`` was ready.

        Tasks not sent yet are dropped. A sent ``cancellable`` task is cancelled: if its
        worker is running it, the worker is stopped (terminate, grace, kill), reaped and
        replaced; if it waits behind another task there, the worker is stopped when it gets to
        it. A sent task that is not cancellable runs on; its result is discarded.
        """
        with self._mutex:
            stop, cancelled, dropped = self._drop_jobs(result)
            if cancelled:
                why = "the awaiting task was cancelled; the worker running it was stopped"
                result._finish(None, TaskCancelled(why))
            elif dropped and not result._jobs:
                why = "the awaiting task was cancelled before it ran"
                result._finish(None, TaskCancelled(why))
        if stop:
            with anyio.CancelScope(shield=True):
                await stop_async([w.proc for w in stop], GRACE_PERIOD)
                with self._mutex:
                    for worker in stop:
                        if worker in self._workers:
                            self._worker_died(worker)
                    self._step()
                if self._parked:
                    self._wake()

    # -- closing --------------------------------------------------------------------------------
    def close(self) -> None:
        """Accept no more work; workers exit once the submitted work is done."""
        with self._mutex:
            self._sched.close()
            self._step()
        self._wake()

    def terminate(self) -> None:
        """Stop the workers now; pending and running tasks fail with ``PoolClosed``."""
        with self._mutex:
            self._fail_all(self._sched.terminate(), "the pool was terminated")
            for worker in self._workers:
                if worker.proc.is_alive():
                    worker.proc.terminate()
        self._wake()
        self._drive_until(lambda: not self._workers, GRACE_PERIOD)
        self._kill_all()

    def join(self) -> None:
        """Block until every worker exited (after :meth:`close` or :meth:`terminate`)."""
        if self._state == "RUN":
            raise ValueError("Pool is still running")
        self._drive_until(lambda: not self._workers, None)
        self._release()

    async def join_async(self) -> None:
        """Awaitable :meth:`join`."""
        if self._state == "RUN":
            raise ValueError("Pool is still running")
        await self._drive_until_async(lambda: not self._workers)
        self._release()

    async def terminate_async(self) -> None:
        """Awaitable :meth:`terminate` (terminate, grace period, kill, reap)."""
        with self._mutex:
            self._fail_all(self._sched.terminate(), "the pool was terminated")
            procs = [w.proc for w in self._workers]
        with anyio.CancelScope(shield=True):
            await stop_async(procs, GRACE_PERIOD)
        with self._mutex:
            for worker in list(self._workers):
                self._worker_died(worker)
        self._release()

    def _fail_all(self, jobs: list[_Job], why: str) -> None:
        """Fail ``jobs`` (the scheduler's :meth:`~Scheduler.terminate`) with ``PoolClosed``."""
        for job in jobs:
            self._complete(job, None, PoolClosed(f"{why} before this task finished"))

    def _shutdown_now(self) -> None:
        with self._mutex:
            self._fail_all(self._sched.terminate(), "the event loop ended")
        self._kill_all()

    def _kill_all(self) -> None:
        for worker in list(self._workers):
            if worker.proc.is_alive():
                worker.proc.kill()
            worker.proc.join()
            self._remove_worker(worker)
            _close_popen(worker.proc)
        self._release()

    def _release(self) -> None:
        if self._waiter is not None:
            self._waiter.close()
            self._waiter = None
        self._drop_watch()
        if self._wake_r >= 0 and not self._workers:
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1

    def statistics(self) -> PoolStatistics:
        """Idle and busy workers, tasks pending/running/done, live shared segments and bytes."""
        with self._mutex:
            busy = sum(1 for w in self._workers if w.inflight)
            segs = _segment.live_segments()
            return PoolStatistics(
                idle_workers=len(self._workers) - busy,
                busy_workers=busy,
                tasks_pending=len(self._pending),
                tasks_running=busy,
                tasks_done=self._sched.done,
                workers_replaced=self._sched.replaced,
                live_segments=len(segs),
                live_segment_bytes=sum(s.size for s in segs),
            )

    def __del__(self) -> None:
        if getattr(self, "_workers", None):
            import warnings

            warnings.warn(f"unclosed running pool {self!r}", ResourceWarning, stacklevel=2)
            self._kill_all()


# Workers keep received segments mapped while another process holds them (see _worker).
# When this process closes a segment, tell the workers that retain some to look again.
_pools: weakref.WeakSet[Pool] = weakref.WeakSet()


def _sweep_workers() -> None:
    """Send :data:`SWEEP` to every worker that retains segments (from any thread, even a
    finalizer: one non-blocking send per worker; a full channel means it will sweep after
    the tasks it has anyway)."""
    try:
        pools = list(_pools)
    except RuntimeError:  # the set changed under us (another thread): skip this one
        return
    for pool in pools:
        for worker in list(pool._workers):
            try:
                if worker.taken.retained and not worker.tasks.closed:
                    worker.tasks.try_send_record(SWEEP, [])
            except (OSError, ValueError):  # closing concurrently
                pass


_segment.set_close_hook(_sweep_workers)


def _kill_if_alive(proc: Any) -> None:
    try:
        if proc.is_alive():
            proc.kill()
    except ValueError:  # reaped and closed already
        pass


def _close_popen(proc: Any) -> None:
    popen = getattr(proc, "_popen", None)
    close = getattr(popen, "close", None)
    if popen is not None and getattr(popen, "returncode", None) is not None and callable(close):
        close()


def _exit_text(exitcode: int | None) -> str:
    name = signal_name_of(exitcode) if exitcode is not None else None
    return f"signal {name}" if name else f"exit code {exitcode}"


def _task_failure(report: Report | Lost, job: _Job, worker: _Worker) -> BaseException:
    """The error of a task whose report is no value for it (see
    :func:`~aioshm._process.rebuild_failure`): a raised one (keyed with its job id, or None
    when the worker could not unpickle the task), a lost one, or one for another job."""
    if not isinstance(report, Lost) and report.key is not None and report.key != job.id:
        why = f"a pool worker answered job {report.key} for job {job.id}"
        report = Lost(ProtocolError(why))
    elif type(report) is Returned:  # the value of a task it could not unpickle?
        report = Lost(ProtocolError(f"a pool worker answered job {job.id} without its id"))
    pid = worker.proc.pid or -1
    error = rebuild_failure(report, None, who=f"a pool task (worker pid {pid})", pid=pid)
    assert error is not None  # a raised or lost report always makes one
    return error

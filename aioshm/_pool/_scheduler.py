"""The pool's scheduler, pure: no fds, no processes, no event loop, no clock.

:class:`Scheduler` keeps the books of :class:`~aioshm._pool._pool.Pool`: its jobs (pending,
in flight on which worker, ended) and its workers (tasks in flight, ``maxtasksperchild``
budget, stopping, exiting). The pool does the I/O (pickling, sending, reading, starting and
reaping processes) and tells the scheduler what happened; the scheduler answers with what to
do. Events in, decisions out:

==============================  ====================================================
event                            decision / effect
==============================  ====================================================
``submitted(job)``               it waits in ``pending``
``worker_started(w)``            ``w`` may be sent tasks
``ready()``, ``dispatch_plan``   which worker gets the next batch, and how many tasks
``sent(w, jobs, now)``           they are in flight on ``w`` (budget spent)
``worker_exiting(w)``            send it nothing more (its results reached EOF)
``result(w, now)``               the job it is for; stop ``w`` (its next task was
                                 cancelled); the send-ahead depth adapts
``ended(job)``                   forgotten (completed, failed, cancelled)
``forget(job)``                  its result settled early: dropped if unsent
``worker_died(w, ...)``          :class:`Death`: the job to fail, those requeued or
                                 dropped, a start-up death, the pool breaks
``cancel(jobs)``                 the unsent dropped, the workers to stop
``close()``                      no more submissions
``terminate()``                  every job to fail; no more workers
``break_pool()``                 (after a Death that breaks) every job to fail, the
                                 workers to stop; nothing accepted any more
``workers_to_start(n, lazy)``    how many workers to start (replacements, on demand)
``idle_to_exit()``               after close: the workers to send the exit record
``idle_since_before(t)``         the idle workers to retire (run_sync's pool)
==============================  ====================================================

It is built on rules that are pure functions of plain values:

* :class:`SendAhead`: how many tasks each worker is sent ahead (its channel's depth), from a
  decaying maximum of recent task times;
* :func:`pick_worker` and :func:`batch_limit`: which ready worker gets the next batch of
  pending tasks, and how many;
* :func:`blame_and_requeue`: when a worker dies, which task (if any) it died running, and
  where the tasks queued behind it go;
* :class:`StartupRule`: the broken-pool rule (:data:`STARTUP_FAILURES` start-up deaths in a
  row and the pool gives up).

All of it is tested without processes (``tests/test_scheduler.py``), including random event
orders in which no task may be lost or end twice.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Final, Generic, TypeVar, cast

__all__ = (
    "AHEAD",
    "DEPTH",
    "MAX_DEPTH",
    "STARTUP_FAILURES",
    "Death",
    "JobState",
    "Scheduler",
    "SendAhead",
    "StartupRule",
    "WorkerState",
    "batch_limit",
    "blame_and_requeue",
    "pick_worker",
)

#: Tasks sent ahead to one worker (the first runs, the rest wait in its channel): at least
#: DEPTH, and up to MAX_DEPTH while tasks are short, so that about AHEAD seconds of work wait
#: in each worker's channel. Short tasks then never leave a worker idle waiting for the next
#: one (nor the parent waking it for each), and a task that turns out long holds up at most
#: that much work queued behind it. The task time is a decaying maximum: one long task drops
#: the depth back to DEPTH at once, and it grows again over the next few dozen results.
DEPTH: Final = 2
MAX_DEPTH: Final = 32
AHEAD: Final = 0.002
#: Workers that die at start-up this many times in a row (before any worker reached its task
#: loop) break the pool: every pending and later task fails with ``BrokenPool``.
STARTUP_FAILURES: Final = 3

J = TypeVar("J")


class SendAhead:
    """The send-ahead depth: :data:`DEPTH` .. :data:`MAX_DEPTH` tasks in flight per worker."""

    __slots__ = ("depth", "task_time")

    def __init__(self) -> None:
        self.depth = DEPTH
        self.task_time = AHEAD  # decaying maximum of recent task times (seconds)

    def took(self, seconds: float) -> None:
        """A task took ``seconds`` (from when it was sent, or from the previous result)."""
        task_time = max(seconds, self.task_time * 0.9)
        if task_time != self.task_time:
            self.task_time = task_time
            self.depth = max(DEPTH, min(MAX_DEPTH, int(AHEAD / max(task_time, 1e-6))))


def pick_worker(loads: Sequence[int]) -> int:
    """The index of the ready worker with the fewest tasks in flight (the first of equals)."""
    best = 0
    for i, load in enumerate(loads):
        if load < loads[best]:
            best = i
    return best


def batch_limit(inflight: int, depth: int, budget: int | None, pending: int, ready: int) -> int:
    """How many pending tasks to send a worker with ``inflight`` tasks: up to the depth and
    its ``maxtasksperchild`` budget, leaving the other ``ready`` workers their share."""
    room = depth - inflight
    if budget is not None:
        room = min(room, budget)
    return max(0, min(room, -(-pending // max(1, ready))))


def blame_and_requeue(
    inflight: collections.deque[J],
    taken: int,
    finished: int,
    pending: collections.deque[J],
    dropped: Callable[[J], bool],
) -> tuple[J | None, list[J], list[J]]:
    """A worker died: split the tasks it was sent (``inflight``, oldest first, results read).

    It runs them in order and counts each one it takes on (``taken``) before running it; its
    results were all read (``finished``). So if it took more than it finished, it died
    running the oldest one: that one is blamed. The others never started: they go back to
    the front of ``pending`` in their order, except those ``dropped`` says to drop (their
    awaiter was cancelled). Empties ``inflight``; returns ``(blamed, requeued, dropped)``.
    """
    blamed = inflight.popleft() if inflight and taken > finished else None
    requeued: list[J] = []
    gone: list[J] = []
    for job in reversed(inflight):
        if dropped(job):
            gone.append(job)
        else:
            pending.appendleft(job)
            requeued.append(job)
    inflight.clear()
    requeued.reverse()
    gone.reverse()
    return blamed, requeued, gone


class StartupRule:
    """The broken-pool rule: ``limit`` workers in a row that die before reaching their task
    loop (no worker got through its start-up in between) and the pool gives up."""

    __slots__ = ("deaths", "limit")

    def __init__(self, limit: int = STARTUP_FAILURES) -> None:
        self.limit = limit
        self.deaths = 0

    def got_through(self) -> None:
        """A worker reached its task loop (a result came, or it died after its start-up)."""
        self.deaths = 0

    def died_at_startup(self) -> bool:
        """A worker died at start-up; True if the pool must give up now."""
        self.deaths += 1
        return self.deaths >= self.limit


# --------------------------------------------------------------------------- the bookkeeping


class JobState:
    """A job's scheduling state (the pool's job adds the function, arguments and result)."""

    __slots__ = ("abandoned", "cancellable", "id", "sent_at", "worker")

    def __init__(self, job_id: int, cancellable: bool = False) -> None:
        self.id = job_id
        self.cancellable = cancellable
        self.abandoned = False  # its awaiter was cancelled (cancellable jobs only)
        self.worker: WorkerState | None = None  # the worker it was sent to, until it ends
        self.sent_at = 0.0


class WorkerState:
    """A worker's scheduling state (the pool's worker adds the process and its channels)."""

    __slots__ = ("budget", "eof", "finished", "idle_since", "inflight", "stopping")

    def __init__(self, budget: int | None, now: float = 0.0) -> None:
        self.inflight: collections.deque[JobState] = collections.deque()  # sent, oldest first
        self.budget = budget  # tasks it may still be sent (maxtasksperchild)
        self.finished = 0  # results (or reports) received from it
        self.idle_since = now
        self.eof = False  # its result channel reached EOF: it is exiting
        self.stopping = False  # being stopped (a cancelled task, a broken pool)


class Death(Generic[J]):
    """What to do about a dead worker (:meth:`Scheduler.worker_died`)."""

    __slots__ = ("at_startup", "blamed", "breaks", "dropped", "requeued")

    def __init__(
        self,
        blamed: J | None,
        requeued: list[J],
        dropped: list[J],
        at_startup: bool,
        breaks: bool,
    ) -> None:
        self.blamed = blamed  # fail it: the worker died running it
        self.requeued = requeued  # back in the pending queue, in order
        self.dropped = dropped  # cancelled by their awaiters: forgotten
        self.at_startup = at_startup  # it died before reaching its task loop
        self.breaks = breaks  # the broken-pool rule: fail everything, start no more workers


JS = TypeVar("JS", bound=JobState)
WS = TypeVar("WS", bound=WorkerState)


class Scheduler(Generic[JS, WS]):
    """The pool's jobs and workers, with no fds, processes, event loop or clock.

    Events in, decisions out: the pool calls :meth:`submitted`, :meth:`worker_started`,
    :meth:`sent`, :meth:`result`, :meth:`worker_died`, :meth:`cancel`, :meth:`fail_all` as
    things happen and applies what they return (complete this job, stop that worker, start
    one); :meth:`dispatch_plan` says which worker gets the next batch of pending tasks and how
    many, :meth:`idle_to_exit` which workers to send the exit record on close.
    """

    __slots__ = (
        "ahead",
        "broken",
        "done",
        "jobs",
        "maxtasks",
        "pending",
        "replaced",
        "startup",
        "state",
        "workers",
    )

    def __init__(self, maxtasks: int | None = None) -> None:
        self.maxtasks = maxtasks
        self.pending: collections.deque[JS] = collections.deque()  # submitted, not sent
        self.jobs: dict[int, JS] = {}  # every job not ended, by id
        self.workers: list[WS] = []
        self.ahead = SendAhead()
        self.startup = StartupRule()
        self.done = 0  # jobs ended (a result, an error, a cancellation)
        self.replaced = 0  # workers that died (or were stopped) and were replaced
        self.state = "RUN"  # then "CLOSE" (close) or "TERMINATE" (terminate)
        self.broken = False  # the broken-pool rule struck: it fails every task

    # -- events ---------------------------------------------------------------------------
    def submitted(self, job: JS) -> bool:
        """A task was submitted: it waits in the pending queue. False if the pool is broken
        (fail it at once)."""
        if self.broken:
            return False
        self.jobs[job.id] = job
        self.pending.append(job)
        return True

    def worker_started(self, worker: WS) -> None:
        self.workers.append(worker)

    def worker_removed(self, worker: WS) -> None:
        self.workers.remove(worker)

    def sent(self, worker: WS, jobs: Sequence[JS], now: float) -> None:
        """``jobs``, the front of the pending queue, went to ``worker``: they leave it."""
        pending = self.pending
        for job in jobs:
            assert pending[0] is job, "sent jobs are the front of the pending queue"
            pending.popleft()
            job.worker = worker
            job.sent_at = now
            worker.inflight.append(job)
        if worker.budget is not None:
            worker.budget -= len(jobs)

    def result(self, worker: WS, now: float) -> tuple[JS | None, bool]:
        """A result (or a task's report) came from ``worker``: the job it is for (its oldest;
        None if it had none), and whether to stop the worker now because the next task it
        will run was cancelled by its awaiter. Complete the job with :meth:`ended`."""
        worker.finished += 1
        if self.startup.deaths:
            self.startup.got_through()
        job = cast("JS", worker.inflight.popleft()) if worker.inflight else None
        if job is not None:
            # it ran from when it was sent, or from the previous result if it was queued
            self.ahead.took(now - max(job.sent_at, worker.idle_since))
        worker.idle_since = now
        stop = bool(worker.inflight) and worker.inflight[0].abandoned and not worker.stopping
        if stop:
            worker.stopping = True
        return job, stop

    def worker_exiting(self, worker: WS) -> None:
        """``worker``'s result channel reached EOF: it is exiting; send it nothing more."""
        worker.eof = True

    def ended(self, job: JS) -> None:
        """``job`` is over (completed, failed or cancelled): forget it."""
        self.done += 1
        self.jobs.pop(job.id, None)
        job.worker = None

    def forget(self, job: JS) -> None:
        """``job``'s result was settled early (e.g. a map's first error): drop it if unsent
        (a sent one runs on; its result is discarded)."""
        self.jobs.pop(job.id, None)
        if job.worker is None:
            with contextlib.suppress(ValueError):
                self.pending.remove(job)

    def worker_died(
        self,
        worker: WS,
        taken: int,
        started: bool,
        exitcode: int | None,
    ) -> Death[JS]:
        """``worker`` is dead and its results all read: it took ``taken`` tasks, ``started``
        says whether it reached its task loop. Blames the task it died running, requeues the
        others, forgets cancelled ones, applies the broken-pool rule (a worker that dies before
        its task loop while the pool runs counts, unless it was being stopped or the pool
        broken already; if :attr:`Death.breaks`, apply :meth:`break_pool`). Remove the worker
        with :meth:`worker_removed` (and see :meth:`workers_to_start`)."""
        running = self.state == "RUN"
        at_startup = not started and running and not worker.stopping and not self.broken
        if started:
            self.startup.got_through()
        breaks = at_startup and self.startup.died_at_startup()
        inflight = cast("collections.deque[JS]", worker.inflight)
        blamed, requeued, dropped = blame_and_requeue(
            inflight, taken, worker.finished, self.pending, lambda job: job.abandoned
        )
        for job in requeued:  # they never started: sent elsewhere
            job.worker = None
        for job in dropped:
            job.worker = None
            self.jobs.pop(job.id, None)
        if blamed is not None or (exitcode not in (0, None) and running):
            self.replaced += 1
        return Death(blamed, requeued, dropped, at_startup, breaks)

    def cancel(self, jobs: Iterable[JS]) -> tuple[list[JS], list[WS], bool]:
        """An awaiter gave up ``jobs``: the unsent ones are dropped; a sent cancellable one is
        marked abandoned, and the worker running it (its oldest) is to be stopped (one
        waiting behind another task is stopped when its turn comes: :meth:`result`).
        Returns ``(dropped jobs, workers to stop, some sent job was cancelled)``."""
        dropped: list[JS] = []
        stop: list[WS] = []
        cancelled = False
        for job in jobs:
            worker = job.worker
            if worker is None:
                self.jobs.pop(job.id, None)
                with contextlib.suppress(ValueError):
                    self.pending.remove(job)
                dropped.append(job)
            elif job.cancellable:
                job.abandoned = cancelled = True
                if worker.inflight and worker.inflight[0] is job and not worker.stopping:
                    worker.stopping = True
                    stop.append(cast("WS", worker))
        return dropped, stop, cancelled

    def close(self) -> None:
        """No more submissions: workers exit once the work is done (:meth:`idle_to_exit`)."""
        if self.state == "RUN":
            self.state = "CLOSE"

    def terminate(self) -> list[JS]:
        """Stop now: every job not ended, to fail (see :meth:`fail_all`); no worker is
        replaced any more. The caller stops the workers."""
        self.state = "TERMINATE"
        return self.fail_all()

    def break_pool(self) -> tuple[list[JS], list[WS]]:
        """The broken-pool rule struck: every job not ended, to fail, and the workers to stop
        (marked stopping); from now on nothing is accepted and no worker is started."""
        self.broken = True
        stop = [w for w in self.workers if not w.stopping]
        for worker in stop:
            worker.stopping = True
        return self.fail_all(), stop

    def fail_all(self) -> list[JS]:
        """Terminate, or the broken-pool rule: every job not ended, to fail now (the caller
        ends each with :meth:`ended`); nothing is pending or in flight any more."""
        jobs = list(self.jobs.values())
        self.pending.clear()
        for worker in self.workers:
            worker.inflight.clear()
        return jobs

    # -- decisions --------------------------------------------------------------------------
    def can_take(self, worker: WS) -> bool:
        """``worker`` may be sent a task now: room in its depth and budget, not exiting or
        being stopped (the pool watches its task channel for room only then)."""
        return (
            len(worker.inflight) < self.ahead.depth
            and worker.budget != 0
            and not worker.eof
            and not worker.stopping
        )

    def ready(self) -> list[WS]:
        """The workers that may be sent a task now (:meth:`can_take`, inlined: this runs
        once per dispatch)."""
        depth = self.ahead.depth
        return [
            w
            for w in self.workers
            if len(w.inflight) < depth and w.budget != 0 and not w.eof and not w.stopping
        ]

    def dispatch_plan(self, ready: list[WS]) -> tuple[WS, int]:
        """Which of the ``ready`` workers gets the next batch of pending tasks, and how many."""
        worker = ready[pick_worker([len(w.inflight) for w in ready])]
        limit = batch_limit(
            len(worker.inflight), self.ahead.depth, worker.budget, len(self.pending), len(ready)
        )
        return worker, limit

    def full(self, worker: WorkerState) -> bool:
        """``worker`` may be sent no more tasks now (its depth or budget is used up)."""
        return len(worker.inflight) >= self.ahead.depth or worker.budget == 0

    def workers_to_start(self, processes: int, lazy: bool = False) -> int:
        """How many workers to start for a pool of ``processes``: none once closed or broken;
        a ``lazy`` pool (run_sync's) one for each task no idle worker can take."""
        if self.state != "RUN" or self.broken:
            return 0
        want = processes
        if lazy:
            busy = sum(1 for w in self.workers if w.inflight)
            want = min(processes, busy + len(self.pending))
        return max(0, want - len(self.workers))

    def idle_since_before(self, cutoff: float) -> list[WS]:
        """The workers with nothing in flight since before ``cutoff`` (run_sync retires
        them)."""
        return [w for w in self.workers if not w.inflight and w.idle_since < cutoff]

    def idle_to_exit(self) -> list[WS]:
        """After close, once nothing is pending: the workers with nothing in flight (send
        them the exit record)."""
        if self.state != "CLOSE" or self.pending:
            return []
        return [w for w in self.workers if not w.inflight]

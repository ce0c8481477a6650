"""The pool's scheduling rules (``aioshm._pool._scheduler``), with no process, fd or loop.

* send-ahead depth: grows while tasks are short, back to the minimum after one long task;
* dispatch: the least loaded ready worker, batches bounded by depth, budget
  (``maxtasksperchild``) and a fair share of what is pending;
* death blame inside a batch: a worker that took more tasks than it finished died running
  its oldest one; the others go back to the front of the pending queue in order, cancelled
  ones are dropped;
* the broken-pool rule: STARTUP_FAILURES start-up deaths in a row, reset by any worker that
  gets through its start-up;
* the scheduler (events in, decisions out) as Pool drives it, without processes: blame
  inside a batch, send-ahead depth, cancellation of unsent, running and queued tasks,
  maxtasksperchild, terminate with tasks pending, the broken-pool rule, exits on close;
* the scheduler driven by random event orders (submit, dispatch, take, finish, die, cancel,
  terminate): every task is completed, failed or dropped exactly once, none is lost.
"""

from __future__ import annotations

import collections

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aioshm._pool._scheduler import (
    AHEAD,
    DEPTH,
    MAX_DEPTH,
    STARTUP_FAILURES,
    JobState,
    Scheduler,
    SendAhead,
    StartupRule,
    WorkerState,
    batch_limit,
    blame_and_requeue,
    pick_worker,
)

# --------------------------------------------------------------------------- send-ahead depth


def test_send_ahead_grows_with_short_tasks_and_drops_after_a_long_one() -> None:
    ahead = SendAhead()
    assert ahead.depth == DEPTH
    for _ in range(200):
        ahead.took(AHEAD / 100)
    assert ahead.depth == MAX_DEPTH
    ahead.took(20 * AHEAD)  # one long task: back to the minimum at once
    assert ahead.depth == DEPTH
    depths = []
    for _ in range(100):
        ahead.took(AHEAD / 100)
        depths.append(ahead.depth)
    assert depths == sorted(depths) and depths[-1] == MAX_DEPTH  # grows back gradually
    assert depths[0] == DEPTH


@given(st.lists(st.floats(min_value=0.0, max_value=10.0), max_size=50))
def test_send_ahead_depth_stays_in_bounds(times: list[float]) -> None:
    ahead = SendAhead()
    for seconds in times:
        ahead.took(seconds)
        assert DEPTH <= ahead.depth <= MAX_DEPTH


# --------------------------------------------------------------------------- dispatch


def test_pick_worker_takes_the_least_loaded_first_of_equals() -> None:
    assert pick_worker([2, 0, 1, 0]) == 1
    assert pick_worker([3]) == 0
    assert pick_worker([1, 1]) == 0


@pytest.mark.parametrize(
    ("inflight", "depth", "budget", "pending", "ready", "want"),
    [
        (0, 2, None, 10, 1, 2),  # the depth
        (1, 2, None, 10, 1, 1),  # what is left of it
        (0, 32, None, 10, 2, 5),  # a fair share: the other ready worker gets the rest
        (0, 32, 3, 10, 1, 3),  # the maxtasksperchild budget
        (0, 32, 0, 10, 1, 0),  # no budget left
        (2, 2, None, 10, 1, 0),  # full
        (0, 8, None, 1, 3, 1),  # fewer pending than workers
    ],
)
def test_batch_limit(
    inflight: int, depth: int, budget: int | None, pending: int, ready: int, want: int
) -> None:
    assert batch_limit(inflight, depth, budget, pending, ready) == want


# --------------------------------------------------------------------------- death blame


def test_death_inside_a_batch_blames_the_task_it_was_running() -> None:
    # sent a batch of 4; finished 1 (read), took the 2nd: it died running "b"
    inflight = collections.deque(["b", "c", "d"])
    pending = collections.deque(["x"])
    blamed, requeued, dropped = blame_and_requeue(
        inflight, taken=2, finished=1, pending=pending, dropped=lambda job: False
    )
    assert blamed == "b"
    assert requeued == ["c", "d"] and dropped == []
    assert list(pending) == ["c", "d", "x"]  # in order, ahead of what was pending
    assert not inflight


def test_death_of_an_idle_worker_blames_nothing() -> None:
    # it took nothing more than it finished: it died before taking its next task
    inflight = collections.deque(["a", "b"])
    pending: collections.deque[str] = collections.deque()
    blamed, requeued, _ = blame_and_requeue(inflight, 3, 3, pending, lambda job: False)
    assert blamed is None and requeued == ["a", "b"] and list(pending) == ["a", "b"]


def test_cancelled_tasks_behind_a_dead_worker_are_dropped() -> None:
    inflight = collections.deque(["a", "b", "c"])
    pending: collections.deque[str] = collections.deque()
    blamed, requeued, dropped = blame_and_requeue(inflight, 1, 0, pending, lambda j: j == "b")
    assert (blamed, requeued, dropped) == ("a", ["c"], ["b"])
    assert list(pending) == ["c"]


# --------------------------------------------------------------------------- broken-pool rule


def test_startup_rule_breaks_after_consecutive_deaths_only() -> None:
    rule = StartupRule()
    for _ in range(STARTUP_FAILURES - 1):
        assert not rule.died_at_startup()
    rule.got_through()  # one worker reached its task loop: the count starts again
    for _ in range(STARTUP_FAILURES - 1):
        assert not rule.died_at_startup()
    assert rule.died_at_startup()
    assert rule.deaths == STARTUP_FAILURES


# --------------------------------------------------------------------------- the scheduler


class Worker(WorkerState):
    """A worker as the scheduler sees it, plus the count of tasks it took (its shared page)."""

    __slots__ = ("n", "taken")

    def __init__(self, n: int, budget: int | None) -> None:
        super().__init__(budget)
        self.n = n
        self.taken = 0


Sched = Scheduler[JobState, Worker]


def make(nworkers: int = 1, maxtasks: int | None = None) -> tuple[Sched, list[Worker]]:
    sched: Sched = Scheduler(maxtasks)
    workers = [Worker(i, maxtasks) for i in range(nworkers)]
    for w in workers:
        sched.worker_started(w)
    return sched, workers


def submit(sched: Sched, n: int, cancellable: bool = False) -> list[JobState]:
    jobs = [JobState(len(sched.jobs) + sched.done + i, cancellable) for i in range(n)]
    for job in jobs:
        sched.submitted(job)
    return jobs


def dispatch(sched: Sched) -> list[tuple[Worker, list[JobState]]]:
    """What Pool._dispatch does, with every send succeeding: the batches sent."""
    sent = []
    ready = sched.ready()
    while sched.pending and ready:
        worker, limit = sched.dispatch_plan(ready)
        assert limit > 0
        batch = list(sched.pending)[:limit]
        sched.sent(worker, batch, 0.0)
        sent.append((worker, batch))
        if sched.full(worker):
            ready.remove(worker)
    return sent


def test_dispatch_sends_up_to_the_depth_then_more_as_tasks_prove_short() -> None:
    sched, (w,) = make()
    submit(sched, 100)
    assert [len(b) for _, b in dispatch(sched)] == [DEPTH]
    assert dispatch(sched) == []  # full
    now = 0.0
    for _ in range(60):  # short tasks: the depth grows
        w.taken += 1
        now += AHEAD / 100
        job, stop = sched.result(w, now)
        assert job is not None and not stop
        sched.ended(job)
        dispatch(sched)
    assert sched.ahead.depth == MAX_DEPTH and len(w.inflight) == MAX_DEPTH


def test_death_inside_a_batch_blames_the_running_task_and_requeues_the_rest() -> None:
    sched, (w, other) = make(2)
    sched.ahead.depth = 8
    a, b, c, d, e = submit(sched, 5)
    sched.sent(w, [a, b, c, d], 0.0)  # one record of four tasks
    assert list(sched.pending) == [e]
    w.taken = 2  # took the batch's first two
    job, _ = sched.result(w, 1.0)
    assert job is a
    sched.ended(a)
    death = sched.worker_died(w, w.taken, True, -9)
    assert death.blamed is b and death.requeued == [c, d] and death.dropped == []
    assert not death.at_startup and not death.breaks
    assert list(sched.pending) == [c, d, e] and c.worker is None
    assert sched.replaced == 1
    sched.worker_removed(w)
    assert dispatch(sched) == [(other, [c, d])]  # and e waits: other is at its depth


def test_cancelling_unsent_sent_running_and_queued_tasks() -> None:
    sched, (w,) = make()
    sched.ahead.depth = 3
    running, queued, plain = submit(sched, 3, cancellable=True)
    plain.cancellable = False
    (unsent,) = submit(sched, 1)
    dispatch(sched)
    assert list(w.inflight) == [running, queued, plain] and list(sched.pending) == [unsent]
    assert sched.cancel([unsent]) == ([unsent], [], False)  # dropped, nothing to stop
    assert not sched.pending and unsent.id not in sched.jobs
    assert sched.cancel([plain]) == ([], [], False)  # not cancellable: runs on
    dropped, stop, cancelled = sched.cancel([queued])  # behind another: stopped at its turn
    assert (dropped, stop, cancelled) == ([], [], True) and queued.abandoned
    w.taken = 1
    job, stop_now = sched.result(w, 1.0)  # the one before it finished: stop the worker now
    assert job is running and stop_now and w.stopping
    sched.ended(running)
    death = sched.worker_died(w, w.taken, True, -15)
    assert death.blamed is None and death.dropped == [queued] and death.requeued == [plain]
    assert not death.at_startup  # a stopped worker is no start-up death


def test_cancelling_the_running_task_stops_its_worker_once() -> None:
    sched, (w,) = make()
    (job,) = submit(sched, 1, cancellable=True)
    dispatch(sched)
    assert sched.cancel([job]) == ([], [w], True)
    assert w.stopping and sched.cancel([job]) == ([], [], True)  # not twice
    assert sched.ready() == []  # a stopping worker gets nothing more
    w.taken = 1
    death = sched.worker_died(w, w.taken, True, -15)
    assert death.blamed is job  # the pool fails it as cancelled


def test_maxtasksperchild_budget_bounds_what_a_worker_is_sent() -> None:
    sched, (w,) = make(maxtasks=3)
    sched.ahead.depth = MAX_DEPTH
    submit(sched, 10)
    assert [len(b) for _, b in dispatch(sched)] == [3]
    assert w.budget == 0 and sched.ready() == [] and len(sched.pending) == 7
    for _ in range(3):
        w.taken += 1
        job, _ = sched.result(w, 0.0)
        assert job is not None
        sched.ended(job)
    death = sched.worker_died(w, w.taken, True, 0)  # it exits after its budget
    assert death.blamed is None and not death.requeued and sched.replaced == 0
    sched.worker_removed(w)
    fresh = Worker(1, 3)
    sched.worker_started(fresh)
    sched.ahead.depth = MAX_DEPTH
    assert [(x, len(b)) for x, b in dispatch(sched)] == [(fresh, 3)]


def test_terminate_with_tasks_pending_fails_every_job_once() -> None:
    sched, (w, idle) = make(2)
    jobs = submit(sched, 5)
    dispatch(sched)
    assert sched.pending and w.inflight and idle.inflight
    failed = sched.terminate()
    assert sorted(j.id for j in failed) == [j.id for j in jobs]
    assert not sched.pending and not w.inflight and not idle.inflight
    for job in failed:
        sched.ended(job)
    assert sched.terminate() == [] and sched.done == 5 and not sched.jobs
    death = sched.worker_died(w, 1, True, -15)  # it was running one: nothing left to blame
    assert death.blamed is None and sched.replaced == 0  # terminated: not replaced
    assert sched.workers_to_start(2) == 0
    assert sched.idle_to_exit() == []  # terminated workers are stopped, not asked to exit


def test_the_broken_pool_rule_on_worker_deaths() -> None:
    sched, _ = make(0)
    assert sched.workers_to_start(2) == 2
    for i in range(STARTUP_FAILURES - 1):
        death = sched.worker_died(Worker(i, None), 0, False, 1)
        assert death.at_startup and not death.breaks
    sched.worker_died(Worker(9, None), 1, True, -9)  # one got through: counting starts again
    stopped = Worker(10, None)
    stopped.stopping = True
    assert not sched.worker_died(stopped, 0, False, -15).at_startup  # we stopped it
    deaths = [sched.worker_died(Worker(i, None), 0, False, 1) for i in range(STARTUP_FAILURES)]
    assert [d.breaks for d in deaths] == [False] * (STARTUP_FAILURES - 1) + [True]
    # the pool breaks: every job fails, the workers left are stopped, nothing starts again
    alive = Worker(20, None)
    sched.worker_started(alive)
    pending = submit(sched, 2)
    failed, stop = sched.break_pool()
    assert failed == pending and stop == [alive] and alive.stopping and not sched.pending
    assert not sched.submitted(JobState(99))  # later tasks fail at once
    assert sched.workers_to_start(4) == 0
    assert not sched.worker_died(Worker(12, None), 0, False, 1).at_startup  # broken already
    # a result from any worker resets the count too
    sched2, (w,) = make()
    sched2.worker_died(Worker(5, None), 0, False, 1)
    submit(sched2, 1)
    dispatch(sched2)
    w.taken = 1
    sched2.result(w, 0.0)
    assert sched2.startup.deaths == 0


def test_start_up_deaths_after_close_or_terminate_do_not_count() -> None:
    for stop in ("close", "terminate"):
        sched, _ = make(0)
        getattr(sched, stop)()
        for i in range(STARTUP_FAILURES):
            death = sched.worker_died(Worker(i, None), 0, False, 1)
            assert not death.at_startup and not death.breaks
        assert sched.workers_to_start(2) == 0  # and none is replaced


def test_workers_to_start_replaces_the_dead_and_a_lazy_pool_grows_on_demand() -> None:
    sched, (w, _) = make(2)
    assert sched.workers_to_start(2) == 0
    sched.worker_died(w, 0, True, -9)
    sched.worker_removed(w)
    assert sched.workers_to_start(2) == 1
    lazy, _ = make(0)
    assert lazy.workers_to_start(4, lazy=True) == 0  # nothing to run: none
    submit(lazy, 3)
    assert lazy.workers_to_start(4, lazy=True) == 3  # one per task, up to the size
    submit(lazy, 3)
    assert lazy.workers_to_start(4, lazy=True) == 4


def test_a_task_that_cannot_be_sent_is_forgotten_the_rest_go() -> None:
    """As Pool._send_batch does it: the batch is built from the front of the pending queue,
    a task that does not pickle is forgotten (and failed), the others are sent."""
    sched, (w,) = make()
    sched.ahead.depth = 4
    a, bad, c, d = submit(sched, 4)
    sched.forget(bad)
    sched.ended(bad)
    sched.sent(w, [a, c], 0.0)
    assert list(sched.pending) == [d] and list(w.inflight) == [a, c]
    assert bad.id not in sched.jobs and sched.done == 1 and a.worker is w


def test_idle_workers_to_retire() -> None:
    sched, (busy, idle, fresh) = make(3)
    busy.idle_since, idle.idle_since, fresh.idle_since = 1.0, 1.0, 9.0
    sched.sent(busy, submit(sched, 1), 1.0)
    assert sched.idle_since_before(5.0) == [idle]


def test_exiting_and_stopping_workers_are_sent_nothing() -> None:
    sched, (exiting, stopping, fine, spent) = make(4, maxtasks=1)
    sched.worker_exiting(exiting)
    stopping.stopping = True
    sched.sent(spent, submit(sched, 1), 0.0)
    sched.pending.clear()
    assert [sched.can_take(w) for w in sched.workers] == [False, False, True, False]
    assert sched.ready() == [fine]
    submit(sched, 3)
    assert dispatch(sched) == [(fine, [sched.jobs[1]])]  # its budget: one


def test_idle_workers_exit_on_close_once_nothing_is_pending() -> None:
    sched, (w, idle) = make(2)
    submit(sched, 3)
    sched.sent(w, [sched.pending[0]], 0.0)
    assert sched.idle_to_exit() == []  # still running
    sched.close()
    assert sched.idle_to_exit() == []  # two still pending
    sched.pending.clear()
    assert sched.idle_to_exit() == [idle]
    assert sched.workers_to_start(2) == 0


# --------------------------------------------------------------------------- random event orders


class SchedulerDriver:
    """The real :class:`Scheduler` driven as Pool drives it, by events the test chooses;
    workers take, finish and die when told. Records every job's end."""

    def __init__(self, nworkers: int, maxtasks: int | None) -> None:
        self.maxtasks = maxtasks
        self.sched, _ = make(nworkers, maxtasks)
        self.n = nworkers
        self.outcomes: collections.Counter[int] = collections.Counter()
        self.submitted = 0
        self.now = 0.0

    def worker(self, i: int) -> Worker:
        return self.sched.workers[i % len(self.sched.workers)]

    def end(self, job: JobState) -> None:
        self.outcomes[job.id] += 1
        self.sched.ended(job)

    def submit(self, n: int) -> None:
        for _ in range(n):
            self.sched.submitted(JobState(self.submitted, cancellable=self.submitted % 2 == 0))
            self.submitted += 1

    def dispatch(self) -> None:
        for worker, _ in dispatch(self.sched):
            assert len(worker.inflight) <= self.sched.ahead.depth
            assert worker.budget is None or worker.budget >= 0

    def take(self, i: int) -> None:
        w = self.worker(i)
        if w.taken == w.finished and w.inflight:
            w.taken += 1

    def finish(self, i: int, seconds: float) -> None:
        w = self.worker(i)
        if w.taken == w.finished + 1:
            self.now += seconds
            job, stop = self.sched.result(w, self.now)
            assert job is not None
            self.end(job)  # (an abandoned one's result is discarded: it ends all the same)
            if stop:
                self.die(i)
            elif self.maxtasks is not None and w.finished == self.maxtasks:
                assert not w.inflight  # never sent more than its budget
                self.die(i, exitcode=0)

    def die(self, i: int, exitcode: int = -9) -> None:
        w = self.worker(i)
        death = self.sched.worker_died(w, w.taken, True, exitcode)
        if death.blamed is not None:
            self.end(death.blamed)  # ProcessExitedException, or TaskCancelled if abandoned
        for job in death.dropped:  # TaskCancelled already (the scheduler forgot it)
            self.outcomes[job.id] += 1
        self.sched.worker_removed(w)
        self.sched.worker_started(Worker(w.n, self.maxtasks))

    def cancel(self, n: int) -> None:
        """Cancel the await of the ``n``-th live job (modulo their number)."""
        ids = sorted(self.sched.jobs)
        if not ids:
            return
        job = self.sched.jobs[ids[n % len(ids)]]
        dropped, stop, _ = self.sched.cancel([job])
        for gone in dropped:  # TaskCancelled
            self.outcomes[gone.id] += 1
        for w in stop:
            self.die(self.sched.workers.index(w), exitcode=-15)

    def check(self) -> None:
        pending = [j.id for j in self.sched.pending]
        inflight = [j.id for w in self.sched.workers for j in w.inflight]
        where = pending + inflight
        assert len(where) == len(set(where))  # never a task in two places
        assert not set(where) & {i for i, c in self.outcomes.items() if c}  # nor once ended
        assert set(where) <= set(self.sched.jobs)  # every live one is known
        assert len(self.sched.workers) == self.n

    def drain(self) -> None:
        """No more deaths: run everything to completion."""
        for _ in range(10_000):
            self.dispatch()
            busy = [i for i, w in enumerate(self.sched.workers) if w.inflight]
            if not busy and not self.sched.pending:
                return
            for i in busy:
                self.take(i)
                self.finish(i, AHEAD)
        raise AssertionError("the scheduler did not drain")


EVENTS = st.one_of(
    st.tuples(st.just("submit"), st.integers(0, 3)),
    st.tuples(st.just("dispatch"), st.just(0)),
    st.tuples(st.just("take"), st.integers(0, 3)),
    st.tuples(st.just("finish"), st.integers(0, 3)),
    st.tuples(st.just("die"), st.integers(0, 3)),
    st.tuples(st.just("cancel"), st.integers(0, 40)),
    st.tuples(st.just("slow"), st.integers(0, 3)),
    st.tuples(st.just("terminate"), st.just(0)),
)


@settings(max_examples=300, deadline=None)
@given(
    nworkers=st.integers(1, 3),
    maxtasks=st.one_of(st.none(), st.integers(1, 4)),
    events=st.lists(EVENTS, min_size=20, max_size=150),
)
def test_no_task_is_lost_or_completed_twice(
    nworkers: int, maxtasks: int | None, events: list[tuple[str, int]]
) -> None:
    """The real scheduler, under random orders of submit, dispatch, take, finish, death,
    cancel and terminate: every job ends exactly once, none is lost or in two places."""
    driver = SchedulerDriver(nworkers, maxtasks)
    terminated = False
    for kind, n in events:
        if kind == "submit" and not terminated:
            driver.submit(n + 1)
        elif kind == "dispatch":
            driver.dispatch()
        elif kind == "take":
            driver.take(n)
        elif kind in ("finish", "slow"):
            driver.finish(n, AHEAD / 50 if kind == "finish" else 10 * AHEAD)
        elif kind == "die":
            driver.die(n)
        elif kind == "cancel":
            driver.cancel(n)
        elif kind == "terminate":
            for job in driver.sched.terminate():  # PoolClosed
                driver.end(job)
            for i in range(nworkers):  # the workers are stopped, their results ignored
                driver.worker(i).taken = driver.worker(i).finished
            terminated = True
        if kind != "take" and n % 4:  # as Pool does after most events (its sends may fail)
            driver.dispatch()
        driver.check()
    driver.drain()
    assert set(driver.outcomes) == set(range(driver.submitted))
    assert all(count == 1 for count in driver.outcomes.values()), driver.outcomes
    assert not driver.sched.jobs

"""The pool's scheduling rules (``aioshm._pool._scheduler``), with no process, fd or loop.

* send-ahead depth: grows while tasks are short, back to the minimum after one long task;
* dispatch: the least loaded ready worker, batches bounded by depth, budget
  (``maxtasksperchild``) and a fair share of what is pending;
* death blame inside a batch: a worker that took more tasks than it finished died running
  its oldest one; the others go back to the front of the pending queue in order, cancelled
  ones are dropped;
* the broken-pool rule: STARTUP_FAILURES start-up deaths in a row, reset by any worker that
  gets through its start-up;
* a model pool driven by random event orders (submit, dispatch, take, finish, die, cancel):
  every task is completed, failed or dropped exactly once, none is lost.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aioshm._pool._scheduler import (
    AHEAD,
    DEPTH,
    MAX_DEPTH,
    STARTUP_FAILURES,
    SendAhead,
    StartupRule,
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


# --------------------------------------------------------------------------- a model pool


@dataclass
class Job:
    id: int
    cancelled: bool = False  # its awaiter was cancelled (sent: dropped if not started)


@dataclass
class Worker:
    inflight: collections.deque[Job] = field(default_factory=collections.deque)
    taken: int = 0
    finished: int = 0
    budget: int | None = None


class ModelPool:
    """The pool's bookkeeping as :class:`~aioshm._pool._pool.Pool` does it, on the pure
    rules, with workers that take, finish and die when the test says so."""

    def __init__(self, nworkers: int, maxtasks: int | None) -> None:
        self.maxtasks = maxtasks
        self.workers = [Worker(budget=maxtasks) for _ in range(nworkers)]
        self.pending: collections.deque[Job] = collections.deque()
        self.ahead = SendAhead()
        self.outcomes: collections.Counter[int] = collections.Counter()
        self.submitted = 0

    def submit(self) -> None:
        self.pending.append(Job(self.submitted))
        self.submitted += 1

    def end(self, job: Job) -> None:
        self.outcomes[job.id] += 1

    def dispatch(self) -> None:
        depth = self.ahead.depth
        ready = [w for w in self.workers if len(w.inflight) < depth and w.budget != 0]
        while self.pending and ready:
            worker = ready[pick_worker([len(w.inflight) for w in ready])]
            limit = batch_limit(
                len(worker.inflight), depth, worker.budget, len(self.pending), len(ready)
            )
            assert limit > 0
            for _ in range(limit):
                if not self.pending:
                    break
                worker.inflight.append(self.pending.popleft())
                if worker.budget is not None:
                    worker.budget -= 1
            assert len(worker.inflight) <= depth
            if len(worker.inflight) >= depth or worker.budget == 0:
                ready.remove(worker)

    def take(self, i: int) -> None:
        """Worker ``i`` takes its next task off its channel (if it is not running one)."""
        w = self.workers[i % len(self.workers)]
        if w.taken == w.finished and len(w.inflight) > 0:
            w.taken += 1

    def finish(self, i: int, seconds: float) -> None:
        """Worker ``i`` finishes the task it runs; the parent reads the result."""
        w = self.workers[i % len(self.workers)]
        if w.taken == w.finished + 1:
            w.finished += 1
            self.end(w.inflight.popleft())
            self.ahead.took(seconds)
            if self.maxtasks is not None and w.finished == self.maxtasks:
                assert not w.inflight  # never sent more than its budget
                self.replace(w)

    def die(self, i: int) -> None:
        w = self.workers[i % len(self.workers)]
        blamed, _, dropped = blame_and_requeue(
            w.inflight, w.taken, w.finished, self.pending, lambda job: job.cancelled
        )
        if blamed is not None:
            self.end(blamed)  # failed with ProcessExitedException
        for job in dropped:
            self.end(job)  # its awaiter was cancelled: TaskCancelled
        self.replace(w)

    def replace(self, w: Worker) -> None:
        self.workers[self.workers.index(w)] = Worker(budget=self.maxtasks)

    def cancel(self, n: int) -> None:
        """Cancel the await of job ``n``: dropped if unsent, else marked (as in _drop_jobs)."""
        for job in self.pending:
            if job.id == n:
                self.pending.remove(job)
                self.end(job)
                return
        for w in self.workers:
            for job in w.inflight:
                if job.id == n:
                    job.cancelled = True

    def drain(self) -> None:
        """No more deaths: run everything to completion."""
        for _ in range(10_000):
            self.dispatch()
            busy = [i for i, w in enumerate(self.workers) if w.inflight]
            if not busy and not self.pending:
                return
            for i in busy:
                self.take(i)
                self.finish(i, AHEAD)
        raise AssertionError("the model pool did not drain")


EVENTS = st.one_of(
    st.tuples(st.just("submit"), st.integers(0, 3)),
    st.tuples(st.just("dispatch"), st.just(0)),
    st.tuples(st.just("take"), st.integers(0, 3)),
    st.tuples(st.just("finish"), st.integers(0, 3)),
    st.tuples(st.just("die"), st.integers(0, 3)),
    st.tuples(st.just("cancel"), st.integers(0, 40)),
    st.tuples(st.just("slow"), st.integers(0, 3)),
)


@settings(max_examples=300, deadline=None)
@given(
    nworkers=st.integers(1, 3),
    maxtasks=st.one_of(st.none(), st.integers(1, 4)),
    events=st.lists(EVENTS, max_size=120),
)
def test_no_task_is_lost_or_completed_twice(
    nworkers: int, maxtasks: int | None, events: list[tuple[str, int]]
) -> None:
    pool = ModelPool(nworkers, maxtasks)
    for kind, n in events:
        if kind == "submit":
            for _ in range(n + 1):
                pool.submit()
        elif kind == "dispatch":
            pool.dispatch()
        elif kind == "take":
            pool.take(n)
        elif kind in ("finish", "slow"):
            pool.finish(n, AHEAD / 50 if kind == "finish" else 10 * AHEAD)
        elif kind == "die":
            pool.die(n)
        else:
            pool.cancel(n)
        # never a task in two places
        where = [j.id for j in pool.pending] + [j.id for w in pool.workers for j in w.inflight]
        assert len(where) == len(set(where))
        assert not set(where) & {i for i, c in pool.outcomes.items() if c}
    pool.drain()
    assert set(pool.outcomes) == set(range(pool.submitted))
    assert all(count == 1 for count in pool.outcomes.values()), pool.outcomes

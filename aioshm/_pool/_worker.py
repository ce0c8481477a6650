"""The pool worker's loop (runs in the child; anyio-free, blocking).

Protocol, one record per message on two SOCK_SEQPACKET channels of its own:

* parent → worker: ``(job_id, fn, args, kwds)``, or a batch of small fd-less tasks as a list
  of such pickles (one record, one syscall each way, for many tiny tasks), or ``None`` to
  exit, or the raw record :data:`SWEEP` (not a task: "a segment you retain may have lost its
  last other holder");
* worker → parent: each task's outcome report, sent by the one child runner of Process
  children and spawn ranks (:func:`~aioshm._process.run_target`,
  :func:`~aioshm._process.send_report`) with the job id as key: ``("ok", job_id, value)`` or
  ``("raised", job_id, exc_or_None, type_name, traceback_text)``, the key None when a task
  could not even be unpickled (the parent knows which job it sent); ``("init-failed", None,
  exc_or_None, type_name, traceback_text)`` when the ``initializer`` raised (then it exits
  with code 1, printing nothing). See Note [Pool records] in :mod:`aioshm._wire._pool`.

The counter page's third word is set once the worker reached its task loop: a worker that
dies without it died at start-up (see the pool's broken-pool rule).

A worker runs its tasks strictly in order and counts, in a page it shares with the parent
(:class:`TaskCounter`), every task it takes on before unpickling it (a batch's first task
when it takes the record off its channel, the others as it gets to them). So when
a worker dies the parent knows whether it was running the oldest task it was sent (blame that
one) or died idle, before taking it (blame none; send them elsewhere). It ignores SIGINT (the parent turns Ctrl-C into
cancellation), dies with its parent, and drops every reference to a task's arguments and result
before it takes the next one (and collects cycles if shared segments are still mapped).

It keeps the segments it received mapped between tasks (``_segment.retain_received``), so a
shared array sent with task after task is mapped and faulted in once, as in a Ray worker that
keeps its object store mapped. It never keeps memory alive on its own: after every task, and
whenever the parent closes a segment (a :data:`SWEEP` record), it unmaps every retained segment
that no other process holds any more. The counter page's second word tells the parent whether
it retains anything, so sweeps go only to workers that do.
"""

from __future__ import annotations

import collections
import gc
import mmap
import os
import signal
from collections.abc import Callable
from typing import Any

from .. import _procutil, _reduction
from .._connection import RecordChannel, anon_fd
from .._exceptions import ProtocolError
from .._process import raised_report, run_target, send_report
from .._shm import _segment
from .._wire._pool import SWEEP, decode_task, init_failed_record
from .._wire._report import Report

__all__ = ("TaskCounter", "worker_main")


class TaskCounter:
    """A 64-bit counter in a page shared by the parent and one worker (no syscall to bump)."""

    __slots__ = ("_fd", "_map", "_view")

    def __init__(self, fd: int | None = None) -> None:
        if fd is None:
            fd = anon_fd("aioshm-pool-counter", mmap.PAGESIZE)
        self._fd = fd
        self._map = mmap.mmap(fd, mmap.PAGESIZE)
        self._view = memoryview(self._map).cast("Q")

    @property
    def value(self) -> int:
        return int(self._view[0])

    @property
    def retained(self) -> bool:
        """The worker keeps received segments mapped (set by the worker after each task)."""
        return bool(self._view[1])

    def set_retained(self, retained: bool) -> None:
        self._view[1] = int(retained)

    @property
    def started(self) -> bool:
        """The worker got through its start-up (imports, ``initializer``) to its task loop."""
        return bool(self._view[2])

    def set_started(self) -> None:
        self._view[2] = 1

    def bump(self) -> None:
        self._view[0] += 1

    def close(self) -> None:
        if self._fd >= 0:
            self._view.release()
            self._map.close()
            os.close(self._fd)
            self._fd = -1

    def __reduce__(self) -> tuple[Any, ...]:
        from .._reduction import fd_ref

        return (_rebuild_counter, (fd_ref(os.dup(self._fd), owned=True),))


def _rebuild_counter(ref: object) -> TaskCounter:
    from .._reduction import take_fd

    return TaskCounter(take_fd(ref))


#: What an unpicklable return value is called in the error that reports it.
_WHAT = "the result of a pool task"


def worker_main(
    tasks: RecordChannel,
    results: RecordChannel,
    initializer: Callable[..., object] | None,
    initargs: tuple[Any, ...],
    maxtasks: int | None,
    taken: TaskCounter,
) -> None:
    """Run tasks from ``tasks`` until ``None``, EOF or ``maxtasks`` tasks are done."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _procutil.arm_parent_death_watch()
    _segment.retain_received(True)
    if initializer is not None:
        try:
            initializer(*initargs)
        except BaseException as exc:  # reported once to the parent, not printed here
            failed = raised_report(exc)
            send_report(lambda msg: results.send(init_failed_record(msg)), failed, _WHAT)
            raise SystemExit(1) from None
    taken.set_started()  # from here on, a death is no start-up failure
    done = 0
    batch: collections.deque[bytes] = collections.deque()  # pickled tasks still to run
    while maxtasks is None or done < maxtasks:
        if batch:
            taken.bump()  # from here on, a death is this task's fault
            try:
                task = decode_task(_reduction.loads(batch.popleft(), []))
            except Exception as exc:  # the task could not be rebuilt here: no job id
                send_report(results.send, raised_report(exc), _WHAT)
                done += 1
                continue
        else:
            try:
                record = tasks.recv_record()
            except EOFError:
                return
            if record[0] == SWEEP and not record[1]:
                taken.set_retained(_segment.sweep_retained() > 0)
                continue
            taken.bump()  # from here on, a death is this (or the batch's first) task's fault
            try:
                task = tasks.decode(*record)
                if type(task) is list:  # a batch: run its tasks in order (loads checks each)
                    if not task:
                        raise ProtocolError("an empty pool task batch")
                    batch.extend(task)
                    task = _reduction.loads(batch.popleft(), [])
                task = decode_task(task)
            except Exception as exc:  # the task could not be rebuilt here: no job id
                send_report(results.send, raised_report(exc), _WHAT)
                done += 1
                continue
            del record
        if task is None:
            return
        outcome: Report = run_target(task.fn, task.args, task.kwds, task.job_id)
        task = None  # drop the arguments before sending (the result may be large)
        send_report(results.send, outcome, _WHAT)
        del outcome  # nor keep the result while waiting for the next task
        done += 1
        if any(seg.has_views() for seg in _segment.live_segments()):
            gc.collect()  # views kept alive only by cycles: release the segments now
        taken.set_retained(_segment.sweep_retained() > 0)

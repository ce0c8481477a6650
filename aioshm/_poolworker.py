"""The pool worker's loop (runs in the child; anyio-free, blocking).

Protocol, one record per message on two SOCK_SEQPACKET channels of its own:

* parent → worker: ``(job_id, fn, args, kwds)``, or ``None`` to exit;
* worker → parent: ``("ok", job_id, value)`` or ``("raised", job_id, exc_or_None, type_name,
  traceback_text)``; ``("bad-task", None, None, type_name, traceback_text)`` when a task could
  not even be unpickled (the parent knows which job it sent).

A worker runs its tasks strictly in order, so the parent can tell from what it already received
which task a dead worker was running. It ignores SIGINT (the parent turns Ctrl-C into
cancellation), dies with its parent, and drops every reference to a task's arguments and result
before it takes the next one (and collects cycles if shared segments are still mapped), so
shared memory is released after every task.
"""

from __future__ import annotations

import gc
import signal
from collections.abc import Callable
from typing import Any

from . import _procutil
from ._connection import RecordChannel
from ._shm import _segment

__all__ = ("worker_main",)


def _send_raised(
    results: RecordChannel, job_id: Any, exc: BaseException, tag: str = "raised"
) -> None:
    import traceback

    from ._spawn import _round_trips, _type_name

    tb_text = "".join(traceback.format_exception(exc))
    payload = exc if _round_trips(exc) else None
    try:
        results.send((tag, job_id, payload, _type_name(type(exc)), tb_text))
    except Exception:
        results.send((tag, job_id, None, _type_name(type(exc)), tb_text))


def worker_main(
    tasks: RecordChannel,
    results: RecordChannel,
    initializer: Callable[..., object] | None,
    initargs: tuple[Any, ...],
    maxtasks: int | None,
) -> None:
    """Run tasks from ``tasks`` until ``None``, EOF or ``maxtasks`` tasks are done."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _procutil.arm_parent_death_watch()
    if initializer is not None:
        initializer(*initargs)
    done = 0
    while maxtasks is None or done < maxtasks:
        try:
            task = tasks.recv()
        except EOFError:
            return
        except Exception as exc:  # the task could not be rebuilt here
            _send_raised(results, None, exc, "bad-task")
            done += 1
            continue
        if task is None:
            return
        job_id, fn, args, kwds = task
        task = None
        try:
            value = fn(*args, **kwds)
        except Exception as exc:
            fn = args = kwds = None
            _send_raised(results, job_id, exc)
        else:
            fn = args = kwds = None
            try:
                results.send(("ok", job_id, value))
            except Exception as exc:  # the result could not be pickled
                import pickle

                err = pickle.PicklingError(
                    f"the result of a pool task cannot be sent to the parent: a "
                    f"{type(value).__qualname__} could not be pickled ({exc!r})"
                )
                err.__cause__ = exc
                _send_raised(results, job_id, err)
            value = None
        done += 1
        if any(seg.has_views() for seg in _segment.live_segments()):
            gc.collect()  # views kept alive only by cycles: release the segments now

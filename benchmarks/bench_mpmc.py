"""P9: MPMC queue throughput, P producers -> one queue -> C consumers, all separate processes.

Shapes 2x2 and 4x4; payloads a small tuple ``(1, 2.5, "abc")`` and a 1 MiB float32 array (a
private array, so every put is a value send: pickled by the stdlib and faster-fifo, copied into
a recycled shared segment by aioshm). Each producer puts its share of ``n`` items; when every
producer has exited, the parent puts one ``None`` per consumer; each consumer counts its items
until its ``None`` and reports the count. The timed region runs from the moment the (already
started, waiting) producers are released to the last consumer's report; process start is
outside it (every child reports that it runs, an async consumer from inside its event
loop, before the producers are released). Processes start with fork.

Rows (every row runs in each repeat; the row order rotates between repeats):

* ``stdlib``: ``multiprocessing.Queue``;
* ``ff`` / ``ff_many``: faster-fifo ``Queue`` (a shared-memory ring in C++), ``put``/``get``
  and ``put_many``/``get_many`` (the batches it is made for); it pickles with
  ``ForkingPickler`` as the stdlib does, so aioshm's ndarray reducer is switched off for the
  peers' rows;
* ``aioshm`` / ``aioshm_many``: ``aioshm.Queue``, ``put``/``get`` and ``put_many``/
  ``get_many``;
* ``aioshm_async`` / ``aioshm_async_many``: sync producers, consumers that run an asyncio loop
  and ``await q.get_async()`` / ``await q.get_many_async(B)``.

Batches are of ``B`` items (64 tuples, 8 arrays). The array rows use a bounded queue (32
items; faster-fifo: 64 MiB of ring) so that at most that much is in flight.

Targets (throughput, medians of per-repeat ratios), for each shape:

* small tuples, with the batch methods (``put_many``/``get_many``, and ``get_many_async`` for
  async consumers): aioshm >= 1.5x the stdlib and ahead of batched faster-fifo;
* 1 MiB arrays: aioshm >= 10x the stdlib, every aioshm row, async consumers too.

The one-item rows (``put``/``get``, ``get_async``) of small tuples are printed against the
stdlib and unbatched faster-fifo with no target: every item is one record on a socket, about
3 µs of kernel time per put and get, which a queue that batches under the hood (the stdlib's
feeder thread, faster-fifo's ring) does not pay per item.

Usage::

    .venv/bin/python benchmarks/bench_mpmc.py            # 2x2 and 4x4, 3 repeats (~2 minutes)
    .venv/bin/python benchmarks/bench_mpmc.py --quick    # 2x2 only, fewer items, 1 repeat
    .venv/bin/python benchmarks/bench_mpmc.py --only aioshm stdlib --shapes 2x2 --payloads tuple
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as stdmp
import os
import queue
import statistics
import sys
import time
from collections.abc import Callable
from multiprocessing.reduction import ForkingPickler
from typing import Any

import numpy as np
from _bench_report import per_rep_ratio, verdict

import aioshm
from aioshm._transport import _queue as _preload  # noqa: F401  # forked children inherit it

CTX = stdmp.get_context("fork")
TUPLE = (1, 2.5, "abc")
ARRAY_ELEMS = (1 << 20) // 4  # 1 MiB of float32
BOUNDED = 32  # array rows: items in flight at most
RUN_LIMIT = 120.0  # seconds: a run that takes longer (a peer's child died) fails
FF_BYTES = 64 << 20
BATCH = {"tuple": 64, "array": 8}
ITEMS = {"tuple": 20_000, "array": 400}
QUICK_ITEMS = {"tuple": 10_000, "array": 200}

ROWS: list[tuple[str, str]] = [
    ("stdlib", "stdlib multiprocessing.Queue"),
    ("ff", "faster-fifo put/get"),
    ("ff_many", "faster-fifo put_many/get_many"),
    ("aioshm", "aioshm Queue put/get"),
    ("aioshm_many", "aioshm Queue put_many/get_many"),
    ("aioshm_async", "aioshm, async consumers (get_async)"),
    ("aioshm_async_many", "aioshm, async consumers (get_many_async)"),
]
BATCHED = {"ff_many", "aioshm_many", "aioshm_async_many"}


# --------------------------------------------------------------------------- children


def _payload(kind: str) -> Any:
    return TUPLE if kind == "tuple" else np.ones(ARRAY_ELEMS, np.float32)


def producer(q: Any, ready: Any, go: Any, n: int, kind: str, batch: int) -> None:
    item = _payload(kind)
    ready.put(1)
    go.wait()
    if batch > 1:
        put_many = q.put_many
        for start in range(0, n, batch):
            put_many([item] * min(batch, n - start))
    else:
        put = q.put
        for _ in range(n):
            put(item)


def _count(items: list[Any], q: Any) -> tuple[int, bool]:
    """Items in a batch that are not the end marker, and whether the marker was there (any
    extra markers go back on the queue for the other consumers)."""
    ends = sum(1 for x in items if x is None)
    for _ in range(ends - 1):
        q.put(None)
    return len(items) - ends, ends > 0


def _ff_retry(get: Callable[[], Any]) -> Any:
    """faster-fifo's get can raise Empty early with several consumers and big messages (it
    grows its buffer and retries without waiting, and another consumer took the message):
    wait again, as its docs' consumer loops do."""
    while True:
        try:
            return get()
        except queue.Empty:
            continue


def consumer(q: Any, ready: Any, done: Any, batch: int, is_ff: bool) -> None:
    count = 0
    ready.put(1)
    if batch > 1:
        get_many = q.get_many
        while True:
            if is_ff:
                items = _ff_retry(lambda: get_many(timeout=600, max_messages_to_get=batch))
            else:
                items = get_many(batch)
            got, end = _count(items, q)
            count += got
            if end:
                break
    else:
        get = (lambda: _ff_retry(lambda: q.get(timeout=600))) if is_ff else q.get
        while True:
            item = get()
            if item is None:
                break
            count += 1
    done.put(count)


def async_consumer(q: Any, ready: Any, done: Any, batch: int, is_ff: bool) -> None:
    async def main() -> int:
        count = 0
        with contextlib.suppress(queue.Empty):  # warm: anyio's backend, the queue's locks
            await q.get_many_async(1, block=False)
        ready.put(1)
        if batch > 1:
            while True:
                got, end = _count(await q.get_many_async(batch), q)
                count += got
                if end:
                    return count
        get_async = q.get_async
        while True:
            if await get_async() is None:
                return count
            count += 1

    done.put(asyncio.run(main()))


# --------------------------------------------------------------------------- one run


def _make_queue(key: str, kind: str) -> Any:
    if key == "stdlib":
        return CTX.Queue(BOUNDED if kind == "array" else 0)
    if key.startswith("ff"):
        import faster_fifo

        return faster_fifo.Queue(max_size_bytes=FF_BYTES)
    return aioshm.Queue(BOUNDED if kind == "array" else 0, ctx=CTX)


def one_run(key: str, kind: str, nprod: int, ncons: int, n: int) -> float:
    """Seconds to move ``n`` items through the row's queue."""
    batch = BATCH[kind] if key in BATCHED else 1
    q = _make_queue(key, kind)
    go = CTX.Event()
    ready, done = CTX.Queue(), CTX.Queue()  # stdlib queues: gets with a timeout
    target = async_consumer if key.startswith("aioshm_async") else consumer
    is_ff = key.startswith("ff")
    cons = [CTX.Process(target=target, args=(q, ready, done, batch, is_ff)) for _ in range(ncons)]
    share = [n // nprod + (1 if i < n % nprod else 0) for i in range(nprod)]
    prods = [CTX.Process(target=producer, args=(q, ready, go, k, kind, batch)) for k in share]
    procs = cons + prods
    # the peers pickle arrays (faster-fifo uses ForkingPickler too, and carries no fds): switch
    # aioshm's ndarray reducer off for them; fork gives the children the reducers as they are
    peer = not key.startswith("aioshm")
    saved = ForkingPickler._extra_reducers.pop(np.ndarray, None) if peer else None
    try:
        for p in procs:
            p.start()
        for _ in procs:  # every child is running (an async consumer: in its event loop)
            ready.get(timeout=RUN_LIMIT)
        t0 = time.perf_counter()
        go.set()
        deadline = time.monotonic() + RUN_LIMIT
        for p in prods:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.exitcode != 0:
                raise RuntimeError(f"a producer did not finish in {RUN_LIMIT:g} s ({p.exitcode=})")
        for _ in cons:
            q.put(None, timeout=RUN_LIMIT)
        try:
            total = sum(done.get(timeout=max(0.0, deadline - time.monotonic())) for _ in cons)
        except queue.Empty:
            codes = [p.exitcode for p in cons]
            raise RuntimeError(f"a consumer did not finish (exit codes {codes})") from None
        wall = time.perf_counter() - t0
        if total != n:
            raise AssertionError(f"{key}: consumers got {total} items, not {n}")
        for p in cons:
            p.join()
        return wall
    finally:
        if saved is not None:
            ForkingPickler._extra_reducers[np.ndarray] = saved
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
        for aux in (ready, done):
            aux.close()
            aux.join_thread()
        if hasattr(q, "close"):
            q.close()
        if key == "stdlib":
            q.cancel_join_thread()  # a failed run may leave items no one will read


# --------------------------------------------------------------------------- report


def report(
    samples: dict[tuple[str, str, str], list[float]], shapes: list[str], kinds: list[str],
    items: dict[str, int], reps: int,
) -> None:  # fmt: skip
    labels = dict(ROWS)
    for kind in kinds:
        n = items[kind]
        unit = "k msg/s"
        print()
        what = "small tuples" if kind == "tuple" else "1 MiB float32 arrays (value sends)"
        print(f"P9: {what}, {n:,} items per run, {reps} repeats, medians (fork)")
        head = f"| {'queue':<42} |" + "".join(f" {s + ' ' + unit:>13} |" for s in shapes)
        head += "".join(f" {s + ' vs stdlib':>14} |" for s in shapes)
        print(head)
        print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
        for key, _ in ROWS:
            cells = []
            ratios = []
            for shape in shapes:
                s = samples.get((key, kind, shape))
                base = samples.get(("stdlib", kind, shape))
                if s is None:
                    cells.append(f" {'':>13} |")
                    ratios.append(f" {'':>14} |")
                    continue
                if not s:
                    cells.append(f" {'failed':>13} |")
                    ratios.append(f" {'':>14} |")
                    continue
                cells.append(f" {n / statistics.median(s) / 1e3:>13.2f} |")
                r = f"{per_rep_ratio(base, s):.2f}x" if base else ""
                ratios.append(f" {r:>14} |")
            if any(c.strip(" |") for c in cells):
                print(f"| {labels[key]:<42} |" + "".join(cells) + "".join(ratios))
    print()
    print("Targets (throughput ratios, medians of per-repeat ratios; > 1x means aioshm is faster):")
    ran = False
    for shape in shapes:
        for kind in kinds:
            for ours in ("aioshm", "aioshm_many", "aioshm_async", "aioshm_async_many"):
                s = samples.get((ours, kind, shape))
                if not s:
                    continue
                # one-item rows of small tuples: reported, no target (see the docstring)
                graded = kind == "array" or ours in BATCHED
                base = samples.get(("stdlib", kind, shape))
                goal = 1.5 if kind == "tuple" else 10.0
                if base:
                    ran = True
                    r = per_rep_ratio(base, s)
                    mark = verdict(r >= goal) if graded else "(no target)"
                    aim = f"target >= {goal}x" if graded else "one item per call"
                    print(f"  {mark}  {shape} {kind}: {labels[ours]} vs stdlib: {r:.2f}x ({aim})")
                ff = samples.get(("ff_many" if ours in BATCHED else "ff", kind, shape))
                if kind == "tuple" and ff:
                    ran = True
                    r = per_rep_ratio(ff, s)
                    peer = "faster-fifo put_many/get_many" if ours in BATCHED else "faster-fifo"
                    mark = verdict(r > 1.0) if graded else "(no target)"
                    aim = "target > 1x" if graded else "one item per call"
                    print(f"  {mark}  {shape} {kind}: {labels[ours]} vs {peer}: {r:.2f}x ({aim})")
    if not ran:
        print("  (not enough rows ran to check the targets)")


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2x2 only, fewer items, 1 repeat")
    ap.add_argument("--reps", type=int, default=None, help="repeats (default 3; --quick: 1)")
    ap.add_argument("--shapes", nargs="+", default=None, help="PxC shapes (default 2x2 4x4)")
    ap.add_argument("--payloads", nargs="+", choices=["tuple", "array"], default=["tuple", "array"])
    ap.add_argument("--only", nargs="+", choices=[k for k, _ in ROWS], default=None)
    args = ap.parse_args()
    reps = args.reps if args.reps is not None else (1 if args.quick else 3)
    shapes = args.shapes or (["2x2"] if args.quick else ["2x2", "4x4"])
    items = QUICK_ITEMS if args.quick else ITEMS
    keys = args.only or [k for k, _ in ROWS]
    try:
        import faster_fifo  # noqa: F401
    except ImportError:
        print("  faster-fifo is not installed (pip install faster-fifo): its rows are skipped")
        keys = [k for k in keys if not k.startswith("ff")]
    print(f"P9 MPMC: rows {' '.join(keys)}; load average {os.getloadavg()[0]:.1f}", flush=True)
    samples: dict[tuple[str, str, str], list[float]] = {}
    errors: dict[tuple[str, str, str], str] = {}
    for shape in shapes:
        nprod, ncons = (int(x) for x in shape.split("x"))
        for kind in args.payloads:
            for key in keys:
                samples[(key, kind, shape)] = []
            for rep in range(reps):
                shift = rep % len(keys)
                for key in keys[shift:] + keys[:shift]:
                    cell = (key, kind, shape)
                    if cell in errors:
                        continue
                    try:
                        samples[cell].append(one_run(key, kind, nprod, ncons, items[kind]))
                    except Exception as exc:
                        errors[cell] = f"{type(exc).__name__}: {exc}"
                print(f"  {shape} {kind}: repeat {rep + 1}/{reps} done", flush=True)
    for cell, err in errors.items():
        print(f"  {' '.join(cell)}: FAILED: {err}")
    report(samples, shapes, args.payloads, items, reps)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    left = list(stdmp.active_children())
    for p in left:
        p.kill()
        p.join()
    if left:
        print(f"  killed {len(left)} leftover children")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
    sys.exit(0)

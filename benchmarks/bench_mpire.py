"""P4 with mpire: W3's 5,000 tiny tasks (``inc(x) = x + 1``) on 2 warm workers, with mpire.

A companion of ``bench_pool.py`` (W3), self-contained so the two can change independently: it
runs aioshm's two main rows, the stdlib's two and mpire's two (a popular fast pool) in one run,
the same way as ``bench_pool.py``: every pool started (forkserver) and warmed before the first
timed repeat, repeats interleaved with a rotating row order, ratios the medians of per-repeat
ratios, a run under 20 ms timed as the median of 5 back-to-back runs.

Rows:

* ``aioshm_apply``: ``asyncio.gather(*(pool.apply_async(inc, (i,)) for i in xs))`` on
  ``aioshm.Pool(2)``;
* ``aioshm_map``: ``await pool.map_async(inc, xs)`` (automatic chunksize);
* ``mp_map1`` / ``mp_map``: stdlib ``Pool(2).map(inc, xs, chunksize=1)`` / automatic chunksize;
* ``mpire_map1`` / ``mpire_map``: ``mpire.WorkerPool(2, start_method="forkserver",
  keep_alive=True).map(inc, xs, chunk_size=1)`` / automatic chunk size (mpire's ``map`` blocks,
  like the stdlib's, and is called in the coroutine).

Targets (throughput): aioshm per-task awaits (``aioshm_apply``) >= 1.0x mpire's
``map(chunk_size=1)``; aioshm ``map_async`` (auto) >= 0.5x mpire's ``map`` (auto), as W3 asks
of the stdlib's.

Usage::

    .venv/bin/python benchmarks/bench_mpire.py             # 5,000 tasks x 7 repeats (~40 s)
    .venv/bin/python benchmarks/bench_mpire.py --quick     # 5,000 tasks x 3 repeats
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as stdmp
import os
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import _bench_targets as targets
from _bench_report import per_rep_ratio, verdict

import aioshm

START_METHOD = "forkserver"
WORKERS = 2
SHORT_RUN = 0.020
INNER = 5

ROWS: list[tuple[str, str]] = [
    ("aioshm_apply", "aioshm apply_async per task, gathered"),
    ("aioshm_map", "aioshm map_async, auto chunksize"),
    ("mp_map1", "stdlib Pool.map, chunksize=1"),
    ("mp_map", "stdlib Pool.map, auto chunksize"),
    ("mpire_map1", "mpire WorkerPool.map, chunk_size=1"),
    ("mpire_map", "mpire WorkerPool.map, auto chunk size"),
]

Run = Callable[[list[int]], Awaitable[list[int]]]


@contextlib.asynccontextmanager
async def aioshm_pool(per_task: bool) -> AsyncIterator[Run]:
    pool = aioshm.Pool(WORKERS, context=START_METHOD)
    inc = targets.inc
    try:
        if per_task:

            async def run(xs: list[int]) -> list[int]:
                return list(await asyncio.gather(*(pool.apply_async(inc, (x,)) for x in xs)))

        else:

            async def run(xs: list[int]) -> list[int]:
                return await pool.map_async(inc, xs)  # type: ignore[no-any-return]

        yield run
    finally:
        await pool.terminate_async()


@contextlib.asynccontextmanager
async def stdlib_pool(chunksize: int | None) -> AsyncIterator[Run]:
    pool = stdmp.get_context(START_METHOD).Pool(WORKERS)
    inc = targets.inc
    try:

        async def run(xs: list[int]) -> list[int]:
            return pool.map(inc, xs, chunksize)

        yield run
    finally:
        pool.terminate()
        pool.join()


@contextlib.asynccontextmanager
async def mpire_pool(chunk_size: int | None) -> AsyncIterator[Run]:
    from mpire import WorkerPool

    pool = WorkerPool(n_jobs=WORKERS, start_method=START_METHOD, keep_alive=True)
    inc = targets.inc
    try:

        async def run(xs: list[int]) -> list[int]:
            return pool.map(inc, xs, chunk_size=chunk_size)  # type: ignore[no-any-return]

        yield run
    finally:
        pool.terminate()


FACTORIES: dict[str, Callable[[], contextlib.AbstractAsyncContextManager[Run]]] = {
    "aioshm_apply": lambda: aioshm_pool(True),
    "aioshm_map": lambda: aioshm_pool(False),
    "mp_map1": lambda: stdlib_pool(1),
    "mp_map": lambda: stdlib_pool(None),
    "mpire_map1": lambda: mpire_pool(1),
    "mpire_map": lambda: mpire_pool(None),
}


async def _timed(run: Run, xs: list[int], expect: list[int]) -> float:
    t0 = time.perf_counter()
    got = await run(xs)
    wall = time.perf_counter() - t0
    if got != expect:
        raise AssertionError(f"wrong results (first items {got[:3]!r})")
    return wall


async def measure(keys: list[str], n: int, reps: int) -> dict[str, list[float]]:
    xs = list(range(n))
    expect = [x + 1 for x in xs]
    samples: dict[str, list[float]] = {k: [] for k in keys}
    async with contextlib.AsyncExitStack() as stack:
        runs: dict[str, Run] = {}
        inner: dict[str, int] = {}
        for key in keys:
            try:
                run = await stack.enter_async_context(FACTORIES[key]())
                await _timed(run, xs[:200], expect[:200])
                inner[key] = INNER if await _timed(run, xs, expect) < SHORT_RUN else 1
                runs[key] = run
            except Exception as exc:
                print(f"  {key}: FAILED to start: {type(exc).__name__}: {exc}", flush=True)
        order = list(runs)
        for rep in range(reps):
            shift = rep % max(1, len(order))
            for key in order[shift:] + order[:shift]:
                got = [await _timed(runs[key], xs, expect) for _ in range(inner[key])]
                samples[key].append(statistics.median(got))
            print(f"  repeat {rep + 1}/{reps} done", flush=True)
    return samples


def report(samples: dict[str, list[float]], n: int, reps: int) -> None:
    print()
    print(f"P4 with mpire: {n:,} x inc(x) on {WORKERS} warm workers, {reps} repeats, medians")
    head = (
        f"| {'implementation':<40} | {'tasks/s':>10} | {'µs / task':>9} | {'vs stdlib map1':>14} |"
    )
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    base = samples.get("mp_map1") or []
    for key, label in ROWS:
        s = samples.get(key)
        if not s:
            continue
        med = statistics.median(s)
        r = f"{per_rep_ratio(base, s):.2f}x" if base else ""
        print(f"| {label:<40} | {n / med:>10,.0f} | {med / n * 1e6:>9.1f} | {r:>14} |")
    print()
    print("Targets (throughput ratios; > 1x means aioshm is faster):")
    checks = [
        (
            "aioshm apply_async gathered vs mpire map(chunk_size=1)",
            "aioshm_apply",
            "mpire_map1",
            1.0,
        ),
        ("aioshm map_async (auto) vs mpire map (auto)", "aioshm_map", "mpire_map", 0.5),
    ]
    for name, ours, theirs, goal in checks:
        if samples.get(ours) and samples.get(theirs):
            v = per_rep_ratio(samples[theirs], samples[ours])
            print(f"  {verdict(v >= goal)}  {name}: {v:.2f}x (target >= {goal}x)")
    others = [
        ("mpire map(chunk_size=1) vs stdlib Pool.map(chunksize=1)", "mpire_map1", "mp_map1"),
        ("mpire map (auto) vs stdlib Pool.map (auto)", "mpire_map", "mp_map"),
        ("aioshm apply_async gathered vs stdlib Pool.map(chunksize=1)", "aioshm_apply", "mp_map1"),
    ]
    for name, a, b in others:
        if samples.get(a) and samples.get(b):
            print(f"  (no target) {name}: {per_rep_ratio(samples[b], samples[a]):.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 repeats")
    ap.add_argument("--n", type=int, default=5000, help="tasks per run")
    ap.add_argument("--only", nargs="+", choices=[k for k, _ in ROWS], default=None)
    args = ap.parse_args()
    keys = args.only or [k for k, _ in ROWS]
    try:
        import mpire  # noqa: F401
    except ImportError:
        print("  mpire is not installed (pip install mpire): its rows are skipped")
        keys = [k for k in keys if not k.startswith("mpire")]
    reps = 3 if args.quick else 7
    print(f"load average at the start: {os.getloadavg()[0]:.1f}", flush=True)
    try:
        samples = asyncio.run(measure(keys, args.n, reps))
        report(samples, args.n, reps)
    finally:
        left = list(stdmp.active_children())
        for p in left:
            p.kill()
            p.join()
        if left:
            print(f"  killed {len(left)} leftover children")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

"""``aioshm bench``: a quick benchmark suite, aioshm against the stdlib in the same run.

Three comparisons, each timed in this one process against already-running children (process
start-up is outside the timed region, except in the start-up rows), median of the repeats:

* transfer: one float32 array to a child and a float back (the child reads one value per
  4 KiB page), through an aioshm Queue (an array already in shared memory, and a private one,
  copied once into a recycled segment) and through a stdlib ``multiprocessing.Queue``
  (pickled);
* pool: ``Pool.map`` of a norm over a list of arrays, ``aioshm.Pool`` against the stdlib
  ``multiprocessing.Pool``;
* start-up: start two processes that return at once and collect their results,
  ``aioshm.spawn`` against two stdlib ``Process`` objects (both start from a fork server).

In the stdlib rows aioshm's ndarray reducer is switched off (importing aioshm registers it with
``ForkingPickler``, so a stdlib queue would otherwise ship arrays as handles too). The ratio
column is stdlib time / aioshm time: above 1 means aioshm is faster. These are figures of one
machine at one moment: compare only ratios from one run. ``benchmarks/`` in the source tree
has the long-form benchmarks against more peers.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ("Section", "add_arguments", "run", "stdlib_pickling")

MiB = 1 << 20
_TIMEOUT = 120.0  # seconds to wait for any single reply


@contextlib.contextmanager
def stdlib_pickling() -> Iterator[None]:
    """Switch aioshm's ndarray reducer off in this process while the block runs, so that stdlib
    channels pickle arrays as they do without aioshm."""
    from multiprocessing.reduction import ForkingPickler

    reducers: dict[type, Any] = ForkingPickler._extra_reducers  # type: ignore[attr-defined]
    saved = reducers.pop(np.ndarray, None)
    try:
        yield
    finally:
        if saved is not None:
            reducers[np.ndarray] = saved


def no_aioshm_reducer() -> None:
    """In a stdlib child: pickle arrays the stdlib way for good (the fork server preloads
    aioshm, which registers its reducer)."""
    from multiprocessing.reduction import ForkingPickler

    ForkingPickler._extra_reducers.pop(np.ndarray, None)  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- children


def touch(a: np.ndarray) -> float:
    """Read one float32 per 4 KiB page: the child has really seen the array."""
    return float(a.reshape(-1)[::1024].sum())


def _touch_loop(inq: Any, outq: Any, stdlib: bool) -> None:
    """A child: reply to each array with :func:`touch` of it, until None."""
    if stdlib:
        no_aioshm_reducer()
    while (a := inq.get()) is not None:
        outq.put(touch(a))  # keeps ``a`` until the next one: its mapping stays


def _norm(a: np.ndarray) -> float:
    return float(np.linalg.norm(a))


def _stdlib_pool_init() -> None:
    no_aioshm_reducer()


def _nothing(*args: object) -> int:
    return 0


# --------------------------------------------------------------------------- results


@dataclass
class Row:
    """One comparison: the median seconds of aioshm and of the stdlib doing the same."""

    case: str
    aioshm: float
    stdlib: float

    @property
    def ratio(self) -> float:
        return self.stdlib / self.aioshm if self.aioshm > 0 else float("inf")


@dataclass
class Section:
    """A table: a title, what its rows vary, and the rows."""

    title: str
    case_label: str
    rows: list[Row] = field(default_factory=list)


def _fmt_seconds(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def print_section(section: Section) -> None:
    print(f"\n{section.title}")
    head = f"  {section.case_label:<28s} {'aioshm':>10s} {'stdlib':>10s} {'stdlib/aioshm':>14s}"
    print(head)
    print("  " + "-" * (len(head) - 2))
    for row in section.rows:
        print(
            f"  {row.case:<28s} {_fmt_seconds(row.aioshm):>10s} {_fmt_seconds(row.stdlib):>10s}"
            f" {row.ratio:>13.1f}x"
        )


def _median_time(fn: Callable[[], object], warmups: int, repeats: int) -> float:
    for _ in range(warmups):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --------------------------------------------------------------------------- the benchmarks


def _round_trips(ctx: Any, queues: tuple[Any, Any], stdlib: bool, arrays: list[Any]) -> list[float]:
    """Median round trip of each array of ``arrays`` through ``queues`` to one child."""
    inq, outq = queues
    child = ctx.Process(target=_touch_loop, args=(inq, outq, stdlib), daemon=True)
    child.start()
    try:
        results = []
        for a, warmups, repeats in arrays:
            expected = touch(a)

            def once(a: np.ndarray = a, expected: float = expected) -> None:
                inq.put(a)
                if outq.get(timeout=_TIMEOUT) != expected:
                    raise AssertionError("the child saw different data")

            results.append(_median_time(once, warmups, repeats))
        inq.put(None)
        child.join(_TIMEOUT)
    finally:
        if child.is_alive():
            child.kill()
        child.join()
        child.close()
        for q in (inq, outq):
            q.close()
            q.join_thread()
    return results


def bench_transfer(sizes_mib: list[int], quick: bool) -> Section:
    import aioshm
    import aioshm.multiprocessing as amp

    section = Section("transfer: an array to a running child and a float back", "array size")
    plan = []
    for mib in sizes_mib:
        a = np.random.default_rng(mib).standard_normal(mib * MiB // 4, dtype=np.float32)
        small = mib <= 4
        warmups, repeats = (2, 5) if quick else ((5, 30) if small else (3, 10))
        plan.append((mib, a, warmups, repeats))

    actx = amp.get_context("forkserver")
    shared = [(aioshm.share(a), w, r) for _, a, w, r in plan]
    aio_shared = _round_trips(actx, (actx.Queue(), actx.Queue()), False, shared)
    del shared
    private = [(a, w, r) for _, a, w, r in plan]
    aio_private = _round_trips(actx, (actx.Queue(), actx.Queue()), False, private)
    sctx = multiprocessing.get_context("forkserver")
    with stdlib_pickling():
        std = _round_trips(sctx, (sctx.Queue(), sctx.Queue()), True, private)
    aioshm.trim_pool()
    for (mib, *_), s, p, q in zip(plan, aio_shared, aio_private, std, strict=True):
        section.rows.append(Row(f"{mib} MiB, shared array", s, q))
        section.rows.append(Row(f"{mib} MiB, private array", p, q))
    return section


def _map_time(pool: Any, arrays: list[np.ndarray], expected: list[float], repeats: int) -> float:
    """Median seconds of ``pool.map(_norm, arrays)`` (after one warm-up), checked."""

    def once() -> None:
        if pool.map(_norm, arrays) != expected:
            raise AssertionError(f"{type(pool).__module__}.Pool: wrong results")

    return _median_time(once, 1, repeats)


def bench_pool(quick: bool) -> Section:
    import aioshm

    section = Section("pool: map a norm over arrays, two workers", "arrays")
    cases = [(8, 4)] if quick else [(16, 4), (16, 16)]
    repeats = 3 if quick else 5
    for count, mib in cases:
        arrays = [np.random.default_rng(i).standard_normal(mib * MiB // 8) for i in range(count)]
        expected = [_norm(a) for a in arrays]
        shared = [aioshm.share(a) for a in arrays]
        with aioshm.Pool(2) as pool:
            a_private = _map_time(pool, arrays, expected, repeats)
            a_shared = _map_time(pool, shared, expected, repeats)
        del shared
        with stdlib_pickling():
            sctx = multiprocessing.get_context("forkserver")
            with sctx.Pool(2, initializer=_stdlib_pool_init) as spool:
                s_time = _map_time(spool, arrays, expected, repeats)
        aioshm.trim_pool()
        section.rows.append(Row(f"{count} x {mib} MiB, shared", a_shared, s_time))
        section.rows.append(Row(f"{count} x {mib} MiB, private", a_private, s_time))
    return section


def bench_startup(quick: bool) -> Section:
    import anyio

    import aioshm

    section = Section("start-up: start two processes and collect their results", "")
    repeats = 3 if quick else 10

    def aio() -> None:
        async def go() -> None:
            if await aioshm.spawn(_nothing, nprocs=2) != [0, 0]:
                raise AssertionError("aioshm.spawn: wrong results")

        anyio.run(go)

    sctx = multiprocessing.get_context("forkserver")

    def std() -> None:
        procs = [sctx.Process(target=_nothing, args=(rank,)) for rank in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(_TIMEOUT)
            if p.exitcode != 0:
                raise AssertionError(f"stdlib Process exited {p.exitcode}")
            p.close()

    section.rows.append(
        Row("2 processes", _median_time(aio, 1, repeats), _median_time(std, 1, repeats))
    )
    return section


# --------------------------------------------------------------------------- plot and CLI


def _check_matplotlib() -> None:
    if sys.modules.get("matplotlib") is None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SystemExit(
                "aioshm bench --plot needs matplotlib: pip install 'aioshm[plot]'"
            ) from None


def plot(sections: list[Section], path: str) -> None:
    """Draw one bar chart per section (aioshm against the stdlib, log scale) into ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(sections), figsize=(5 * len(sections), 4.5), squeeze=False, layout="constrained"
    )
    for ax, section in zip(axes[0], sections, strict=True):
        x = np.arange(len(section.rows))
        aio = [r.aioshm * 1e3 for r in section.rows]
        std = [r.stdlib * 1e3 for r in section.rows]
        ax.bar(x - 0.2, aio, 0.4, label="aioshm", color="tab:blue")
        ax.bar(x + 0.2, std, 0.4, label="stdlib", color="tab:gray")
        for i, row in enumerate(section.rows):
            ax.annotate(
                f"{row.ratio:.1f}x",
                (x[i], max(aio[i], std[i])),
                ha="center",
                va="bottom",
                fontsize=9,
            )
        ax.set_xticks(x, [r.case for r in section.rows], rotation=20, ha="right", fontsize=8)
        low, high = min(aio + std), max(aio + std)
        if high > 20 * low:  # a wide range: log scale, from the decade below the lowest bar
            ax.set_yscale("log")
            ax.set_ylim(10 ** math.floor(math.log10(low)), high * 4)
            ax.set_ylabel("median time, ms (log scale; lower is better)")
        else:
            ax.set_ylim(0, high * 1.25)
            ax.set_ylabel("median time, ms (lower is better)")
        ax.set_title(section.title.split(":")[0], fontsize=11)
        ax.legend(fontsize=8)
    fig.suptitle("aioshm vs stdlib multiprocessing (ratio = stdlib / aioshm)", fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick", action="store_true", help="fewer sizes and repeats (a few seconds)"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=["transfer", "pool", "startup"],
        help="run only these comparisons",
    )
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        help="also draw the comparison charts into FILE.png (needs the 'plot' extra)",
    )


def run(args: argparse.Namespace) -> int:
    if args.plot:
        _check_matplotlib()
    from . import _procutil

    _procutil.ensure_forkserver()  # one warm fork server for every row, outside the timing
    only = set(args.only or ("transfer", "pool", "startup"))
    sizes = [1, 16] if args.quick else [1, 16, 64]
    print(
        f"aioshm bench{' --quick' if args.quick else ''}: median times, stdlib/aioshm > 1 means "
        "aioshm is faster"
    )
    sections: list[Section] = []
    for name in ("transfer", "pool", "startup"):
        if name not in only:
            continue
        if name == "transfer":
            sections.append(bench_transfer(sizes, args.quick))
        elif name == "pool":
            sections.append(bench_pool(args.quick))
        else:
            sections.append(bench_startup(args.quick))
        print_section(sections[-1])
    if args.plot:
        plot(sections, args.plot)
        print(f"\nplot: {args.plot}")
    return 0

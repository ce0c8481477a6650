"""Stress the cancel-kill path: run ``test_cancellable_task_kills_its_worker`` many times per loop.

CI once failed ``tests/test_pool.py::test_cancellable_task_kills_its_worker[asyncio+uvloop-
move_on_after]``: after the cancelled task's worker was killed and replaced, the next
``await pool.apply_async(targets.getpid)`` stayed parked until the test's deadline. This runs
that test's body (and its regression test's) ``--runs`` times on each event loop and each way
of cancelling, in this one process, and prints how many runs passed and failed.

Usage::

    .venv/bin/python benchmarks/stress_cancel_kill.py                # 300 runs per loop
    .venv/bin/python benchmarks/stress_cancel_kill.py --runs 50 --loops uvloop
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import anyio
import test_pool

LOOPS = {
    "asyncio": ("asyncio", {}),
    "uvloop": ("asyncio", {"use_uvloop": True}),
    "trio": ("trio", {}),
}
HOWS = ("move_on_after", "fail_after", "cancel_scope")


def run_once(loop: str, how: str, tmp: Path, n: int) -> str | None:
    """One run of the test; None if it passed, else the failure's last traceback line."""
    made: list[test_pool.Fifo] = []

    def fifos() -> Any:
        fifo = test_pool.Fifo(tmp / f"fifo-{loop}-{how}-{n}-{len(made)}")
        made.append(fifo)
        return fifo

    backend, options = LOOPS[loop]
    try:
        anyio.run(
            test_pool.test_cancellable_task_kills_its_worker,
            how,
            fifos,
            backend=backend,
            backend_options=options,
        )
    except BaseException as exc:
        last = traceback.format_exception(exc)[-1].strip()
        return f"{type(exc).__name__}: {last}"
    finally:
        for fifo in made:
            fifo.close()
            Path(fifo.path).unlink()
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=300, help="runs per loop (split over hows)")
    parser.add_argument("--loops", nargs="+", choices=list(LOOPS), default=list(LOOPS))
    args = parser.parse_args()
    failures: dict[str, collections.Counter[str]] = {}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for loop in args.loops:
            counts: collections.Counter[str] = collections.Counter()
            t0 = time.monotonic()
            passed = 0
            for n in range(args.runs):
                how = HOWS[n % len(HOWS)]
                error = run_once(loop, how, tmp, n)
                if error is None:
                    passed += 1
                else:
                    counts[f"{how}: {error}"] += 1
            failures[loop] = counts
            took = time.monotonic() - t0
            print(
                f"{loop:8s} {passed}/{args.runs} passed, {args.runs - passed} failed "
                f"({took:.0f} s)",
                flush=True,
            )
            for what, count in counts.most_common():
                print(f"    {count:4d} x {what}", flush=True)
    sys.exit(1 if any(failures.values()) else 0)


if __name__ == "__main__":
    main()

"""W5: process start, request to result, for a target whose module imports numpy.

The timed region starts just before the processes are asked for and ends once the parent holds
every rank's result and every child was reaped. The target ``f`` lives in
``benchmarks/_bench_targets.py``, which imports numpy, and this script's ``__main__`` imports
numpy too (BASELINE's "``__main__`` imports numpy" rows).

Every implementation runs in fresh interpreters started by this script (``--worker IMPL``), so
that no row inherits another row's fork server or imports; aioshm is only imported by its own
rows, so the stdlib rows run with the stdlib's default fork-server preload (``__main__`` only).
In each fresh interpreter the first call is *cold* (it includes starting the fork server, if
any); the calls after it are *warm*. Cold is the median over the fresh interpreters, warm the
median over every warm call.

Rows:

* ``aioshm.spawn``: ``await aioshm.spawn(f, nprocs=n)`` (forkserver, the async face's default:
  numpy and aioshm preloaded in the server);
* ``stdlib Process (forkserver)`` / ``(spawn)``: start ``n`` stdlib processes whose target
  puts ``(rank, f(rank))`` on a ``SimpleQueue``, get ``n`` results, join them;
* ``torch.mp.start_processes`` (spawn / forkserver): the same through
  ``torch.multiprocessing.start_processes(..., join=True)``; skipped if torch is not
  importable.

Targets (nprocs = 2, warm): aioshm <= 30 ms, and >= 4x faster than stdlib forkserver.
Printed with PASS/FAIL; the exit status is 0 whatever the timings.

Usage::

    .venv/bin/python benchmarks/bench_spawn.py            # 3 fresh interpreters x 10 warm calls
    .venv/bin/python benchmarks/bench_spawn.py --quick    # 1 fresh interpreter x 5 warm calls
    .venv/bin/python benchmarks/bench_spawn.py --only aioshm stdlib_forkserver --nprocs 2
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

import _bench_targets as targets
import numpy as np  # noqa: F401  (W5 measures a __main__ that imports numpy)

#: key -> (label, is torch)
IMPLS: dict[str, tuple[str, bool]] = {
    "aioshm": ("await aioshm.spawn(f) (forkserver)", False),
    "stdlib_forkserver": ("stdlib Process (forkserver) + SimpleQueue", False),
    "stdlib_spawn": ("stdlib Process (spawn) + SimpleQueue", False),
    "torch_forkserver": ("torch.mp.start_processes (forkserver)", True),
    "torch_spawn": ("torch.mp.start_processes (spawn)", True),
}

WORKER_TIMEOUT = 600.0


# --------------------------------------------------------------------------- worker side


def _expected(nprocs: int) -> list[float]:
    return [targets.f(r) for r in range(nprocs)]


def _run_aioshm(nprocs: int, calls: int) -> list[float]:
    import asyncio

    import aioshm

    async def main() -> list[float]:
        out = []
        for _ in range(calls):
            t0 = time.perf_counter()
            res = await aioshm.spawn(targets.f, nprocs=nprocs)
            out.append((time.perf_counter() - t0) * 1e3)
            assert res == _expected(nprocs), res
        return out

    return asyncio.run(main())


def _run_stdlib(method: str, nprocs: int, calls: int) -> list[float]:
    import multiprocessing as mp

    ctx = mp.get_context(method)
    out = []
    for _ in range(calls):
        procs: list[Any] = []
        t0 = time.perf_counter()
        q = ctx.SimpleQueue()
        try:
            procs = [ctx.Process(target=targets.stdlib_worker, args=(r, q)) for r in range(nprocs)]
            for p in procs:
                p.start()
            got = dict(q.get() for _ in range(nprocs))
            for p in procs:
                p.join()
            out.append((time.perf_counter() - t0) * 1e3)
        finally:
            for p in procs:
                if p.pid is not None and p.is_alive():
                    p.kill()
                    p.join(5)
            q.close()
        assert [got[r] for r in range(nprocs)] == _expected(nprocs), got
    return out


def _run_torch(method: str, nprocs: int, calls: int) -> list[float]:
    import torch.multiprocessing as tmp

    ctx = tmp.get_context(method)
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        q = ctx.SimpleQueue()
        try:
            tmp.start_processes(
                targets.torch_worker, args=(q,), nprocs=nprocs, join=True, start_method=method
            )
            got = dict(q.get() for _ in range(nprocs))
            out.append((time.perf_counter() - t0) * 1e3)
        finally:
            q.close()
        assert [got[r] for r in range(nprocs)] == _expected(nprocs), got
    return out


def worker(impl: str, nprocs: int, calls: int) -> None:
    """Run ``calls`` calls in this fresh interpreter; print the ms of each as JSON."""
    if impl == "aioshm":
        ms = _run_aioshm(nprocs, calls)
    elif impl.startswith("stdlib_"):
        ms = _run_stdlib(impl.split("_", 1)[1], nprocs, calls)
    elif impl.startswith("torch_"):
        ms = _run_torch(impl.split("_", 1)[1], nprocs, calls)
    else:
        raise SystemExit(f"unknown impl {impl!r}")
    print(json.dumps({"ms": ms}), flush=True)


# --------------------------------------------------------------------------- driver side


def run_worker(impl: str, nprocs: int, calls: int) -> list[float] | str:
    """One fresh interpreter: its per-call ms, or an error string."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl]
    cmd += ["--nprocs", str(nprocs), "--calls", str(calls)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=WORKER_TIMEOUT)
    except subprocess.TimeoutExpired:
        return f"timed out after {WORKER_TIMEOUT:.0f} s"
    finally:
        if proc.returncode is None:
            # The worker (not reaped yet, so its group id is still ours) runs in its own
            # session: stop it and every process it started. A worker that exited normally
            # needs nothing: its fork server and resource tracker exit when it does.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.returncode != 0:
        tail = (err or "").strip().splitlines()[-3:]
        return f"exit {proc.returncode}: {' | '.join(tail)}"
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            return list(json.loads(line)["ms"])
    return "no result printed"


def fmt(x: float) -> str:
    if math.isnan(x):
        return "-"
    return f"{x:,.1f}" if x < 100 else f"{x:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 interpreter x 5 warm calls")
    parser.add_argument("--only", nargs="+", choices=list(IMPLS), default=None)
    parser.add_argument("--nprocs", nargs="+", type=int, default=None)
    parser.add_argument("--interpreters", type=int, default=None)
    parser.add_argument("--warm", type=int, default=None, help="warm calls per interpreter")
    parser.add_argument("--worker", choices=list(IMPLS), help=argparse.SUPPRESS)
    parser.add_argument("--calls", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, (args.nprocs or [2])[0], args.calls)
        return

    has_torch = importlib.util.find_spec("torch") is not None
    interpreters = args.interpreters or (1 if args.quick else 3)
    warm = args.warm if args.warm is not None else (5 if args.quick else 10)
    nprocs_list = args.nprocs or ([2] if args.quick else [1, 2])
    keys = [k for k in IMPLS if args.only is None or k in args.only]
    print(
        f"python {sys.version.split()[0]}, nproc {os.cpu_count()}, "
        f"loadavg {os.getloadavg()[0]:.2f}, torch {'found' if has_torch else 'not installed'}",
        flush=True,
    )

    # (key, nprocs) -> (cold samples, warm samples, error)
    results: dict[tuple[str, int], tuple[list[float], list[float], str]] = {}
    for nprocs in nprocs_list:
        for rnd in range(interpreters):
            # interleave: one fresh interpreter per row per round, rows in a rotating order
            order = keys[rnd % len(keys) :] + keys[: rnd % len(keys)]
            for key in order:
                label, is_torch = IMPLS[key]
                if is_torch and not has_torch:
                    continue
                # torch takes ~1 s per start: fewer calls (still one cold + warm ones)
                calls = 1 + (min(warm, 3) if is_torch else warm)
                if is_torch and nprocs != max(nprocs_list):
                    continue
                cold, hot, err = results.get((key, nprocs), ([], [], ""))
                got = run_worker(key, nprocs, calls)
                if isinstance(got, str):
                    err = got
                    print(f"  {key} nprocs={nprocs}: FAILED: {got}", flush=True)
                else:
                    cold.append(got[0])
                    hot.extend(got[1:])
                results[(key, nprocs)] = (cold, hot, err)
            print(f"  nprocs={nprocs}: round {rnd + 1}/{interpreters} done", flush=True)

    print()
    print(
        f"W5 process start, request -> result (ms, medians; cold = 1st call in a fresh "
        f"interpreter, {interpreters} interpreter(s); warm = later calls, {warm} per interpreter"
        f", 3 for torch)"
    )
    print()
    head = f"| {'implementation':<44} | {'nprocs':>6} | {'warm ms':>8} | {'cold ms':>8} "
    head += f"| {'warm min-max':>14} | {'n warm':>6} |"
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    med: dict[tuple[str, int], float] = {}
    for nprocs in nprocs_list:
        for key in keys:
            if (key, nprocs) not in results:
                continue
            cold, hot, err = results[(key, nprocs)]
            label = IMPLS[key][0]
            if not hot:
                print(f"| {label:<44} | {nprocs:>6} | {'failed':>8} | {'':>8} | {err[:14]:>14} |")
                continue
            w = statistics.median(hot)
            c = statistics.median(cold) if cold else float("nan")
            med[(key, nprocs)] = w
            spread = f"{min(hot):.1f}-{max(hot):.1f}"
            print(
                f"| {label:<44} | {nprocs:>6} | {fmt(w):>8} | {fmt(c):>8} | {spread:>14} "
                f"| {len(hot):>6} |"
            )
    if not has_torch:
        print("(torch not installed: torch rows skipped)")

    print()
    print("Targets (nprocs = 2, warm):")
    a = med.get(("aioshm", 2))
    s = med.get(("stdlib_forkserver", 2))
    if a is not None:
        print(f"  {'PASS' if a <= 30 else 'FAIL'}  aioshm.spawn warm: {a:.1f} ms (target <= 30 ms)")
    if a is not None and s is not None:
        ratio = s / a
        print(
            f"  {'PASS' if ratio >= 4 else 'FAIL'}  stdlib forkserver / aioshm: {ratio:.2f}x "
            f"(target >= 4x; {s:.1f} ms vs {a:.1f} ms)"
        )
    if a is None:
        print("  (aioshm did not run at nprocs = 2)")


if __name__ == "__main__":
    main()

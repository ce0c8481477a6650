"""P7: peak memory (USS and PSS) of the parent and of the child for one big array sent and touched.

Every row runs in a fresh interpreter (``--row KEY``, a mode of this script), so no row's
baseline holds another row's leftovers. In it, the parent starts one child (forkserver), waits
until the child reports that it runs, takes the baselines, then:

1. makes a 512 MiB float32 array and writes every page of it;
2. sends it to the child, which touches every page (reads one value per 4 KiB page) and
   replies with the sum, still holding the array;
3. samples both processes once more, then tells the child to drop the array and exit.

A sampler thread reads ``psutil.Process.memory_full_info()`` (``/proc/PID/smaps_rollup``) of
both processes every 10 ms from before step 1 to the end, and keeps the peaks. Reported: peak
minus baseline, as a multiple of the array's size, for USS (pages only that process maps) and
PSS (each shared page divided among the processes that map it); "total PSS" is the sum of both
at step 3, while both hold the array (a steady point: a peak of sums could add a parent read
taken just before the child mapped the pages to a child read taken just after). Goals allow
0.02x of slack (page tables and allocator noise).

Rows:

* ``aioshm_shared``: ``aioshm.empty()`` (allocated in shared memory), sent on an
  ``aioshm.Queue``: only a handle and an fd travel;
* ``aioshm_value``: a private ``np.ones`` array on an ``aioshm.Queue``: copied into a shared
  segment on ``put``;
* ``stdlib_queue``: a private array on a stdlib ``multiprocessing.Queue`` (pickled; aioshm is
  not imported in that row's interpreter);
* ``shm_name``: a stdlib ``SharedMemory`` block, filled through an ndarray view; only its
  name goes over a stdlib Pipe and the child attaches by name;
* ``ray``: ``ray.put(a)`` and a Ray task that touches the array (zero-copy from the object
  store) and returns the sum; the "parent" figure also counts the raylet/plasma store processes.
  Skipped, with a note, unless Ray is importable and ``--ray`` is given; Ray opens sockets, so
  run it inside ``unshare -n`` (see the README).

Goal: parent peak <= +1x the array when it was allocated shared (``aioshm_shared``,
``shm_name``), <= +2x when it was copied in (``aioshm_value``); child <= +1x. Rows without a
goal of their own are printed against the copied-in goal for reference.

Usage::

    .venv/bin/python benchmarks/bench_memory.py              # 512 MiB, every row (~1 minute)
    .venv/bin/python benchmarks/bench_memory.py --quick      # 64 MiB
    .venv/bin/python benchmarks/bench_memory.py --only aioshm_shared shm_name --mib 256
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import psutil
from _bench_report import verdict

START_METHOD = "forkserver"
SAMPLE_EVERY = 0.010

#: (key, label, goal for the parent in units of the array, or None)
ROWS: list[tuple[str, str, float | None]] = [
    ("aioshm_shared", "aioshm Queue, already shared (aioshm.empty)", 1.0),
    ("aioshm_value", "aioshm Queue, not shared (copied in)", 2.0),
    ("stdlib_queue", "stdlib mp.Queue (pickle)", None),
    ("shm_name", "SharedMemory by name (stdlib)", 1.0),
    ("ray", "Ray object store (ray.put + task)", None),
]
CHILD_GOAL = 1.0
COPIED_GOAL = 2.0
#: measurement slack on every goal, in units of the array (page tables, allocator noise)
SLACK = 0.02


# --------------------------------------------------------------------------- children


def touch(a: Any) -> float:
    """Read one value per 4 KiB page of ``a``."""
    return float(np.asarray(a).reshape(-1)[::1024].sum())


def queue_child(inq: Any, outq: Any) -> None:
    outq.put("ready")
    a = inq.get()
    outq.put(touch(a))
    inq.get()  # hold the array until told to drop it
    del a


def shm_child(conn: Any) -> None:
    from multiprocessing import shared_memory

    conn.send("ready")
    name, n = conn.recv()
    shm = shared_memory.SharedMemory(name=name)
    a = np.ndarray((n,), np.float32, buffer=shm.buf)
    conn.send(touch(a))
    conn.recv()
    del a
    shm.close()


# --------------------------------------------------------------------------- sampling


class Sampler:
    """Peaks of USS and PSS of some processes, sampled by a thread every SAMPLE_EVERY s."""

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self.groups = groups
        self.peak: dict[str, dict[str, int]] = {g: {"uss": 0, "pss": 0} for g in groups}
        self.peak["total"] = {"uss": 0, "pss": 0}  # of the sums at one time
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> dict[str, dict[str, int]]:
        now: dict[str, dict[str, int]] = {}
        for g, pids in self.groups.items():
            uss = pss = 0
            for pid in pids():
                with contextlib.suppress(psutil.Error):
                    m = psutil.Process(pid).memory_full_info()
                    uss += m.uss
                    pss += m.pss
            now[g] = {"uss": uss, "pss": pss}
            peak = self.peak[g]
            peak["uss"] = max(peak["uss"], uss)
            peak["pss"] = max(peak["pss"], pss)
        total = self.peak["total"]
        for k in ("uss", "pss"):
            now.setdefault("total", {})[k] = s = sum(now[g][k] for g in self.groups)
            total[k] = max(total[k], s)
        return now

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY):
            self.sample()

    def __enter__(self) -> Sampler:  # noqa: PYI034
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def _baseline(sampler: Sampler) -> dict[str, dict[str, int]]:
    samples = [sampler.sample() for _ in range(3)]
    out: dict[str, dict[str, int]] = {}
    for g in [*sampler.groups, "total"]:
        out[g] = {k: min(s[g][k] for s in samples) for k in ("uss", "pss")}
    for peak in sampler.peak.values():
        peak["uss"] = peak["pss"] = 0
    return out


# --------------------------------------------------------------------------- one row


def run_row(key: str, nbytes: int) -> dict[str, Any]:
    n = nbytes // 4
    me = os.getpid()
    if key in ("aioshm_shared", "aioshm_value"):
        import aioshm
        import aioshm.multiprocessing as amp

        ctx = amp.get_context(START_METHOD)
        inq, outq = ctx.Queue(), ctx.Queue()
        p = ctx.Process(target=queue_child, args=(inq, outq), daemon=True)
        p.start()
        try:
            assert outq.get(timeout=60) == "ready"
            sampler = Sampler({"parent": lambda: [me], "child": lambda: [p.pid or 0]})
            base = _baseline(sampler)
            with sampler:
                if key == "aioshm_shared":
                    a = aioshm.empty(n, np.float32)
                    a[...] = 1.0
                else:
                    a = np.ones(n, np.float32)
                inq.put(a)
                got = outq.get(timeout=120)
                hold = sampler.sample()
                inq.put("drop")
                p.join(60)
            del a
        finally:
            if p.is_alive():
                p.kill()
            p.join()
            inq.close()
            outq.close()
    elif key == "stdlib_queue":
        import multiprocessing as mp

        ctx = mp.get_context(START_METHOD)
        inq, outq = ctx.Queue(), ctx.Queue()
        p = ctx.Process(target=queue_child, args=(inq, outq), daemon=True)
        p.start()
        try:
            assert outq.get(timeout=60) == "ready"
            sampler = Sampler({"parent": lambda: [me], "child": lambda: [p.pid or 0]})
            base = _baseline(sampler)
            with sampler:
                a = np.ones(n, np.float32)
                inq.put(a)
                got = outq.get(timeout=120)
                hold = sampler.sample()
                inq.put("drop")
                p.join(60)
            del a
        finally:
            if p.is_alive():
                p.kill()
            p.join()
            inq.close()
            outq.close()
            inq.join_thread()
            outq.join_thread()
    elif key == "shm_name":
        import multiprocessing as mp
        from multiprocessing import shared_memory

        ctx = mp.get_context(START_METHOD)
        parent_end, child_end = ctx.Pipe()
        p = ctx.Process(target=shm_child, args=(child_end,), daemon=True)
        p.start()
        shm = None
        try:
            assert parent_end.recv() == "ready"
            sampler = Sampler({"parent": lambda: [me], "child": lambda: [p.pid or 0]})
            base = _baseline(sampler)
            with sampler:
                shm = shared_memory.SharedMemory(create=True, size=nbytes)
                a = np.ndarray((n,), np.float32, buffer=shm.buf)
                a[...] = 1.0
                parent_end.send((shm.name, n))
                got = parent_end.recv()
                hold = sampler.sample()
                parent_end.send("drop")
                p.join(60)
            del a
        finally:
            if p.is_alive():
                p.kill()
            p.join()
            if shm is not None:
                shm.close()
                shm.unlink()
    elif key == "ray":
        return run_ray(n)
    else:
        raise ValueError(key)
    if got != float(n // 1024):
        raise AssertionError(f"child's sum {got} != {n // 1024}")
    return {"base": base, "peak": sampler.peak, "hold": hold}


def run_ray(n: int) -> dict[str, Any]:
    import ray

    ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:

        @ray.remote
        class Holder:
            def ready(self) -> int:
                return os.getpid()

            def hold(self, a: Any) -> float:
                self.a = a  # zero-copy view on the object store
                return touch(a)

        holder = Holder.remote()  # type: ignore[attr-defined]
        child_pid = ray.get(holder.ready.remote())
        me = os.getpid()
        own = {me, child_pid}

        def ray_side() -> list[int]:
            # the raylet (which hosts the plasma store) and Ray's other helpers, not the worker
            kids = psutil.Process(me).children(recursive=True)
            return [me] + [k.pid for k in kids if k.pid not in own]

        sampler = Sampler({"parent": ray_side, "child": lambda: [child_pid]})
        base = _baseline(sampler)
        with sampler:
            a = np.ones(n, np.float32)
            ref = ray.put(a)
            got = ray.get(holder.hold.remote(ref))
            hold = sampler.sample()
            del a, ref
        if got != float(n // 1024):
            raise AssertionError(f"child's sum {got} != {n // 1024}")
        return {"base": base, "peak": sampler.peak, "hold": hold}
    finally:
        ray.shutdown()


# --------------------------------------------------------------------------- driver


def _fresh(key: str, mib: int) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--row", key, "--mib", str(mib)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)  # type: ignore[no-any-return]
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {proc.returncode}: {tail}"}


def report(results: dict[str, dict[str, Any]], nbytes: int) -> None:
    mib = nbytes >> 20
    print()
    print(f"P7: one {mib} MiB float32 array sent to a child and touched; peak minus baseline,")
    print("in units of the array (1.00x = one more copy of it); fresh interpreter per row")
    head = (
        f"| {'row':<44} | {'parent USS':>10} | {'parent PSS':>10} | {'child USS':>9} "
        f"| {'child PSS':>9} | {'total PSS':>9} |"
    )
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for key, label, _ in ROWS:
        r = results.get(key)
        if r is None:
            continue
        if "error" in r or "skipped" in r:
            print(f"| {label:<44} | {r.get('error') or r.get('skipped')}")
            continue
        d = _deltas(r, nbytes)
        print(
            f"| {label:<44} | {d['parent']['uss']:>9.2f}x | {d['parent']['pss']:>9.2f}x "
            f"| {d['child']['uss']:>8.2f}x | {d['child']['pss']:>8.2f}x "
            f"| {d['total']['pss']:>8.2f}x |"
        )
    print()
    print(f"Goals (peak PSS over the baseline, +{SLACK:.2f}x slack; USS <= PSS, so USS meets them")
    print("too):")
    for key, label, goal in ROWS:
        r = results.get(key)
        if r is None or "error" in r or "skipped" in r:
            continue
        d = _deltas(r, nbytes)
        pg = goal if goal is not None else COPIED_GOAL
        note = "" if goal is not None else " (reference: the copied-in goal)"
        pp, cp = d["parent"]["pss"], d["child"]["pss"]
        print(
            f"  {verdict(pp <= pg + SLACK)}  {label}: parent +{pp:.2f}x (goal <= +{pg:.0f}x){note}"
        )
        print(f"  {verdict(cp <= CHILD_GOAL + SLACK)}  {label}: child +{cp:.2f}x (goal <= +1x)")


def _deltas(r: dict[str, Any], nbytes: int) -> dict[str, dict[str, float]]:
    out = {
        g: {k: (r["peak"][g][k] - r["base"][g][k]) / nbytes for k in ("uss", "pss")}
        for g in ("parent", "child")
    }
    # the total at the hold point: one steady sample (a peak of sums would add a parent read
    # taken just before the child mapped the pages to a child read taken just after)
    out["total"] = {
        k: (r["hold"]["total"][k] - r["base"]["total"][k]) / nbytes for k in ("uss", "pss")
    }
    return out


def _shm_entries() -> set[str]:
    with contextlib.suppress(OSError):
        return {e for e in os.listdir("/dev/shm") if e.startswith(("aioshm", "psm_"))}
    return set()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--mib", type=int, default=None, help="array size in MiB (default 512)")
    ap.add_argument("--quick", action="store_true", help="64 MiB")
    ap.add_argument("--only", nargs="+", choices=[k for k, _, _ in ROWS], default=None)
    ap.add_argument("--ray", action="store_true", help="run the Ray row (inside unshare -n)")
    ap.add_argument("--row", help=argparse.SUPPRESS)
    args = ap.parse_args()
    mib = args.mib or (64 if args.quick else 512)
    nbytes = mib << 20
    if args.row:
        print(json.dumps(run_row(args.row, nbytes)), flush=True)
        return
    keys = args.only or [k for k, _, _ in ROWS]
    before = _shm_entries()
    results: dict[str, dict[str, Any]] = {}
    for key in keys:
        if key == "ray":
            try:
                import ray  # noqa: F401
            except ImportError:
                results[key] = {"skipped": "skipped: Ray is not installed (pip install ray)"}
                print("  ray: skipped, Ray is not importable", flush=True)
                continue
            if not args.ray:
                results[key] = {"skipped": "skipped: pass --ray, inside unshare -n"}
                print("  ray: skipped (it opens sockets: --ray inside unshare -n)", flush=True)
                continue
        t0 = time.perf_counter()
        results[key] = _fresh(key, mib)
        print(f"  {key}: {time.perf_counter() - t0:.1f} s", flush=True)
    report(results, nbytes)
    left = _shm_entries() - before
    # aioshm's default segments are memfds (never in /dev/shm); a psm_ entry is ours or another
    # run's on this machine
    print(f"\nnew aioshm*/psm_* entries in /dev/shm: {sorted(left) if left else 'none'}")


if __name__ == "__main__":
    main()

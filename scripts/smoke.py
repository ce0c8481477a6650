"""The README's examples against an installed aioshm, on asyncio: run by ``scripts/smoke.sh``.

``smoke.sh`` builds the wheel, installs it with only its declared dependencies into a fresh
venv and runs this program there, outside the source tree, so what it exercises is what a user
gets from ``pip install aioshm``: ``spawn``, ``Process``, ``Queue``, ``Pool`` (blocking and
awaitable), ``run_sync``, the ``RuntimeWarning`` for ``fork`` under a running loop, and the
synchronous drop-in. Every step checks its result; the first failure exits non-zero.
"""

from __future__ import annotations

import importlib.metadata
import sys
import warnings

import anyio
import numpy as np

import aioshm
import aioshm.multiprocessing as mp


def work(rank: int, a: np.ndarray) -> float:
    """The README's spawn target: plain sync code in the child, writing into a shared array."""
    a[rank] += 1
    return float(a.sum())


def row_norm(row: np.ndarray) -> float:
    return float(np.linalg.norm(row))


def fork_target(rank: int) -> int:
    return rank


def check(label: str, ok: bool, detail: object = "") -> None:
    print(f"  {'ok  ' if ok else 'FAIL'} {label}{f': {detail}' if detail != '' else ''}")
    if not ok:
        raise SystemExit(f"smoke: {label} failed")


async def main() -> None:
    a = aioshm.zeros(4)
    ranks = await aioshm.spawn(work, args=(a,), nprocs=2)
    check("spawn: per-rank results", len(ranks) == 2 and max(ranks) == 2.0, ranks)
    check("spawn: the children's writes are in the parent's array", a.tolist() == [1, 1, 0, 0])

    p = aioshm.Process(target=np.linalg.norm, args=(aioshm.share(np.ones(10**6)),))
    check("Process: await p gives the target's return value", await p == 1000.0)

    q = aioshm.Queue(maxsize=8)
    await q.put_async(a)
    back = await q.get_async()
    check("Queue: an array back through the queue", back.tolist() == [1, 1, 0, 0])
    check("Queue: it arrives as shared memory", aioshm.is_shared(back))
    q.close()

    rows = [np.full(1 << 16, float(i)) for i in range(8)]  # 512 KiB each: sent as handles
    expected = [row_norm(r) for r in rows]
    async with aioshm.Pool(2) as pool:
        norm = await pool.apply_async(row_norm, (rows[3],))
        check("Pool: await apply_async", norm == expected[3], norm)
        check("Pool: await map_async", await pool.map_async(row_norm, rows) == expected)
        check("Pool: blocking map", pool.map(row_norm, rows) == expected)

    check("run_sync", await aioshm.run_sync(row_norm, rows[5]) == expected[5])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        forked = await aioshm.spawn(fork_target, nprocs=1, start_method="fork")
    fork_warned = any(issubclass(w.category, RuntimeWarning) for w in caught)
    check("spawn(start_method='fork') under a running loop warns", fork_warned, [forked])


def sync_dropin() -> None:
    with mp.Pool(2) as pool:
        check("aioshm.multiprocessing.Pool.map", pool.map(abs, [-1, -2, 3]) == [1, 2, 3])
    check("aioshm.multiprocessing.reduction", mp.reduction.ForkingPickler is not None)


if __name__ == "__main__":
    version = importlib.metadata.version("aioshm")
    print(f"smoke: aioshm {version} from {aioshm.__file__}, python {sys.version.split()[0]}")
    print(f"  installed: numpy {np.__version__}, anyio {importlib.metadata.version('anyio')}")
    anyio.run(main)
    sync_dropin()
    print("smoke: all checks passed")

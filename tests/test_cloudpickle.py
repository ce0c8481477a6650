"""Functions pickle cannot carry by name travel by value with cloudpickle (the ``cloudpickle``
extra; Note [Functions by value] in ``aioshm/_reduction.py``).

Lambdas and closures as Process targets, spawn functions, Pool and run_sync tasks, and
functions of an interactive session under spawn. Only the function goes by value: an array it
captures, like every argument, still travels as a shared-memory handle, so a child's writes to
it are seen. Without cloudpickle (hidden by a monkeypatch, or in a subprocess whose import of it
fails), the error names the extra.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from collections.abc import Callable
from multiprocessing.reduction import ForkingPickler
from typing import Any

import numpy as np
import pytest

import aioshm
import aioshm.multiprocessing as amp
from aioshm import _reduction

pytest.importorskip("cloudpickle")

WAIT = 60.0  # safety net for a child that crashed; never used for synchronisation
HINT = "pip install 'aioshm[cloudpickle]'"


def filler(a: np.ndarray, value: float) -> Callable[[], float]:
    """A closure over a shared array: writes ``value`` into it and returns the new sum."""

    def fill() -> float:
        a[:] = value
        return float(a.sum())

    return fill


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_closure_as_process_target_writes_the_shared_array(method: str) -> None:
    a = aioshm.zeros(100)
    proc = amp.get_context(method).Process(target=filler(a, 3.0))
    proc.start()
    proc.join(WAIT)
    assert proc.exitcode == 0
    assert (a == 3.0).all()  # the captured array went as a handle, not a copy


def test_lambda_spawn_fn_and_array_argument() -> None:
    a = aioshm.zeros(2)
    amp.spawn(lambda rank, arr: arr.__setitem__(rank, rank + 10), args=(a,), nprocs=2)
    np.testing.assert_array_equal(a, [10, 11])


@pytest.mark.anyio
async def test_async_spawn_closure() -> None:
    a = aioshm.zeros(4)
    assert await aioshm.spawn(lambda rank: filler(a, 2.0)() + rank, nprocs=2) == [8.0, 9.0]


@pytest.mark.anyio
async def test_pool_and_run_sync_tasks() -> None:
    a = aioshm.zeros(10)
    offset = 5
    async with aioshm.Pool(1) as pool:
        assert await pool.apply_async(lambda x: x + offset, (1,)) == 6
        assert await pool.apply_async(filler(a, 4.0)) == 40.0
        assert await pool.map_async(lambda x: x * offset, [1, 2]) == [5, 10]
    assert (a == 4.0).all()
    assert await aioshm.run_sync(lambda x: float(x.sum()) + offset, np.ones(10)) == 15.0


def test_stdlib_pool_takes_a_lambda_once_aioshm_is_imported() -> None:
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        assert pool.apply(lambda x: x * 3, (2,)) == 6
        pool.close()
        pool.join()


def test_functions_found_by_name_still_go_by_name() -> None:
    data, fds, _ = _reduction.dumps((filler, np.add, print))
    assert b"_rebuild_function" not in bytes(data) and fds == []
    assert b"_rebuild_function" not in bytes(ForkingPickler.dumps(filler))


def test_message_with_fds_retried_by_value_leaks_nothing() -> None:
    """The first attempt opened a ticket for the array before failing on the lambda: the
    retry starts the message over (one fd, the array arrives shared)."""
    a = aioshm.zeros(10)
    data, fds, _ = _reduction.dumps((a, lambda: 1))
    assert len(fds) == 1
    b, f = _reduction.loads(data, fds)
    b[0] = 1
    assert a[0] == 1 and f() == 1


@pytest.mark.parametrize("fn", [lambda: 1, filler(np.zeros(1), 1.0)], ids=["lambda", "closure"])
def test_without_cloudpickle_the_error_names_the_extra(
    fn: Callable[[], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_reduction, "_cloud_pickler_cls", False)
    with pytest.raises(pickle.PicklingError, match=r"aioshm\[cloudpickle\]"):
        _reduction.dumps(fn)
    with pytest.raises(AttributeError, match=r"aioshm\[cloudpickle\]"):  # as pickle's own
        ForkingPickler.dumps(fn)


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )


INTERACTIVE = """
import numpy as np
import anyio
import aioshm
import aioshm.multiprocessing as amp

def double(x):
    return x * 2

async def main():
    async with aioshm.Pool(1, context="spawn") as pool:
        print(await pool.apply_async(double, (21,)))
    print(sum(await aioshm.spawn(lambda rank: double(rank), nprocs=2, start_method="spawn")))

if __name__ == "__main__":
    anyio.run(main)
    p = amp.get_context("spawn").Process(target=double, args=(1,))
    p.start()
    p.join()
    print(p.exitcode)
"""


def test_interactive_session_functions_under_spawn() -> None:
    """A main given with ``-c`` has no file a spawned child could import ``double`` from."""
    result = run_python(INTERACTIVE)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["42", "2", "0"]


NO_CLOUDPICKLE = """
import sys
sys.modules["cloudpickle"] = None  # its import fails, as if it were not installed
import aioshm.multiprocessing as amp

p = amp.get_context("spawn").Process(target=lambda: None)
try:
    p.start()
except Exception as exc:
    import pickle
    print(isinstance(exc, pickle.PicklingError), exc)
"""


def test_without_cloudpickle_in_a_fresh_process() -> None:
    result = run_python(NO_CLOUDPICKLE)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("True ")
    assert HINT in result.stdout

"""Progress on every long pool operation, and the progress-bar recipes of ``docs/guide.md``.

* ``on_progress`` on ``imap``/``imap_unordered`` (sync iteration and ``async for``), ``map``,
  ``starmap`` and ``starmap_async``: one ``ProgressEvent`` per finished chunk, ``done``
  increasing to the number of items; ``total`` known from ``len`` or, for an iterable
  without one, from its end; no event counts an item that raised.
* The tqdm and rich recipes of the guide's "Progress bars" section, taken from the guide and
  run as they are (output into a StringIO, never the terminal): their bars end at the count.

At most two worker processes at a time; every pool is terminated however the test ends.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

TESTS_DIR = Path(__file__).resolve().parent
GUIDE = TESTS_DIR.parent / "docs" / "guide.md"
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

import _pool_targets as targets

import aioshm
from aioshm import ProgressEvent

WAIT = 30.0  # the bound on every awaited or blocking section: nothing hangs
N = 40


def shut(pool: aioshm.Pool) -> None:
    pool.terminate()
    pool.join()


def numbers(n: int) -> Iterator[int]:
    """An iterable without a length."""
    yield from range(n)


def check_events(events: list[ProgressEvent], n: int, chunks: int) -> None:
    """One event per chunk (plus at most one when an iterable without a length ends), ``done``
    increasing to ``n``, the last one with the total."""
    assert chunks <= len(events) <= chunks + 1, events
    done = [e.done for e in events]
    assert done == sorted(done), events
    assert events[-1] == ProgressEvent(n, n), events


# --------------------------------------------------------------------------- imap


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
@pytest.mark.parametrize("sized", [True, False], ids=["list", "generator"])
def test_sync_imap_progress(method: str, sized: bool) -> None:
    """``for r in pool.imap(f, xs, on_progress=cb)``: an event per chunk, ending at (N, N);
    ``total`` is ``len(xs)``, or None for a generator until it ends."""
    pool = aioshm.Pool(2)
    try:
        events: list[ProgressEvent] = []
        source = list(range(N)) if sized else numbers(N)
        it = getattr(pool, method)(targets.square, source, 4, on_progress=events.append)
        got = [it.next(timeout=WAIT) for _ in range(N)]
        with pytest.raises(StopIteration):
            it.next(timeout=WAIT)
        assert sorted(got) == [i * i for i in range(N)]
        if method == "imap":
            assert got == [i * i for i in range(N)]
        check_events(events, N, N // 4)
        if sized:
            assert all(e.total == N for e in events)
        else:  # unknown until the generator ended; then known
            assert events[0].total is None
            first_known = next(i for i, e in enumerate(events) if e.total is not None)
            assert all(e.total == N for e in events[first_known:])
    finally:
        shut(pool)


@pytest.mark.anyio
@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
async def test_async_imap_progress(method: str) -> None:
    """``async for r in pool.imap_unordered(f, gen, on_progress=cb)``: the same events."""
    pool = aioshm.Pool(2)
    try:
        with anyio.fail_after(WAIT):
            events: list[ProgressEvent] = []
            it = getattr(pool, method)(targets.square, numbers(N), 3, on_progress=events.append)
            got = [r async for r in it]
            assert sorted(got) == [i * i for i in range(N)]
            check_events(events, N, -(-N // 3))
            assert events[-1].total == N
    finally:
        with anyio.CancelScope(shield=True), anyio.fail_after(WAIT):
            await pool.terminate_async()


@pytest.mark.timeout(60)
def test_imap_progress_counts_no_failed_item() -> None:
    """A chunk that raised is not progress: ``done`` never reaches the total, and the
    iteration raises the item's exception."""
    pool = aioshm.Pool(2)
    try:
        events: list[ProgressEvent] = []
        items = [*range(10), -1, *range(11, 20)]
        it = pool.imap(targets.raise_value_error_if_neg, items, 5, on_progress=events.append)
        with pytest.raises(ValueError):
            for _ in range(len(items)):
                it.next(timeout=WAIT)
        assert events, "no event for the chunks that finished"
        assert all(e.total == 20 for e in events)
        assert max(e.done for e in events) <= 15
    finally:
        shut(pool)


@pytest.mark.timeout(60)
def test_imap_progress_on_empty_iterable() -> None:
    """An empty generator: one event (0, 0) when it ends, so a bar is told its total."""
    pool = aioshm.Pool(1)
    try:
        events: list[ProgressEvent] = []
        assert (
            list(pool.imap_unordered(targets.square, numbers(0), on_progress=events.append)) == []
        )
        assert events == [ProgressEvent(0, 0)]
    finally:
        shut(pool)


# --------------------------------------------------------------------------- map family


@pytest.mark.timeout(60)
def test_blocking_map_and_starmap_progress() -> None:
    """The blocking ``map`` and ``starmap`` take ``on_progress`` and call it while they block;
    ``starmap_async`` too."""
    pool = aioshm.Pool(2)
    try:
        mapped: list[ProgressEvent] = []
        assert pool.map(targets.square, range(N), 5, on_progress=mapped.append) == [
            i * i for i in range(N)
        ]
        check_events(mapped, N, N // 5)

        starred: list[ProgressEvent] = []
        pairs = [(i, i) for i in range(N)]
        assert pool.starmap(targets.add, pairs, 8, on_progress=starred.append) == [
            2 * i for i in range(N)
        ]
        check_events(starred, N, N // 8)

        star_async: list[ProgressEvent] = []
        result = pool.starmap_async(targets.add, pairs, 10, on_progress=star_async.append)
        assert result.get(timeout=WAIT) == [2 * i for i in range(N)]
        check_events(star_async, N, N // 10)
    finally:
        shut(pool)


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_starmap_async_progress_awaited() -> None:
    """``await pool.starmap_async(..., on_progress=cb)`` and its ``progress()`` iterator."""
    pool = aioshm.Pool(2)
    try:
        with anyio.fail_after(WAIT):
            events: list[ProgressEvent] = []
            pairs = [(i, 1) for i in range(N)]
            result = pool.starmap_async(targets.add, pairs, 4, on_progress=events.append)
            iterated = [e async for e in result.progress()]
            assert await result == [i + 1 for i in range(N)]
            check_events(events, N, N // 4)
            assert iterated[-1] == ProgressEvent(N, N)
    finally:
        with anyio.CancelScope(shield=True), anyio.fail_after(WAIT):
            await pool.terminate_async()


# --------------------------------------------------------------------------- the guide's recipes


def recipe(library: str) -> str:
    """The code block of the guide's "Progress bars" section that imports ``library``."""
    text = GUIDE.read_text()
    section = text.split("### Progress bars (tqdm, rich)\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    found = [block for block in blocks if re.search(rf"^from {library}\b", block, re.MULTILINE)]
    assert len(found) == 1, f"no single {library} recipe in {GUIDE}"
    return found[0]


def run_recipe(code: str, namespace: dict[str, Any]) -> dict[str, Any]:
    """Run a blocking recipe; its variables."""
    exec(compile(code, str(GUIDE), "exec"), namespace)  # noqa: S102 (the guide's code)
    return namespace


async def run_async_recipe(code: str, namespace: dict[str, Any]) -> dict[str, Any]:
    """Run a recipe that awaits, as the body of a coroutine; its local variables."""
    source = f"async def recipe():\n{textwrap.indent(code, '    ')}\n    return locals()\n"
    exec(compile(source, str(GUIDE), "exec"), namespace)  # noqa: S102 (the guide's code)
    found: dict[str, Any] = await namespace["recipe"]()
    return found


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_tqdm_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    """The guide's tqdm recipe, run as written: both bars end at the number of items (the
    iterator's bar learns its total at the end), and the squares are right.

    tqdm's monitor thread (it nudges bars left without updates) lives as long as the process
    once started: off here, for the leak check."""
    tqdm = pytest.importorskip("tqdm")
    monkeypatch.setattr(tqdm.tqdm, "monitor_interval", 0)
    pool = aioshm.Pool(2)
    out = io.StringIO()
    try:
        with anyio.fail_after(WAIT), contextlib.redirect_stderr(out):  # tqdm's file
            found = await run_async_recipe(
                recipe("tqdm"), {"pool": pool, "work": targets.square, "items": list(range(N))}
            )
    finally:
        with anyio.CancelScope(shield=True), anyio.fail_after(WAIT):
            await pool.terminate_async()
    assert found["results"] == [i * i for i in range(N)]
    for name in ("bar", "stream_bar"):
        bar = found[name]
        assert (bar.n, bar.total) == (N, N), name
    assert f"{N}/{N}" in out.getvalue()


@pytest.mark.timeout(60)
def test_rich_recipe() -> None:
    """The guide's rich recipe, run as written (blocking face): both tasks end completed at
    the number of items (the iterator's learns its total at the end)."""
    pytest.importorskip("rich")
    pool = aioshm.Pool(2)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):  # rich's console
            found = run_recipe(
                recipe("rich"), {"pool": pool, "work": targets.square, "items": list(range(N))}
            )
    finally:
        shut(pool)
    assert found["results"] == [i * i for i in range(N)]
    tasks = {task.description: task for task in found["progress"].tasks}
    assert set(tasks) == {"map", "imap"}
    for task in tasks.values():
        assert (task.completed, task.total, task.finished) == (N, N, True), task.description

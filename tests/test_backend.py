"""``backend=`` is resolved once (``aioshm._backend.resolve``): the local backend builds aioshm's
own objects, another backend gets every argument, and a missing feature is an error, never a
different object. Fake backends stand in for Ray here (``test_ray.py`` runs the real one)."""

from __future__ import annotations

from typing import Any

import pytest

import aioshm
from aioshm._backend import Backend, resolve


class FakeBackend:
    """A backend whose queues only record how they were made."""

    name = "fake"

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    def spawn(self, fn: Any, args: Any, nprocs: int, **kwargs: Any) -> Any: ...

    def Pool(self, *args: Any, **kwargs: Any) -> Any: ...

    async def run_sync(self, fn: Any, *args: Any, **kwargs: Any) -> Any: ...

    def Queue(self, maxsize: int = 0) -> Any:
        return ("Queue", maxsize)

    async def put_array(self, a: Any) -> Any: ...

    async def get_array(self, handle: Any) -> Any: ...


class JoinableFakeBackend(FakeBackend):
    def JoinableQueue(self, maxsize: int = 0) -> Any:
        return ("JoinableQueue", maxsize)


def test_resolve() -> None:
    assert resolve(None) is None and resolve(aioshm.local_backend) is None
    fake = FakeBackend()
    assert isinstance(fake, Backend) and resolve(fake) is fake
    with pytest.raises(TypeError, match="backend must be"):
        resolve("ray")


@pytest.mark.parametrize("call", ["positional", "keyword"])
def test_queue_maxsize_reaches_the_backend(call: str) -> None:
    fake = JoinableFakeBackend()
    made = (
        aioshm.Queue(3, backend=fake)
        if call == "positional"
        else aioshm.Queue(maxsize=3, backend=fake)
    )
    assert made == ("Queue", 3)
    assert aioshm.JoinableQueue(maxsize=2, backend=fake) == ("JoinableQueue", 2)


def test_joinable_queue_on_a_backend_without_one_is_an_error() -> None:
    with pytest.raises(NotImplementedError, match="'fake' backend has no JoinableQueue"):
        aioshm.JoinableQueue(backend=FakeBackend())


def test_not_a_backend_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="backend must be"):
        aioshm.Queue(backend="ray")


def test_local_backend_builds_aioshm_queues() -> None:
    for backend in (None, aioshm.local_backend):
        q = aioshm.JoinableQueue(maxsize=1, backend=backend)
        try:
            assert isinstance(q, aioshm.JoinableQueue) and q._maxsize == 1
        finally:
            q.close()
            q.join_thread()


class RecordingBackend(FakeBackend):
    """A backend that records how its pool, spawn and run_sync were called."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def spawn(self, fn: Any, args: Any, nprocs: int, **kwargs: Any) -> Any:
        self.calls.append(("spawn", (fn, args, nprocs), kwargs))
        return "spawned"

    def Pool(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(("Pool", args, kwargs))
        return "pool"

    async def run_sync(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(("run_sync", (fn, *args), kwargs))
        return "ran"


def test_pool_and_spawn_go_to_the_backend() -> None:
    fake = RecordingBackend()
    assert aioshm.Pool(3, None, (), 5, context="spawn", backend=fake) == "pool"
    assert aioshm.spawn(len, (1,), 2, daemon=True, backend=fake) == "spawned"
    assert fake.calls == [
        ("Pool", (3, None, (), 5), {}),  # the context is the local pool's business
        ("spawn", (len, (1,), 2), {"daemon": True, "start_method": None}),
    ]


@pytest.mark.anyio
async def test_run_sync_goes_to_the_backend() -> None:
    fake = RecordingBackend()
    assert await aioshm.run_sync(len, "ab", cancellable=True, backend=fake) == "ran"
    assert fake.calls == [("run_sync", (len, "ab"), {"cancellable": True, "limiter": None})]


class NamedLocal:
    """No backend, though it says it is the local one (the old string check took it)."""

    name = "local"


@pytest.mark.parametrize("backend", ["ray", NamedLocal(), object()])
def test_pool_spawn_and_run_sync_refuse_what_is_no_backend(backend: object) -> None:
    with pytest.raises(TypeError, match="backend must be"):
        aioshm.Pool(1, backend=backend)
    with pytest.raises(TypeError, match="backend must be"):
        aioshm.spawn(len, (), 1, backend=backend)
    with pytest.raises(TypeError, match="backend must be"):
        aioshm.start_processes(len, (), 1, backend=backend)
    coro = aioshm.run_sync(len, "ab", backend=backend)
    with pytest.raises(TypeError, match="backend must be"):
        coro.send(None)  # it raises before its first await


def test_the_local_backend_builds_an_aioshm_pool() -> None:
    pool = aioshm.Pool(1, backend=aioshm.local_backend)
    try:
        assert isinstance(pool, aioshm.Pool)
        assert pool.apply(len, ("abc",)) == 3
    finally:
        pool.close()
        pool.join()

"""The programs in ``examples/`` run as real programs, in subprocesses, and do what they say.

``quickstart.py`` (the README's quickstart, verbatim) and ``queue_consumer.py`` run to
completion under a timeout. ``http_service.py`` is started as a real uvicorn server on a free
127.0.0.1 port and hit with concurrent HTTP requests from every anyio backend: every answer is
checked against numpy in the test, and the server's event loop must stay responsive while its
pool workers compute (``/ping`` answers during the burst, and the loop-lag meter the service
runs stays far below the duration of one computation).
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np
import psutil
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run_example(name: str, cwd: Path, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """Run ``examples/<name>`` with this interpreter; fail with its output if it fails."""
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


# --------------------------------------------------------------------------- scripts


@pytest.mark.timeout(120)
def test_quickstart(tmp_path: Path) -> None:
    """The README quickstart runs: per-rank spawn results, a child's return value, the queue."""
    lines = _run_example("quickstart.py", tmp_path).stdout.splitlines()
    assert len(lines) == 3, lines
    # each rank returns the sum after its own increment; whether it already sees the other
    # rank's write is a race, but the later of the two always does
    ranks = [float(x) for x in lines[0].strip("[]").split(",")]
    assert len(ranks) == 2 and set(ranks) <= {1.0, 2.0} and max(ranks) == 2.0, lines[0]
    assert lines[1] == "1000.0"  # norm of 10**6 ones, computed in the child
    assert lines[2] == "[1. 1. 0. 0.]"  # both children's writes, back through the queue


@pytest.mark.timeout(120)
def test_queue_consumer(tmp_path: Path) -> None:
    """Producers in child processes feed the async consumer; totals match, and it stops."""
    out = _run_example("queue_consumer.py", tmp_path).stdout
    assert re.search(r"^received 36 arrays \(24\.0 MiB\) from 3 producers", out, re.MULTILINE), out
    assert "kinds: shared=12 large=12 small=12; arrived as shared memory: 24" in out, out
    assert out.rstrip().endswith("checksums match"), out


_NUMBER = r"[0-9]+(?:\.[0-9]+)?"
_DEMO_ROWS = {
    # label: the units of its aioshm and stdlib cells, and whether a ratio follows
    "transfer: a frame there and back": ("ms", True),
    "compute: one frame (worker CPU)": ("ms", True),
    "pipeline: 8 frames, wall time": ("s", True),
    "pipeline: throughput": ("MiB/s", False),
    "event loop tick lag, p99": ("ms", True),
    "event loop tick lag, worst": ("ms", True),
    "  less waits for a CPU, p99": ("ms", True),
    "  less waits for a CPU, worst": ("ms", True),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_demo_main_job(tmp_path: Path, backend: str) -> None:
    """``python -m aioshm demo --quick`` (the README's main job, shortened) runs both pipelines
    end to end, checks every result, and ends with the table: the transfer and the compute
    timed apart, the pipeline's wall time and throughput, and the event loop's tick lag of
    both pipelines, each with the stdlib/aioshm ratio (the figures themselves are not
    asserted)."""
    proc = subprocess.run(
        [sys.executable, "-m", "aioshm", "demo", "--quick", "--backend", backend],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    out = proc.stdout
    assert proc.returncode == 0, f"demo exited {proc.returncode}\n{out}\n{proc.stderr}"
    assert out.startswith(
        f"aioshm demo: 8 frames of 2048x2048 float32 (16 MiB each) through 2 worker processes, "
        f"on {backend}; transfer timed over 3 round trips\n"
    ), out
    for label in ("aioshm", "stdlib"):
        assert re.search(rf"^  {label} +8/8 frames, every result checked *$", out, re.MULTILINE)
    assert re.search(r"^ +aioshm +stdlib +stdlib/aioshm$", out, re.MULTILINE), out
    table = out[out.index("stdlib/aioshm") :].splitlines()[1 : 1 + len(_DEMO_ROWS)]
    for line, (label, (unit, ratio)) in zip(table, _DEMO_ROWS.items(), strict=True):
        cell = rf"{_NUMBER} {re.escape(unit)}"
        tail = rf" +{_NUMBER}x" if ratio else ""
        assert re.fullmatch(rf"  {re.escape(label)} +{cell} +{cell}{tail} *", line), (line, out)
    assert "The compute is the same on both sides." in out, out


@pytest.mark.anyio
@pytest.mark.timeout(120)
@pytest.mark.parametrize("pipeline", ["aioshm", "stdlib"])
async def test_demo_failure_leaves_no_process(pipeline: str) -> None:
    """A failure in the middle of the demo (here a reply that does not match) is raised, and
    the pipeline's worker processes are stopped and reaped first (the leak check runs too)."""
    from aioshm import _bench, _demo

    with _bench.stdlib_pickling() if pipeline == "stdlib" else contextlib.nullcontext():
        pipe: Any = (_demo._AioshmPipeline if pipeline == "aioshm" else _demo._StdlibPipeline)(2)
        receive = pipe.receive

        async def wrong() -> tuple[int, float, float]:
            index, checksum, seconds = await receive()
            return index, checksum + 1, seconds

        pipe.receive = wrong
        with pytest.raises(AssertionError, match=f"{pipeline}: round trip 0 came back wrong"):
            await _demo._measure(pipe, 2, 1, _demo._Progress(pipeline, 2))
    procs = pipe.ctx.processes if pipeline == "aioshm" else pipe.procs
    assert len(procs) == 2 and all(p.exitcode is not None for p in procs)


# --------------------------------------------------------------------------- HTTP service

N = 300  # matrix size of a /svd request
ROUNDS = 30  # SVDs per request: ~0.15 s or more of work, well over the lag bound
SAMPLES = 1 << 14  # samples of a /spectrum request
CONCURRENT = 20
MAX_LAG_MS = 50.0
READY_TIMEOUT = 60.0


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    descendants: list[psutil.Process]

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM (graceful: uvicorn ends the lifespan, which closes the pool); kill if stuck."""
        if self.proc.poll() is None:
            try:
                self.descendants += psutil.Process(self.proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # the pool workers and the fork server must go with it
        _, alive = psutil.wait_procs(self.descendants, timeout=10)
        for proc in alive:
            proc.kill()
        assert not alive, f"left running after the server stopped: {alive}"
        return self.proc.returncode


def _wait_ready(proc: subprocess.Popen[bytes], log: Path) -> int:
    """The port the service announces, once a TCP connect to it succeeds (bounded polling)."""
    deadline = time.monotonic() + READY_TIMEOUT
    port = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text()}")
        if port is None:
            found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", log.read_text())
            port = int(found.group(1)) if found else None
        if port is not None:
            # uvicorn calls listen() after the lifespan started the pool: a connect that
            # succeeds means the service is ready
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return port
            except OSError:
                pass
        time.sleep(0.05)  # readiness polling, bounded by the deadline
    pytest.fail(f"the server was not ready within {READY_TIMEOUT} s:\n{log.read_text()}")


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[Server]:
    """``examples/http_service.py`` as a real server (subprocess) with 2 pool workers."""
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(EXAMPLES / "http_service.py"), "--workers", "2"],
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Server(proc, 0, log, [])
    try:
        server.port = _wait_ready(proc, log)
        server.descendants = psutil.Process(proc.pid).children(recursive=True)
        yield server
    finally:
        server.stop()


def _signal(i: int) -> tuple[np.ndarray, int]:
    """A test signal whose strongest frequency is bin ``40 + i``."""
    t = np.arange(SAMPLES) / SAMPLES
    k = 40 + i
    return np.sin(2 * np.pi * k * t) + 0.3 * np.cos(2 * np.pi * 3 * k * t) + 0.01 * t, k


def _check_svd(answer: dict[str, Any], seed: int) -> None:
    sv = np.linalg.svd(np.random.default_rng(seed).standard_normal((N, N)), compute_uv=False)
    assert answer["seed"] == seed and answer["n"] == N
    np.testing.assert_allclose(answer["top"], sv[:3], rtol=1e-9)
    np.testing.assert_allclose(answer["cond"], sv[0] / sv[-1], rtol=1e-6)


def _check_spectrum(answer: dict[str, Any], i: int) -> None:
    x, k = _signal(i)
    power = np.abs(np.fft.rfft(x - x.mean())) ** 2
    assert answer["samples"] == SAMPLES and answer["bin"] == k == int(np.argmax(power))
    np.testing.assert_allclose(answer["power"], power[k], rtol=1e-9)
    assert answer["shared"] is True  # the worker got a shared-memory handle


@pytest.mark.anyio
@pytest.mark.timeout(180)
async def test_http_service(http_server: Server) -> None:
    """20 concurrent requests are answered correctly by the pool while the server's loop
    stays responsive: pings answer during the burst, and the service's own loop-lag meter
    (less the loop thread's waits for a CPU) stays under 50 ms although each computation takes
    far longer; SIGTERM then shuts the
    server down cleanly (exit 0, pool closed, no process left)."""
    base = f"http://127.0.0.1:{http_server.port}"
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        # warm-up: the first task per worker pays for imports and BLAS start-up
        warm = await client.post("/svd", json={"seed": 1000, "n": N, "rounds": 1})
        assert warm.status_code == 200, warm.text
        _check_svd(warm.json(), 1000)
        bad = await client.post("/svd", json={"n": "big"})
        assert bad.status_code == 400 and "'n'" in bad.json()["error"]
        as_json = await client.post("/spectrum", json=_signal(0)[0].tolist())
        assert as_json.status_code == 200, as_json.text
        _check_spectrum(as_json.json(), 0)
        assert (await client.post("/lag/reset")).json() == {"reset": True}

        answers: dict[int, dict[str, Any]] = {}
        pending = set(range(CONCURRENT))
        pings: list[tuple[float, int]] = []  # (latency s, heavy requests still pending)

        async def heavy(i: int) -> None:
            if i % 5 == 4:
                raw = _signal(i)[0].astype("<f8").tobytes()
                headers = {"content-type": "application/octet-stream"}
                r = await client.post("/spectrum", content=raw, headers=headers)
            else:
                r = await client.post("/svd", json={"seed": i, "n": N, "rounds": ROUNDS})
            assert r.status_code == 200, r.text
            answers[i] = r.json()
            pending.discard(i)

        async def pinger() -> None:
            while pending:
                start = time.perf_counter()
                r = await client.get("/ping")
                latency = time.perf_counter() - start
                assert r.json() == {"pong": True}
                pings.append((latency, len(pending)))
                await anyio.sleep(0.01)  # pacing of the probe, not synchronisation

        burst_start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for i in range(CONCURRENT):
                tg.start_soon(heavy, i)
            tg.start_soon(pinger)
        burst = time.perf_counter() - burst_start
        lag = (await client.get("/lag")).json()

    for i, answer in answers.items():
        if i % 5 == 4:
            _check_spectrum(answer, i)
        else:
            _check_svd(answer, i)
    assert len(answers) == CONCURRENT
    assert len({a["pid"] for a in answers.values()}) == 2, "both pool workers served requests"

    # compute_s: wall time of one SVD task in its worker
    compute = sorted(a["compute_s"] for a in answers.values() if "compute_s" in a)
    during = [latency for latency, still in pings if still > 0]
    print(
        f"\nburst of {CONCURRENT} requests: {burst:.2f} s; one SVD task {compute[0] * 1e3:.0f}-"
        f"{compute[-1] * 1e3:.0f} ms; {len(during)} pings during the burst, latency max "
        f"{max(during) * 1e3:.1f} ms, median {sorted(during)[len(during) // 2] * 1e3:.1f} ms; "
        f"server loop lag max {lag['max_lag_ms']:.1f} ms, {lag['max_own_lag_ms']:.1f} ms less "
        f"its waits for a CPU (loop thread busy at most {lag['max_busy_ms']:.1f} ms of it) over "
        f"{lag['ticks']} ticks"
    )
    # The bound only means something if one computation takes longer than it.
    assert compute[0] * 1e3 > MAX_LAG_MS, compute
    assert lag["ticks"] > 0
    assert lag["max_busy_ms"] < MAX_LAG_MS, lag  # no computation ran on the loop's thread
    # and nothing else held the loop that long: the wall lag less the loop thread's waits for a
    # CPU (2 CPUs, shared with the client, 2 busy workers and other jobs: seen on CI, a 62 ms
    # wall lag with 10 ms of loop CPU)
    assert lag["max_own_lag_ms"] < MAX_LAG_MS, lag
    assert len(during) >= 3, pings  # the loop answered while work was in flight
    assert sorted(during)[len(during) // 2] < MAX_LAG_MS / 1e3, during
    assert max(during) < 0.5 * burst, (during, burst)

    assert http_server.stop() == 0, http_server.output()
    assert "pool closed after" in http_server.output(), http_server.output()

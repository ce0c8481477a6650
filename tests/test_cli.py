"""The ``aioshm`` command (``python -m aioshm``), run as a user runs it: in a subprocess."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import aioshm


def _aioshm(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aioshm", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.mark.parametrize("args", [["--help"], []])
def test_help_exits_0_and_lists_the_subcommands(tmp_path: Path, args: list[str]) -> None:
    """``aioshm --help`` (and ``aioshm`` alone) prints the usage with every subcommand, exit 0."""
    out = _ok(_aioshm(*args, cwd=tmp_path))
    assert out.startswith("usage: aioshm"), out
    for command in ("demo", "info", "cleanup", "bench"):
        assert re.search(rf"^    {command} +\S", out, re.MULTILINE), (command, out)


@pytest.mark.parametrize("command", ["demo", "info", "cleanup", "bench"])
def test_subcommand_help_exits_0(tmp_path: Path, command: str) -> None:
    """Every subcommand has its own ``--help``."""
    out = _ok(_aioshm(command, "--help", cwd=tmp_path))
    assert out.startswith(f"usage: aioshm {command}"), out


def test_version(tmp_path: Path) -> None:
    """``aioshm --version`` prints the package's version."""
    assert _ok(_aioshm("--version", cwd=tmp_path)) == f"aioshm {aioshm.__version__}\n"


def test_console_script_entry_point() -> None:
    """``pip install aioshm`` puts an ``aioshm`` command on the PATH: ``aioshm._cli:main``."""
    import importlib.metadata

    from aioshm import _cli

    (entry,) = importlib.metadata.entry_points(group="console_scripts", name="aioshm")
    assert entry.value == "aioshm._cli:main"
    assert entry.load() is _cli.main


def test_unknown_subcommand_is_a_usage_error(tmp_path: Path) -> None:
    """A typo is reported by argparse (exit 2), naming the choices."""
    proc = _aioshm("bnech", cwd=tmp_path)
    assert proc.returncode == 2
    assert "invalid choice: 'bnech'" in proc.stderr, proc.stderr


def test_info(tmp_path: Path) -> None:
    """``aioshm info`` reports versions, the sharing strategy, the shm directory's size, free
    space and what aioshm holds there, the fd limits, the start methods and the backends."""
    shm = tmp_path / "shm"
    shm.mkdir()
    (shm / f"aioshm_{os.getpid()}_{'0' * 16}").write_bytes(b"x" * 8192)
    (tmp_path / "ray").mkdir()  # as /tmp/ray, Ray's session directory: not the ray package
    out = _ok(_aioshm("info", cwd=tmp_path, env={"AIOSHM_SHM_DIR": str(shm)}))
    fields = dict(re.findall(r"^(.+?): +(.+)$", out, re.MULTILINE))
    assert fields["aioshm"] == aioshm.__version__
    assert fields["python"].endswith(".".join(map(str, sys.version_info[:3])))
    import anyio  # noqa: F401 - only for its version
    import numpy as np

    assert fields["numpy"] == np.__version__
    assert re.fullmatch(r"\d+\.\d+.*", fields["anyio"]), fields
    assert fields["sharing strategy"].startswith(aioshm.get_sharing_strategy())
    assert re.fullmatch(r"[0-9.]+ [KMGT]?i?B", fields[f"{shm} size"]), fields
    assert re.fullmatch(r"[0-9.]+ [KMGT]?i?B \(\d+%\)", fields[f"{shm} free"]), fields
    held = fields[f"{shm} held by aioshm"]
    assert re.fullmatch(r"8\.0 KiB in 1 named segment \(0 orphaned: .*\)", held), held
    assert re.fullmatch(r"soft \d+, hard (\d+|unlimited) .*", fields["fd limit"]), fields
    assert fields["start method (aioshm)"] == aioshm.DEFAULT_START_METHOD
    assert "start method (aioshm.multiprocessing)" in fields
    for backend in ("trio", "uvloop", "ray"):
        assert re.fullmatch(r"available.*|not installed", fields[f"backend {backend}"]), fields
    assert fields["backend trio"].startswith("available")  # the test extra installs it
    ray = importlib.util.find_spec("ray")  # this process's cwd is not tmp_path
    ray_installed = ray is not None and ray.origin is not None
    assert fields["backend ray"].startswith("available" if ray_installed else "not installed")


def _dead_pid(cwd: Path) -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"], cwd=cwd)
    child.wait(timeout=60)
    return child.pid


def test_cleanup_dry_run_then_cleanup(tmp_path: Path) -> None:
    """``cleanup --dry-run`` lists the orphans (a segment whose creator died, a ticket whose
    sender died) and removes nothing; ``cleanup`` removes them; a live process's segment is
    never touched."""
    shm = tmp_path / "shm"
    shm.mkdir()
    dead = _dead_pid(tmp_path)
    orphan = shm / f"aioshm_{dead}_{'a' * 16}"
    ticket = shm / f"aioshm_{os.getpid()}_{'b' * 16}.t{dead}_{'c' * 16}"
    alive = shm / f"aioshm_{os.getpid()}_{'d' * 16}"
    for path in (orphan, ticket, alive):
        path.write_bytes(b"\0" * 4096)
    env = {"AIOSHM_SHM_DIR": str(shm)}

    out = _ok(_aioshm("cleanup", "--dry-run", cwd=tmp_path, env=env))
    lines = out.splitlines()
    assert sorted(lines[:-1]) == sorted(f"would remove {p}" for p in (orphan, ticket)), out
    assert lines[-1] == f"2 orphaned segments in {shm} (dry run: nothing removed)", out
    assert all(p.exists() for p in (orphan, ticket, alive))

    out = _ok(_aioshm("cleanup", cwd=tmp_path, env=env))
    assert sorted(out.splitlines()[:-1]) == sorted(f"removed {p}" for p in (orphan, ticket))
    assert not orphan.exists() and not ticket.exists() and alive.exists()
    assert _ok(_aioshm("cleanup", cwd=tmp_path, env=env)).splitlines() == [
        f"0 orphaned segments removed from {shm}"
    ]


_BENCH_ROW = re.compile(r"^  (.+?) +([0-9.]+ (?:µs|ms|s)) +([0-9.]+ (?:µs|ms|s)) +([0-9.]+)x$")


@pytest.mark.timeout(180)
def test_bench_quick_prints_the_comparison_tables(tmp_path: Path) -> None:
    """``aioshm bench --quick`` runs every comparison against the stdlib and prints one table
    each, every row with both times and their ratio (timings themselves are not asserted)."""
    out = _ok(_aioshm("bench", "--quick", cwd=tmp_path, timeout=150))
    titles = re.findall(r"^(transfer|pool|start-up): ", out, re.MULTILINE)
    assert titles == ["transfer", "pool", "start-up"], out
    rows = [m.group(1) for m in map(_BENCH_ROW.match, out.splitlines()) if m]
    assert rows == [
        "1 MiB, shared array",
        "1 MiB, private array",
        "16 MiB, shared array",
        "16 MiB, private array",
        "8 x 4 MiB, shared",
        "8 x 4 MiB, private",
        "2 processes",
    ], out


def test_bench_plot_draws_a_png(tmp_path: Path) -> None:
    """``--plot FILE.png`` draws the charts with matplotlib (the ``plot`` extra)."""
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    out = _ok(_aioshm("bench", "--quick", "--only", "startup", "--plot", str(png), cwd=tmp_path))
    assert out.rstrip().endswith(f"plot: {png}"), out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_plot_without_matplotlib_names_the_extra(tmp_path: Path) -> None:
    """Without matplotlib, ``--plot`` fails at once (before any benchmark runs) with an error
    that names the extra to install."""
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from aioshm._cli import main\n"
        "sys.exit(main(['bench', '--quick', '--plot', 'x.png']))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "pip install 'aioshm[plot]'" in proc.stderr, proc.stderr
    assert proc.stdout == "" and not (tmp_path / "x.png").exists()

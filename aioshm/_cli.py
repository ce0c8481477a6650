"""The ``aioshm`` command (also ``python -m aioshm``): ``demo``, ``info``, ``cleanup``, ``bench``.

Each subcommand is a function taking the parsed arguments and returning the exit status;
:func:`main` is the console-script entry point.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import sys
from collections.abc import Sequence

from ._version import __version__

__all__ = ("main",)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _available(module: str, dist: str) -> str:
    """Whether ``module`` is importable (found without importing it), with its version. A
    directory of that name in the current directory (``/tmp/ray`` is Ray's session directory)
    is a namespace package without an origin: not the library."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        return "not installed"
    version = _dist_version(dist)
    return f"available ({version})" if version else "available"


def _shm_usage(directory: str) -> list[tuple[str, str]]:
    """Size and free space of the shm directory, and what aioshm's named segments hold there."""
    from ._shm import _segment

    rows: list[tuple[str, str]] = []
    try:
        st = os.statvfs(directory)
    except OSError as exc:
        return [(directory, f"unavailable ({exc.strerror})")]
    total, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
    rows.append((f"{directory} size", _fmt_bytes(total)))
    rows.append((f"{directory} free", f"{_fmt_bytes(free)} ({free * 100 / max(total, 1):.0f}%)"))
    count = held = 0
    for entry, _match in _segment._iter_names(directory):
        try:
            held += os.stat(os.path.join(directory, entry), follow_symlinks=False).st_blocks * 512
        except OSError:
            continue
        count += 1
    orphans = _segment.cleanup_orphans(dry_run=True)
    rows.append(
        (
            f"{directory} held by aioshm",
            (
                f"{_fmt_bytes(held)} in {count} named segment{'s' * (count != 1)} "
                f"({len(orphans)} orphaned: `aioshm cleanup` removes them)"
            ),
        )
    )
    return rows


def _fd_limits() -> str:
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Linux
        return "unknown"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    def show(n: int) -> str:
        return "unlimited" if n == resource.RLIM_INFINITY else str(n)

    return f"soft {show(soft)}, hard {show(hard)} (aioshm raises the soft limit at import)"


def info_rows() -> list[tuple[str, str]]:
    """What ``aioshm info`` prints: (label, value) pairs."""
    import multiprocessing

    import numpy as np

    from . import _reduction, _shm
    from ._context import DEFAULT_START_METHOD
    from ._shm import _segment

    try:
        cpus = f"{os.cpu_count()} ({len(os.sched_getaffinity(0))} usable by this process)"
    except AttributeError:  # pragma: no cover - not on Linux
        cpus = str(os.cpu_count())
    strategies = ", ".join(sorted(_shm.get_all_sharing_strategies()))
    rows = [
        ("aioshm", __version__),
        ("python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("platform", f"{platform.system()} {platform.release()} {platform.machine()}"),
        ("numpy", np.__version__),
        ("anyio", _dist_version("anyio") or "unknown"),
        ("CPUs", cpus),
        ("sharing strategy", f"{_shm.get_sharing_strategy()} (available: {strategies})"),
        ("share threshold", f"{_fmt_bytes(_reduction.get_share_threshold())}"),
        *_shm_usage(_segment.shm_dir()),
        ("fd limit", _fd_limits()),
        ("start method (aioshm)", DEFAULT_START_METHOD),
        (
            "start method (aioshm.multiprocessing)",
            multiprocessing.get_start_method(allow_none=True)
            or f"{multiprocessing.get_context().get_start_method()} (the stdlib default)",
        ),
        ("backend trio", _available("trio", "trio")),
        ("backend uvloop", _available("uvloop", "uvloop")),
        ("backend ray", _available("ray", "ray")),
        ("bench --plot (matplotlib)", _available("matplotlib", "matplotlib")),
    ]
    return rows


def _cmd_info(args: argparse.Namespace) -> int:
    rows = info_rows()
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label + ':':<{width + 1}} {value}")
    return 0


def _cmd_cleanup(args: argparse.Namespace) -> int:
    from ._shm import _segment

    names = _segment.cleanup_orphans(dry_run=args.dry_run)
    directory = _segment.shm_dir()
    for name in names:
        print(f"{'would remove' if args.dry_run else 'removed'} {os.path.join(directory, name)}")
    count = f"{len(names)} orphaned segment{'s' * (len(names) != 1)}"
    if args.dry_run:
        print(f"{count} in {directory} (dry run: nothing removed)")
    else:
        print(f"{count} removed from {directory}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import _demo

    return _demo.run(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import _bench

    return _bench.run(args)


def build_parser() -> argparse.ArgumentParser:
    """The ``aioshm`` argument parser, with one subparser per subcommand."""
    from . import _bench, _demo

    parser = argparse.ArgumentParser(
        prog="aioshm",
        description="aioshm: multiprocessing for numpy arrays in shared memory, awaitable.",
    )
    parser.add_argument("--version", action="version", version=f"aioshm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="an async pipeline of big arrays, aioshm against the stdlib",
        description=_demo.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _demo.add_arguments(demo)
    demo.set_defaults(func=_cmd_demo)

    info = sub.add_parser("info", help="versions, shared memory, limits and backends")
    info.set_defaults(func=_cmd_info)

    cleanup = sub.add_parser(
        "cleanup",
        help="remove named segments whose owners died",
        description="Remove /dev/shm segments (and tickets) of aioshm processes that died; "
        "segments a living process holds are never touched.",
    )
    cleanup.add_argument(
        "--dry-run", action="store_true", help="list what would be removed, remove nothing"
    )
    cleanup.set_defaults(func=_cmd_cleanup)

    bench = sub.add_parser(
        "bench",
        help="a quick benchmark suite, aioshm against the stdlib",
        description=_bench.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _bench.add_arguments(bench)
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``aioshm`` command with ``argv`` (default: ``sys.argv[1:]``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    status: int = args.func(args)
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""``python -m aioshm demo``: run the end-to-end demo (see :mod:`aioshm._demo`)."""

from __future__ import annotations

import sys


def main() -> int:
    args = sys.argv[1:]
    if not args or args[0] != "demo":
        print("usage: python -m aioshm demo [--frames N] [--workers N] [--backend asyncio|trio]")
        return 2
    from ._demo import main as demo

    return demo(args[1:])


if __name__ == "__main__":
    sys.exit(main())

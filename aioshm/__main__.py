"""``python -m aioshm``: the ``aioshm`` command (see :mod:`aioshm._cli`)."""

import sys

from ._cli import main

if __name__ == "__main__":
    sys.exit(main())

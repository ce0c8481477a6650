"""CPython's own ``test._test_multiprocessing`` ("processes" flavour), run against a drop-in.

Nothing from CPython is copied here: the tests are loaded from the interpreter's ``test``
package at run time and installed into this module with ``install_tests_in_module_dict``.
Which module they exercise is chosen by ``AIOSHM_MP_DROPIN`` (see ``mp_alias.py``); with it
unset the plain stdlib runs, as a control. The start method comes from ``AIOSHM_MP_START``.

This file only runs inside the subprocess started by ``tests/test_cpython_suite.py`` (which
sets ``AIOSHM_CPYTHON_SUITE=1``); a normal ``pytest tests`` run skips it.
"""

from __future__ import annotations

import os

import pytest

if os.environ.get("AIOSHM_CPYTHON_SUITE") != "1":
    pytest.skip(
        "CPython multiprocessing suite: runs in a subprocess via tests/test_cpython_suite.py",
        allow_module_level=True,
    )

import sys
import unittest

import mp_alias  # installs the alias (sitecustomize normally did already)

# isort: split
import multiprocessing  # the drop-in, unless AIOSHM_MP_DROPIN is unset

try:
    from test import _test_multiprocessing as _cpython_suite
    from test import support as _support
except ImportError as exc:  # e.g. a distro Python without its test package
    pytest.skip(f"test._test_multiprocessing is not importable: {exc!r}", allow_module_level=True)

START_METHOD = os.environ.get("AIOSHM_MP_START", "spawn")
EXPECTED = mp_alias.expected_name()

# The suite binds the API when it is imported: it must have seen the drop-in.
assert multiprocessing.__name__ == EXPECTED, (multiprocessing.__name__, EXPECTED)
assert _cpython_suite.multiprocessing.__name__ == EXPECTED, (
    _cpython_suite.multiprocessing.__name__,
    EXPECTED,
)
_cpython_suite.install_tests_in_module_dict(globals(), START_METHOD, only_type="processes")


class TestAioshmDropinActive(unittest.TestCase):
    """Proves the run exercised the intended module, in this process and in a child."""

    def test_parent_uses_expected_module(self) -> None:
        mp_alias.write_report("parent")
        self.assertEqual(sys.modules["multiprocessing"].__name__, EXPECTED)
        self.assertIs(_cpython_suite.multiprocessing, sys.modules["multiprocessing"])
        self.assertIs(_cpython_suite.ProcessesMixin.Queue, multiprocessing.Queue)

    def test_child_uses_expected_module(self) -> None:
        ctx = multiprocessing.get_context(START_METHOD)
        proc = ctx.Process(target=mp_alias.child_probe, args=(START_METHOD,))
        proc.start()
        proc.join(_support.LONG_TIMEOUT)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            self.fail("probe child did not finish")
        self.assertEqual(proc.exitcode, 0, f"child's multiprocessing is not {EXPECTED!r}")

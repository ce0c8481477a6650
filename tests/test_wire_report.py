"""Child outcome reports (``aioshm._wire._report``): round trips, and a fuzzed decoder that
accepts exactly the documented shapes and raises ``ProtocolError`` for everything else."""

from __future__ import annotations

import pickle
import traceback
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aioshm._exceptions import (
    ProcessExitedException,
    ProcessRaisedException,
    ProtocolError,
    RemoteTraceback,
)
from aioshm._process import Lost, rebuild_failure, run_and_report
from aioshm._wire import Raised, Returned, decode_report, encode_report
from aioshm._wire._report import MAX_TYPE_NAME

keys = st.none() | st.integers()
values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner),
    max_leaves=8,
)
exceptions = st.sampled_from(
    [None, ValueError("boom"), KeyboardInterrupt(), RuntimeError(1, 2), SystemExit(3)]
)
type_names = st.text(min_size=1, max_size=64)
reports = st.builds(Returned, values, keys) | st.builds(
    Raised, type_names, st.text(max_size=200), exceptions, keys
)


def _same(a: object, b: object) -> bool:
    if isinstance(a, BaseException) and isinstance(b, BaseException):
        return type(a) is type(b) and a.args == b.args
    return a == b


@settings(max_examples=300, deadline=None)
@given(reports)
def test_round_trip_through_pickle(report: Returned | Raised) -> None:
    """What a child encodes, pickled as a channel would, decodes to the same report."""
    got = decode_report(pickle.loads(pickle.dumps(encode_report(report))))
    assert type(got) is type(report)
    if isinstance(report, Returned):
        assert isinstance(got, Returned)
        assert got.value == report.value and got.key == report.key
    else:
        assert isinstance(got, Raised)
        assert (got.type_name, got.traceback, got.key) == (
            report.type_name,
            report.traceback,
            report.key,
        )
        assert _same(got.exception, report.exception)


anything = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | st.sampled_from(["ok", "raised", "lost", b"ok"])
    | exceptions,
    lambda inner: st.lists(inner, max_size=6).map(tuple) | st.lists(inner, max_size=6),
    max_leaves=12,
)


@settings(max_examples=500, deadline=None)
@given(anything)
def test_decode_accepts_valid_shapes_and_rejects_the_rest(msg: Any) -> None:
    """Any object: either a valid report (and then exactly the documented shape) or
    ``ProtocolError``; never another exception."""
    try:
        report = decode_report(msg)
    except ProtocolError:
        return
    assert type(msg) is tuple
    if isinstance(report, Returned):
        assert len(msg) == 3 and msg[0] == "ok" and msg[2] is report.value
    else:
        assert len(msg) == 5 and msg[0] == "raised"
        assert msg[2] is None or isinstance(msg[2], BaseException)
        assert isinstance(msg[3], str) and 0 < len(msg[3]) <= MAX_TYPE_NAME
        assert isinstance(msg[4], str)
    assert report.key is None or type(report.key) is int


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from(["ok", "raised"]),
    st.lists(st.none() | st.integers() | st.text(max_size=5) | exceptions, max_size=6),
)
def test_decode_of_tagged_tuples(tag: str, rest: list[Any]) -> None:
    """Tuples with a valid tag and random fields: checked field by field."""
    msg = (tag, *rest)
    try:
        decode_report(msg)
    except ProtocolError:
        return
    assert len(msg) == (3 if tag == "ok" else 5)


@pytest.mark.parametrize(
    "msg",
    [
        None,
        (),
        ["ok", None, 1],  # a list, not a tuple
        ("ok", None),
        ("ok", True, 1),  # a bool is no key
        ("ok", "job", 1),
        ("raised", None, "not an exception", "ValueError", "tb"),
        ("raised", None, None, "", "tb"),
        ("raised", None, None, "x" * (MAX_TYPE_NAME + 1), "tb"),
        ("raised", None, None, "ValueError", b"tb"),
        ("raised", None, ValueError(), "ValueError"),
        ("lost", None, None),
        (b"ok", None, 1),
    ],
)
def test_malformed_reports_are_protocol_errors(msg: object) -> None:
    with pytest.raises(ProtocolError):
        decode_report(msg)


# --------------------------------------------------------------------------- runner, rebuilder


def _boom() -> None:
    raise ValueError("boom")


def test_runner_reports_a_return_value_and_an_exception() -> None:
    sent: list[object] = []
    assert run_and_report(sent.append, lambda x: x * 2, (21,), {}, "the value") is None
    raised = run_and_report(sent.append, _boom, (), {}, "the value")
    assert isinstance(raised, ValueError)
    ok, failed = (decode_report(m) for m in sent)
    assert ok == Returned(42)
    assert isinstance(failed, Raised) and failed.type_name == "ValueError"
    assert "_boom" in failed.traceback and isinstance(failed.exception, ValueError)


def test_runner_names_a_value_that_cannot_be_sent() -> None:
    """The send of a return value fails (it does not pickle): a Raised PicklingError naming
    ``what`` and the value's type goes instead."""
    sent: list[object] = []

    def send(msg: object) -> None:
        if isinstance(msg, tuple) and msg[0] == "ok":
            raise TypeError("cannot pickle 'generator' object")
        sent.append(msg)

    failure = run_and_report(send, lambda: (i for i in ()), (), {}, "the return value of f()")
    assert isinstance(failure, pickle.PicklingError)
    (report,) = (decode_report(m) for m in sent)
    assert isinstance(report, Raised) and report.type_name == "_pickle.PicklingError"
    assert "the return value of f() cannot be sent" in report.traceback
    assert "generator" in report.traceback


def test_rebuild_raised_keeps_the_type_and_prints_the_traceback_once() -> None:
    tb = "Traceback (most recent call last):\n  child frame\nValueError: boom\n"
    error = rebuild_failure(Raised("ValueError", tb, ValueError("boom")), 1, who="p", pid=7)
    assert isinstance(error, ValueError) and isinstance(error.__cause__, RemoteTraceback)
    grouped = rebuild_failure(
        Raised("ValueError", tb, ValueError("boom")), 1, who="process 2", pid=7, index=2, group=True
    )
    assert isinstance(grouped, ProcessRaisedException)
    assert (grouped.error_index, grouped.pid, grouped.remote_traceback) == (2, 7, tb)
    assert "".join(traceback.format_exception(grouped)).count("child frame") == 1
    unpicklable = rebuild_failure(Raised("m.Locked", tb), 1, who="p", pid=7)
    assert isinstance(unpicklable, ProcessRaisedException)
    assert unpicklable.exc_type_name == "m.Locked"
    assert "".join(traceback.format_exception(unpicklable)).count("child frame") == 1


@pytest.mark.parametrize(
    ("report", "exitcode", "expected", "signal_name"),
    [
        (None, 0, None, None),
        (None, None, None, None),
        (Returned(1), 0, None, None),
        (Returned(1), -9, None, None),  # a Process that returned, then was killed: its value
        (None, 3, ProcessExitedException, None),
        (None, -9, ProcessExitedException, "SIGKILL"),
        (Lost(ProtocolError("torn")), -9, ProcessExitedException, "SIGKILL"),
        (Lost(ProtocolError("torn")), 0, ProcessRaisedException, None),
        (Raised("ValueError", "tb"), -9, ProcessRaisedException, None),  # complete: it raised
    ],
)
def test_rebuild_failure_table(
    report: Any, exitcode: int | None, expected: type | None, signal_name: str | None
) -> None:
    error = rebuild_failure(report, exitcode, who="process 0", pid=5)
    if expected is None:
        assert error is None
        return
    assert type(error) is expected
    if isinstance(error, ProcessExitedException):
        assert error.signal_name == signal_name and error.exit_code == exitcode


def test_rebuild_failure_of_a_rank_that_returned_and_was_killed() -> None:
    """Ranks follow torch: any non-zero exit is a failure, even after a value was sent."""
    error = rebuild_failure(Returned(1), -15, who="process 1", pid=5, index=1, group=True)
    assert isinstance(error, ProcessExitedException) and error.signal_name == "SIGTERM"

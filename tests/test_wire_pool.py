"""Pool records (``aioshm._wire._pool``): valid records decode to typed values; anything else
raises ``ProtocolError`` and nothing else (fuzzed), in the worker and in the parent. A task's
outcome is the shared outcome report (``test_wire_report.py``); only ``init-failed`` is the
pool's own."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aioshm import ProtocolError
from aioshm._process import raised_report
from aioshm._wire._pool import Task, decode_init_failed, decode_task, init_failed_record
from aioshm._wire._report import Raised, Returned, decode_report, encode_report

ATOMS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.sampled_from(["ok", "raised", "bad-task", "init-failed", "", "OK"]),
    st.just(ValueError("x")),
    st.just(len),
)
ANY = st.recursive(
    ATOMS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6).map(tuple),
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=3), st.integers()), inner, max_size=3),
    ),
    max_leaves=12,
)


def test_valid_records_round_trip() -> None:
    assert decode_task(None) is None
    task = decode_task((7, len, ([1, 2],), {}))
    assert task == Task(7, len, ([1, 2],), {})
    ok = Returned([1], 3)
    assert decode_report(encode_report(ok)) == ok
    raised = raised_report(ValueError("no"), 3)
    got = decode_report(pickle.loads(pickle.dumps(encode_report(raised))))
    assert isinstance(got, Raised)
    assert (got.key, got.type_name, got.traceback) == (3, "ValueError", raised.traceback)
    assert type(got.exception) is ValueError and got.exception.args == ("no",)
    # a task the worker could not unpickle: a raised report without a job id
    assert decode_report(("raised", None, None, "AttributeError", "tb")) == Raised(
        "AttributeError", "tb"
    )
    init = init_failed_record(encode_report(raised_report(RuntimeError("init"))))
    assert init[0] == "init-failed"
    failed = decode_init_failed(pickle.loads(pickle.dumps(init)))
    assert failed is not None and failed.type_name == "RuntimeError" and failed.key is None
    assert isinstance(failed.exception, RuntimeError)
    # an outcome report is no init-failed record
    assert decode_init_failed(encode_report(ok)) is None
    assert decode_init_failed(encode_report(raised)) is None


@pytest.mark.parametrize(
    "msg",
    [
        (1, 2, 3),  # too short
        ("1", len, (), {}),  # job id not an int
        (1, "len", (), {}),  # not callable
        (1, len, [1], {}),  # args not a tuple
        (1, len, (), {1: 2}),  # kwds keys not str
        [1, len, (), {}],  # not a tuple
    ],
)
def test_bad_tasks_are_protocol_errors(msg: Any) -> None:
    with pytest.raises(ProtocolError):
        decode_task(msg)


@pytest.mark.parametrize(
    "msg",
    [
        ("init-failed", 3, None, "E", "tb"),  # the initializer's failure names no job
        ("init-failed", None, "not an exception", "E", "tb"),
        ("init-failed", None, None, "", "tb"),
        ("init-failed", None, None, "E" * 5000, "tb"),
        ("init-failed", None, None, "E", b"tb"),
        ("init-failed", None, None, "E"),
    ],
)
def test_bad_init_failed_records_are_protocol_errors(msg: Any) -> None:
    with pytest.raises(ProtocolError):
        decode_init_failed(msg)


@settings(max_examples=500, deadline=None)
@given(ANY)
def test_fuzzed_task_records(msg: Any) -> None:
    try:
        task = decode_task(msg)
    except ProtocolError:
        return
    assert task is None or (type(task.job_id) is int and callable(task.fn))


@settings(max_examples=500, deadline=None)
@given(ANY)
def test_fuzzed_worker_records(msg: Any) -> None:
    """What a worker sends is an outcome report or an init-failed record, or ProtocolError."""
    try:
        init = decode_init_failed(msg)
    except ProtocolError:
        return
    if init is not None:
        assert isinstance(init, Raised) and init.key is None
        return
    try:
        report = decode_report(msg)
    except ProtocolError:
        return
    assert isinstance(report, Returned | Raised)
    assert report.key is None or type(report.key) is int


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(st.none(), st.integers()),
    ANY,
    st.text(max_size=20),
    st.text(max_size=20),
)
def test_fuzzed_init_failed_fields(key: Any, value: Any, name: str, tb: str) -> None:
    try:
        init = decode_init_failed(("init-failed", key, value, name, tb))
    except ProtocolError:
        return
    assert init is not None and init.type_name == name and init.traceback == tb

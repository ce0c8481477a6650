"""Pool records (``aioshm._wire._pool``): valid records decode to typed values; anything else
raises ``ProtocolError`` and nothing else (fuzzed), in the worker and in the parent."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aioshm import ProtocolError
from aioshm._wire._pool import Result, Task, decode_result, decode_task, encode_result

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
    ok = Result("ok", 3, [1])
    assert decode_result(encode_result(ok)) == ok
    raised = Result("raised", 3, ValueError("no"), "ValueError", "Traceback...")
    got = decode_result(pickle.loads(pickle.dumps(encode_result(raised))))
    assert (got.tag, got.job_id, got.type_name, got.traceback) == (
        "raised",
        3,
        "ValueError",
        "Traceback...",
    )
    assert type(got.value) is ValueError and got.value.args == ("no",)
    assert decode_result(("bad-task", None, None, "AttributeError", "tb")).tag == "bad-task"
    assert decode_result(("init-failed", None, None, "RuntimeError", "tb")).job_id is None


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
        (),
        ("ok", 1),
        ("ok", "1", 2),
        ("raised", None, None, "E", "tb"),  # a task's failure names its job
        ("bad-task", 3, None, "E", "tb"),  # ... and a bad task none
        ("raised", 1, "not an exception", "E", "tb"),
        ("raised", 1, None, "", "tb"),
        ("raised", 1, None, "E" * 5000, "tb"),
        ("raised", 1, None, "E", b"tb"),
        ("done", 1, 2),
        (None, 1, 2),
        ["ok", 1, 2],
    ],
)
def test_bad_results_are_protocol_errors(msg: Any) -> None:
    with pytest.raises(ProtocolError):
        decode_result(msg)


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
def test_fuzzed_result_records(msg: Any) -> None:
    try:
        result = decode_result(msg)
    except ProtocolError:
        return
    assert result.tag in {"ok", "raised", "bad-task", "init-failed"}
    assert isinstance(result, Result)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["ok", "raised", "bad-task", "init-failed"]),
    st.one_of(st.none(), st.integers()),
    ANY,
    st.text(max_size=20),
    st.text(max_size=20),
)
def test_fuzzed_result_fields(tag: str, job_id: Any, value: Any, name: str, tb: str) -> None:
    msg = ("ok", job_id, value) if tag == "ok" else (tag, job_id, value, name, tb)
    try:
        decode_result(msg)
    except ProtocolError:
        pass

"""Wire schemas: every message round-trips; bad bytes raise typed errors. No broker needed."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest
from goodserve.schemas import (
    MESSAGE_TYPES,
    SCHEMA_VERSION,
    AgentRequest,
    DeadLetter,
    ErrorInfo,
    Message,
    Result,
    SamplingParams,
    decode,
    encode,
    json_schemas,
    to_builtins,
    type_name,
)

from goodserve.errors import MalformedMessage, SchemaError, UnsupportedSchemaVersion


def _request(i: int = 0, **kw: object) -> AgentRequest:
    base: dict[str, object] = {
        "request_id": f"req-{i}",
        "model": "llama-2-7b",
        "task": "code",
        "workflow_id": "wf-1",
        "step": i,
        "prompt": "def f(x):\n    return x  # \u00fcnicode \u2603",
        "input_tokens": 12,
        "max_tokens": 256,
        "sampling": SamplingParams(temperature=0.0, seed=7, stop_token_ids=[2]),
        "arrival": 1_700_000_000.25,
        "slo_s": 4.5,
        "ttft_slo_s": 0.5,
        "priority": 1,
        "output_tokens_hint": 80,
        "metadata": {"agent": "swe", "tool": "bash"},
    }
    base.update(kw)
    return AgentRequest(**base)  # type: ignore[arg-type]


def _value(t: mi.Type, name: str, full: bool) -> Any:
    """A non-default value of type ``t`` (``full``: also fill every optional field)."""
    if isinstance(t, mi.UnionType):
        non_none = [x for x in t.types if not isinstance(x, mi.NoneType)]
        return _value(non_none[0], name, full)
    if isinstance(t, mi.LiteralType):
        return t.values[-1]
    if isinstance(t, mi.BoolType):
        return True
    if isinstance(t, mi.IntType):
        return 7
    if isinstance(t, mi.FloatType):
        return 1.25
    if isinstance(t, mi.StrType):
        return f"{name}-\u00fc\u2603"
    if isinstance(t, mi.BytesType):
        return b"\x00\xff" + name.encode()
    if isinstance(t, mi.ListType):
        return [_value(t.item_type, name, full) for _ in range(2)]
    if isinstance(t, mi.DictType):
        return {"k": _value(t.value_type, name, full)}
    if isinstance(t, mi.StructType):
        return _build(t.cls, full)
    raise AssertionError(f"no sample value for {t!r} ({name})")


def _build(cls: type[Any], full: bool) -> Any:
    """An instance of a Struct: required fields only, or every field set (``full``)."""
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    kw = {
        f.name: _value(f.type, f.name, full)
        for f in info.fields
        if f.required or (full and f.name != "v")
    }
    return cls(**kw)


def samples() -> list[Message]:
    """Every message type twice (required fields only; every field set), plus hand-made ones."""
    out: list[Message] = []
    for t in MESSAGE_TYPES:
        out += [_build(t, full=False), _build(t, full=True)]
    out += [
        _request(1),
        _request(2, prompt=None, prompt_token_ids=[1, 2, 3], deadline=1.7e9, slo_s=None),
        Result(
            request_id="req-1",
            status="error",
            output_token_ids=[1, 2],
            error=ErrorInfo(code="engine", message="boom", retriable=True),
        ),
        DeadLetter(
            service="dispatcher",
            topic="goodserve.requests",
            partition=3,
            offset=99,
            key=b"\x00\xffkey",
            payload=b"\x00\x01not json\xff",
            error_code="unsupported_version",
            reason="v 9",
            at=1.0,
        ),
    ]
    return out


SAMPLES = samples()


def test_samples_cover_every_message_type() -> None:
    assert {type(m) for m in SAMPLES} == set(MESSAGE_TYPES)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: f"{type_name(m)}")
def test_round_trip(msg: Message) -> None:
    data = encode(msg)
    assert decode(data) == msg
    assert decode(data, type(msg)) == msg
    assert json.loads(data)["kind"] == type_name(msg)
    assert json.loads(data)["v"] == SCHEMA_VERSION
    # plain builtins (files, reports) convert back to the same message
    assert msgspec.convert(to_builtins(msg), type(msg)) == msg


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type_name(m))
def test_unknown_version_is_unsupported(msg: Message) -> None:
    obj = json.loads(encode(msg))
    obj["v"] = 99
    with pytest.raises(UnsupportedSchemaVersion) as ei:
        decode(json.dumps(obj).encode())
    assert ei.value.code == "unsupported_version"
    assert not ei.value.retriable
    with pytest.raises(UnsupportedSchemaVersion):
        decode(json.dumps(obj).encode(), type(msg))


def test_unknown_version_with_broken_fields_is_still_unsupported() -> None:
    """A future version may change fields: the version, not the fields, is the reason."""
    data = json.dumps({"kind": "agent_request", "v": 2, "request_id": 5, "new": []}).encode()
    with pytest.raises(UnsupportedSchemaVersion):
        decode(data)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage",
        b"\x00\x01\x02",
        b"{",
        b"[]",
        b"null",
        b'{"kind": "no_such_kind", "v": 1}',
        b'{"v": 1, "request_id": "x"}',
        b'{"kind": "agent_request", "v": 1}',
        b'{"kind": "agent_request", "v": 1, "request_id": 3}',
        b'{"kind": "agent_request", "v": "1", "request_id": "x"}',
    ],
)
def test_garbage_is_malformed(data: bytes) -> None:
    with pytest.raises(MalformedMessage) as ei:
        decode(data)
    assert isinstance(ei.value, SchemaError)
    assert ei.value.code == "malformed"


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type_name(m))
def test_truncated_is_malformed(msg: Message) -> None:
    data = encode(msg)
    for cut in (1, len(data) // 2, len(data) - 1):
        with pytest.raises(MalformedMessage):
            decode(data[:cut])


def test_typed_decode_rejects_other_kind() -> None:
    with pytest.raises(MalformedMessage):
        decode(encode(Result(request_id="r", status="ok")), AgentRequest)


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    obj = json.loads(encode(_request(1)))
    obj["added_in_a_later_minor"] = {"x": 1}
    assert decode(json.dumps(obj).encode()) == _request(1)


def test_json_schema_names_every_message() -> None:
    schema = json_schemas()
    defs = schema["$defs"]
    for t in MESSAGE_TYPES:
        assert t.__name__ in defs, t
        props = defs[t.__name__]["properties"]
        assert "v" in props and "kind" in props
    refs = {r["$ref"] for r in schema["anyOf"]}
    assert refs == {f"#/$defs/{t.__name__}" for t in MESSAGE_TYPES}
    json.dumps(schema)  # serializable

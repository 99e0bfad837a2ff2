"""The checked-in JSON Schema matches the code (regenerate: goodserve schema --out ...)."""

from __future__ import annotations

import json
from pathlib import Path

from goodserve.schemas import MESSAGE_TYPES
from goodserve.schemas.codec import json_schemas_text

FILE = Path(__file__).resolve().parents[1] / "schemas" / "jsonschema" / "messages.json"


def test_checked_in_schema_is_current() -> None:
    assert FILE.read_text() == json_schemas_text(), (
        "run: goodserve schema --out schemas/jsonschema/messages.json"
    )


def test_schema_names_every_message_with_version_and_kind() -> None:
    doc = json.loads(FILE.read_text())
    for t in MESSAGE_TYPES:
        props = doc["$defs"][t.__name__]["properties"]
        assert "kind" in props and "v" in props, t.__name__

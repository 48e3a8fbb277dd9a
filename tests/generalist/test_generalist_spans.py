"""The extraction answer's schema, token budget and parsing (no engine needed)."""

from __future__ import annotations

import json

import pytest

from appliance.engines.generalist import parse_span_answer, span_budget, span_schema
from appliance.errors import ApplianceError

SLOTS = ["date", "time", "first_name"]


def test_the_budget_holds_the_longest_answer_the_schema_allows() -> None:
    # Every character written as a 6-byte escape, every span as long as allowed, the longest label.
    longest = {"spans": [{"label": "first_name", "text": "\x01" * 48} for _ in range(8)]}
    written = json.dumps(longest, separators=(",", ":"))
    assert "\\u0001" in written
    assert len(written.encode()) + 1 <= span_budget(SLOTS, 8, 48)  # + the end-of-sequence token
    assert span_budget(SLOTS, 8, 48) < len(written.encode()) + 16  # and is not much more


def test_the_schema_names_the_slots_and_bounds_the_answer() -> None:
    schema = span_schema(SLOTS, 3, 20)
    spans = schema["properties"]["spans"]
    assert spans["maxItems"] == 3
    assert spans["items"]["properties"]["label"] == {"enum": SLOTS}
    assert spans["items"]["properties"]["text"]["maxLength"] == 20
    assert spans["items"]["additionalProperties"] is False


def test_an_answer_parses_into_claims_raw_control_characters_included() -> None:
    claims = parse_span_answer(
        '{"spans":[{"label":"time","text":"7\tpm"},{"label":"date","text":"Friday"}]}', SLOTS
    )
    assert [(c.label, c.text) for c in claims] == [("time", "7\tpm"), ("date", "Friday")]
    assert parse_span_answer('{"spans":[]}', SLOTS) == []


@pytest.mark.parametrize(
    "answer", ['{"spans":[{"label":"colour","text":"red"}]}', '{"spans":[{"label":"time"', '{"items":[]}']
)
def test_anything_else_is_an_error_not_a_guess(answer: str) -> None:
    with pytest.raises(ApplianceError):
        parse_span_answer(answer, SLOTS)

"""Policy resolution and the load-time label-set check."""

from __future__ import annotations

import asyncio

import pytest
from scripted_generalist import ScriptedGeneralist

from appliance.errors import FailedPrecondition, InvalidArgument, Unavailable
from appliance.router.policy import check_label_set, parse_policy, resolve_policy
from appliance.types import Policy

SPEC, CASC, GEN = Policy.SPECIALIST_ONLY, Policy.CASCADE, Policy.GENERALIST_ONLY


@pytest.mark.parametrize(
    ("requested", "model_default", "generalist", "expected"),
    [
        # The request's own policy wins, generalist or not (the cascade refuses what it can't do).
        (SPEC, "cascade", True, SPEC),
        (GEN, "specialist_only", True, GEN),
        (CASC, "specialist_only", False, CASC),
        (GEN, None, False, GEN),
        # Unspecified: the model's default ...
        (None, "specialist_only", True, SPEC),
        (None, "generalist_only", True, GEN),
        (None, "cascade", True, CASC),
        (None, None, True, CASC),  # a manifest without a default: cascade
        ("", "generalist_only", True, GEN),
        # ... unless there is no generalist: specialist_only.
        (None, "cascade", False, SPEC),
        (None, "generalist_only", False, SPEC),
        (None, None, False, SPEC),
    ],
)
def test_resolution_table(
    requested: Policy | str | None, model_default: str | None, generalist: bool, expected: Policy
) -> None:
    assert resolve_policy(requested, model_default, generalist_configured=generalist) is expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("cascade", CASC),
        ("CASCADE", CASC),
        ("specialist-only", SPEC),
        (" generalist_only ", GEN),
        ("POLICY_GENERALIST_ONLY", GEN),
        ("POLICY_UNSPECIFIED", None),
        ("unspecified", None),
        ("", None),
        (None, None),
        (CASC, CASC),
    ],
)
def test_policy_names_parse(text: str | Policy | None, expected: Policy | None) -> None:
    assert parse_policy(text) is expected


def test_an_unknown_policy_name_is_invalid_and_lists_the_known_ones() -> None:
    with pytest.raises(
        InvalidArgument, match=r"unknown policy 'fastest'; known: specialist_only, cascade, generalist_only"
    ):
        parse_policy("fastest")
    with pytest.raises(InvalidArgument, match="unknown policy"):
        resolve_policy(None, "best", generalist_configured=True)


def test_a_label_set_too_large_for_the_generalist_fails_at_set_up() -> None:
    generalist = ScriptedGeneralist(max_labels=3)
    asyncio.run(check_label_set(["a", "b", "c"], None, generalist))
    with pytest.raises(FailedPrecondition, match="4 labels: 4 labels do not fit; at most 3"):
        asyncio.run(check_label_set(["a", "b", "c", "d"], {"a": "the first"}, generalist))


def test_without_a_generalist_there_is_nothing_to_check() -> None:
    asyncio.run(check_label_set([f"l{i}" for i in range(1000)], None, None))


def test_the_check_sees_the_label_set_and_only_label_errors_become_failed_precondition() -> None:
    ok = ScriptedGeneralist()
    asyncio.run(check_label_set(("x", "y"), {"x": "ex"}, ok))
    assert ok.checked == [(["x", "y"], {"x": "ex"})]
    with pytest.raises(FailedPrecondition, match="too long"):
        asyncio.run(
            check_label_set(["x", "y"], None, ScriptedGeneralist(check_error=InvalidArgument("too long")))
        )
    # A dead generalist is not the label set's fault: it keeps its own status.
    with pytest.raises(Unavailable):
        asyncio.run(check_label_set(["x", "y"], None, ScriptedGeneralist(check_error=Unavailable("down"))))

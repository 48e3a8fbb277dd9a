"""Which route a request may take: the effective policy, and the label-set check at load time.

Resolution, first match wins:

1. the request names a policy: that policy. If it needs the generalist and none is configured,
   the cascade refuses with FAILED_PRECONDITION (or falls back when the caller allows it);
2. no generalist is configured: ``specialist_only``. The model's default policy states how it
   should be served *when* a generalist is there; a box without one still serves the model
   rather than failing every request that did not ask for anything in particular;
3. the model's default policy (manifest ``"default_policy"``);
4. ``cascade``, for a model whose manifest names no default.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from appliance.engines.generalist_api import Generalist
from appliance.errors import FailedPrecondition, InvalidArgument
from appliance.types import Policy

DEFAULT_POLICY = Policy.CASCADE
_PREFIX = "policy_"  # the proto enum's names: POLICY_CASCADE, ...
_UNSPECIFIED = frozenset({"", "unspecified", "default"})


def parse_policy(value: str | Policy | None) -> Policy | None:
    """A policy from an enum, a name ("cascade", "specialist-only", "POLICY_CASCADE") or None.

    None, "" and "unspecified" mean "not stated" and give None.
    """
    if value is None or isinstance(value, Policy):
        return value
    if not isinstance(value, str):
        raise InvalidArgument(f"a policy must be a string, got {type(value).__name__}")
    key = value.strip().lower().replace("-", "_")
    key = key.removeprefix(_PREFIX)
    if key in _UNSPECIFIED:
        return None
    try:
        return Policy(key)
    except ValueError:
        known = ", ".join(p.value for p in Policy)
        raise InvalidArgument(f"unknown policy {value!r}; known: {known}") from None


def resolve_policy(
    requested: str | Policy | None, model_default: str | Policy | None, generalist_configured: bool
) -> Policy:
    """The policy a request runs under (see the module docstring for the order)."""
    stated = parse_policy(requested)
    if stated is not None:
        return stated
    if not generalist_configured:
        return Policy.SPECIALIST_ONLY
    return parse_policy(model_default) or DEFAULT_POLICY


def needs_generalist(policy: Policy) -> bool:
    return policy is not Policy.SPECIALIST_ONLY


async def check_label_set(
    labels: Sequence[str], descriptions: Mapping[str, str] | None, generalist: Generalist | None
) -> None:
    """Fail now, not per request, when the generalist cannot classify over this label set.

    Raises FailedPrecondition with the generalist's reason (typically: the zero-shot prompt for
    this many labels does not fit its window). Without a generalist there is nothing to check.
    """
    if generalist is None:
        return
    try:
        await generalist.check_label_set(list(labels), dict(descriptions or {}))
    except InvalidArgument as e:  # the label set's fault; Unavailable etc. pass through as they are
        raise FailedPrecondition(
            f"the generalist cannot classify over this model's {len(labels)} labels: {e.message}"
        ) from e

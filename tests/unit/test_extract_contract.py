"""The Extract call's rules that need no server: its scopes, and which KServe outputs each kind of
model answers."""

from __future__ import annotations

import pytest

from appliance.api.kserve import OUTPUT_NAMES, OUTPUT_SPANS, outputs_for
from appliance.errors import InvalidArgument
from appliance.security.interceptor import DEFAULT_RULES
from appliance.security.tokens import has_scope, validate_scope


def test_extract_scopes_name_a_model_or_every_model() -> None:
    assert validate_scope("extract:restaurant8k") == "extract:restaurant8k"
    assert validate_scope("extract:*") == "extract:*"
    with pytest.raises(InvalidArgument, match="extract:<model>"):
        validate_scope("extract:")
    assert has_scope(["extract:*"], "extract:r8k")
    assert not has_scope(["extract:*"], "classify:r8k")
    assert not has_scope(["classify:*"], "extract:r8k")
    assert has_scope(["admin"], "extract:r8k")


def test_extract_needs_the_extract_scope_and_the_classifiers_when_it_names_one() -> None:
    rule = DEFAULT_RULES["/appliance.v1.InferenceService/Extract"]
    assert (rule.scope, rule.model_field) == ("extract", "model")
    assert rule.also == (("classify", "classify_model"),)
    kserve = DEFAULT_RULES["/inference.GRPCInferenceService/ModelInfer"]
    # a workflow's name answers too; the servicer checks the workflow scope itself
    assert (kserve.scope, kserve.or_kinds) == ("classify", ("extract", "workflow"))


def test_each_kind_answers_only_its_own_kserve_outputs() -> None:
    assert outputs_for("span_extractor", "r8k", ()) == (OUTPUT_SPANS,)
    assert outputs_for("classifier", "b8", ()) == OUTPUT_NAMES
    assert outputs_for("classifier", "b8", ("SCORE",)) == ("SCORE",)
    with pytest.raises(InvalidArgument, match=r"r8k.*span_extractor.*LABEL"):
        outputs_for("span_extractor", "r8k", ("LABEL",))
    with pytest.raises(InvalidArgument, match=r"classifier.*SPANS"):
        outputs_for("classifier", "b8", ("SPANS",))

"""The workflow format without a store: shapes, references, templates, cycles, each error located."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from appliance.workflows.spec import WorkflowInvalid, load_spec, load_spec_text, parse_duration

GOOD = """\
name: support
timeout: 5s
steps:
  - id: intent
    kind: classify
    model: b8
    policy: cascade
    threshold: 0.8
  - id: slots
    kind: extract
    model: r8k:1
  - id: urgent
    kind: branch
    when: {step: intent, label_in: [lost_or_stolen_card]}
    then: [reply]
  - id: reply
    kind: generate
    prompt: "Customer: {{input}} ({{ intent.label }}, at {{slots.time}})"
    on_failure: fallback
    fallback_text: "We will get back to you."
"""


def problems(text: str) -> list[str]:
    with pytest.raises(WorkflowInvalid) as info:
        load_spec_text(textwrap.dedent(text), source="w.yaml")
    return [str(p) for p in info.value.problems]


def test_a_good_workflow_reads_into_waves_and_gates_and_round_trips() -> None:
    spec = load_spec_text(GOOD)
    assert spec.order() == [["intent", "slots"], ["urgent"], ["reply"]]
    assert spec.gates() == {"reply": [("urgent", True)]}
    assert spec.timeout == 5.0
    assert spec.step("slots").pinned_version == 1  # type: ignore[union-attr]
    assert load_spec_text(spec.to_yaml()) == spec


def test_a_file_error_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "w.yaml"
    path.write_text(GOOD.replace("    threshold: 0.8", "    treshold: 0.8"), encoding="utf-8")
    with pytest.raises(WorkflowInvalid) as info:
        load_spec(path)
    (problem,) = info.value.problems
    assert str(problem) == f"{path}:8: steps.0.treshold: unknown field 'treshold'"


def test_a_cycle_is_located_at_its_first_step() -> None:
    found = problems(
        """\
        name: loop
        steps:
          - id: a
            kind: generate
            prompt: "{{b.text}}"
          - id: b
            kind: generate
            prompt: "{{a.text}}"
        """
    )
    assert found == ["w.yaml:3: steps form a cycle: a -> b -> a"]


def test_templates_may_name_only_known_steps_and_their_fields() -> None:
    found = problems(
        """\
        name: t
        steps:
          - id: intent
            kind: classify
            model: b8
          - id: reply
            kind: generate
            prompt: "{{intent.lable}} {{nobody}} {{input.x}} {{reply.text}}"
        """
    )
    assert found == [
        "w.yaml:8: step 'reply': prompt names {{intent.lable}}, but a classify step has fields "
        "confidence, label, route",
        "w.yaml:8: step 'reply': prompt names {{nobody}}, an unknown step",
        "w.yaml:8: step 'reply': prompt names {{input.x}}, but the input has no fields",
        "w.yaml:8: step 'reply': prompt names its own output {{reply.text}}",
    ]


def test_bad_shapes_are_all_reported_with_their_lines() -> None:
    found = problems(
        """\
        name: Bad Name
        steps:
          - id: one
            kind: teleport
          - id: two
            kind: classify
            model: ../etc
            policy: specialist
            threshold: 0.5
          - id: three
            kind: branch
            when: {step: two, label_in: [a], confidence_below: 0.3}
            then: [one]
        """
    )
    assert found[0].startswith("w.yaml:1: name: invalid workflow name 'Bad Name'")
    assert found[1].startswith("w.yaml:4: steps.0: unknown step kind")
    assert found[2].startswith("w.yaml:6: steps.1: threshold applies to policy cascade only") or any(
        "invalid model name '../etc'" in p for p in found
    )
    assert any(p.startswith("w.yaml:12:") and "exactly one of" in p for p in found), found


def test_conditions_need_the_right_kind_of_step_and_branches_known_targets() -> None:
    found = problems(
        """\
        name: c
        steps:
          - id: slots
            kind: extract
            model: r8k
          - id: check
            kind: branch
            when:
              - {step: slots, label_in: [time]}
              - {step: ghost, field_present: time}
            then: [nowhere]
        """
    )
    assert found == [
        "w.yaml:9: branch 'check': label_in needs a classify step, and 'slots' is a extract step",
        "w.yaml:10: branch 'check': condition on unknown step 'ghost'",
        "w.yaml:11: branch 'check': then names unknown step 'nowhere'",
    ]


def test_not_yaml_and_not_a_mapping_are_located() -> None:
    assert problems("name: [unclosed\n")[0].startswith("w.yaml:2: not valid YAML")
    assert problems("- just\n- a list\n") == ["w.yaml:1: a workflow is a YAML mapping with name and steps"]


@pytest.mark.parametrize(("value", "seconds"), [(2, 2.0), ("500ms", 0.5), ("1.5s", 1.5), ("1m", 60.0)])
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", [0, -1, "2h", "soon", True, 7200])
def test_bad_durations(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)

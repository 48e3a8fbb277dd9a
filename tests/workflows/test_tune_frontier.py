"""The tuning maths on fixed cached outputs: candidates, end-to-end scores, frontier, choice.

Each expected figure is derived in the test from the cached answers it sets up, by the rule the
module states (a cascade at t keeps the specialist's answer when its confidence is >= t)."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.errors import InvalidArgument
from appliance.workflows.spec import StepPolicy, load_spec_text
from appliance.workflows.tune import (
    Answers,
    Configuration,
    StepChoice,
    StepOutputs,
    choose,
    configurations,
    frontier,
    step_candidates,
    tuned_spec,
)

TRUTH = ["a", "b", "a", "c", "b", "a"]
CONF = np.array([0.95, 0.40, 0.85, 0.30, 0.70, 0.99])
SPEC_LABELS = ["a", "a", "a", "b", "b", "a"]  # wrong on texts 1 and 3: the unconfident ones
SMALL = ["a", "b", "b", "b", "b", "a"]  # right on 1, wrong on 2 and 3
LARGE = ["a", "b", "a", "c", "b", "c"]  # right except 5


def outputs(step: str = "intent", keep: list[bool] | None = None) -> StepOutputs:
    n = len(TRUTH)
    return StepOutputs(
        step=step,
        truth=TRUTH,
        specialist=Answers(SPEC_LABELS, np.full(n, 0.001)),
        confidence=CONF,
        keep=np.array(keep or [False] * n),
        generalists={"small": Answers(SMALL, np.full(n, 0.1)), "large": Answers(LARGE, np.full(n, 1.0))},
        threshold=0.8,
    )


def by_choice(scored: list, choice: StepChoice):  # type: ignore[no-untyped-def]
    return next(s for s in scored if s.choice == choice)


def test_a_cascade_takes_the_generalist_answer_and_price_below_its_threshold() -> None:
    scored = step_candidates(outputs(), [0.5])
    # specialist, then per generalist: cascade at 0.5 and at the model's 0.8, and alone
    assert len(scored) == 1 + 2 * (2 + 1)
    cascade = by_choice(scored, StepChoice(StepPolicy.CASCADE, 0.5, "large"))
    below = CONF < 0.5  # texts 1 and 3 go to the large generalist, which gets both right
    expected = np.where(below, np.array(LARGE) == np.array(TRUTH), np.array(SPEC_LABELS) == np.array(TRUTH))
    assert cascade.correct.tolist() == expected.tolist() == [True] * 6
    assert cascade.prices.tolist() == np.where(below, 1.0, 0.001).tolist()
    at_model = by_choice(scored, StepChoice(StepPolicy.CASCADE, 0.8, "small"))
    assert at_model.correct.tolist() == [
        True,
        True,
        True,
        False,
        True,
        True,
    ]  # text 4 (0.70) to small: b, right
    alone = by_choice(scored, StepChoice(StepPolicy.GENERALIST, None, "large"))
    assert alone.correct.tolist() == (np.array(LARGE) == np.array(TRUTH)).tolist()


def test_a_text_rejected_as_out_of_scope_is_never_escalated() -> None:
    keep = [False, True, False, False, False, False]
    cascade = by_choice(
        step_candidates(outputs(keep=keep), [0.5]), StepChoice(StepPolicy.CASCADE, 0.5, "large")
    )
    assert cascade.prices[1] == 0.001 and not cascade.correct[1]


def test_the_frontier_is_cheapest_first_and_strictly_more_accurate() -> None:
    configs = configurations([outputs()], [0.5, 0.9])
    points = frontier(configs)
    prices = [p.price_per_1000 for p in points]
    accuracies = [p.accuracy for p in points]
    assert prices == sorted(prices) and accuracies == sorted(set(accuracies))
    for c in configs:  # nothing off the frontier beats a point on both axes
        assert not any(c.price_per_1000 < p.price_per_1000 and c.accuracy > p.accuracy for p in points)
    assert points[0].choices["intent"].policy is StepPolicy.SPECIALIST
    assert points[0].accuracy == pytest.approx(4 / 6) and points[0].price_per_1000 == pytest.approx(1.0)
    assert points[-1].accuracy == 1.0


def test_the_choice_is_the_cheapest_meeting_the_target_or_the_best_within_the_budget() -> None:
    configs = configurations([outputs()], [0.5, 0.9])
    chosen = choose(configs, 0.8, None)
    assert chosen is not None and chosen.accuracy >= 0.8
    assert all(c.price_per_1000 >= chosen.price_per_1000 for c in configs if c.accuracy >= 0.8)
    # cascade at 0.5 to small: texts 1 and 3 escalated, 1 put right (5 of 6), 2 of 6 texts at 0.1
    assert chosen.choices["intent"] == StepChoice(StepPolicy.CASCADE, 0.5, "small")
    assert chosen.accuracy == pytest.approx(5 / 6)
    assert chosen.price_per_1000 == pytest.approx(1000 * (2 * 0.1 + 4 * 0.001) / 6)
    within = choose(configs, None, 100.0)
    assert within is not None and within.price_per_1000 <= 100.0
    assert within.accuracy == max(c.accuracy for c in configs if c.price_per_1000 <= 100.0)
    assert choose(configs, 0.8, 1.0) is None  # the target is out of reach at that price
    with pytest.raises(InvalidArgument):
        choose(configs, None, None)


def test_two_steps_are_scored_end_to_end() -> None:
    first, second = outputs("intent"), outputs("topic")
    configs = configurations([first, second], [0.5])
    assert len(configs) == 7 * 7
    both_specialist = next(
        c for c in configs if all(ch.policy is StepPolicy.SPECIALIST for ch in c.choices.values())
    )
    # the same 4 of 6 texts right on each step: 4 of 6 end to end, and twice the price
    assert both_specialist.accuracy == pytest.approx(4 / 6)
    assert both_specialist.price_per_1000 == pytest.approx(2.0)
    mixed = next(
        c
        for c in configs
        if c.choices["intent"].policy is StepPolicy.SPECIALIST
        and c.choices["topic"] == StepChoice(StepPolicy.GENERALIST, None, "large")
    )
    right = (np.array(SPEC_LABELS) == np.array(TRUTH)) & (np.array(LARGE) == np.array(TRUTH))
    assert mixed.accuracy == pytest.approx(right.mean())


def test_mismatched_outputs_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="every route must answer"):
        StepOutputs("x", TRUTH, Answers(SPEC_LABELS[:3], np.zeros(3)), CONF, np.zeros(6, bool), {})


def test_the_tuned_spec_carries_the_choice_and_reads_back() -> None:
    spec = load_spec_text(
        "name: tickets\nsteps:\n  - id: intent\n    kind: classify\n    model: b8\n"
        "  - id: reply\n    kind: generate\n    prompt: 'Reply to {{input}} about {{intent.label}}'\n"
    )
    chosen = Configuration({"intent": StepChoice(StepPolicy.CASCADE, 0.7, "large")}, 0.9, 1.0)
    text = tuned_spec(spec, chosen).to_yaml()
    again = load_spec_text(text)
    step = again.step("intent")
    assert (step.policy, step.threshold, step.generalist) == (StepPolicy.CASCADE, 0.7, "large")  # type: ignore[union-attr]
    assert again.step("reply") == spec.step("reply")

"""The self-check set's file round trip and its scoring against the bound."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from appliance.artifact.selfcheck import SELF_CHECK_FILE, SelfCheckSet, score


def probs_for(labels: list[int], n_labels: int = 3, top: float = 0.8) -> np.ndarray:
    out = np.full((len(labels), n_labels), (1.0 - top) / (n_labels - 1), dtype=np.float32)
    out[np.arange(len(labels)), labels] = top
    return out


def test_the_set_round_trips_and_scores_its_own_answers_as_full_agreement(tmp_path: Path) -> None:
    published, fp32 = probs_for([0, 1, 2, 2]), probs_for([0, 1, 2, 1])
    check = SelfCheckSet.from_probs(["a", "b", "c", "d"], np.array([0, 1, 1, 1]), published, fp32)
    check.save(tmp_path)
    loaded = SelfCheckSet.load(tmp_path / SELF_CHECK_FILE)
    assert loaded == check and loaded.texts == ["a", "b", "c", "d"]
    result = score(loaded, published, bound=0.98, cpu="test")
    assert (result.agreement, result.fp32_agreement, result.accuracy) == (1.0, 0.75, 0.5)
    assert result.passed and result.max_prob_gap < 1e-6


def test_agreement_below_the_bound_fails_and_says_both() -> None:
    labels = list(range(3)) * 34  # 102 texts
    check = SelfCheckSet.from_probs([str(i) for i in labels], np.array(labels), *[probs_for(labels)] * 2)
    moved = list(labels)
    moved[0], moved[1], moved[2] = 1, 2, 0  # 3 of 102 labels differ here: agreement 0.9706
    result = score(check, probs_for(moved), bound=0.98, cpu="test")
    assert not result.passed and round(result.agreement, 4) == 0.9706
    assert "0.9706" in result.describe() and "below the bound 0.98" in result.describe()
    one_off = list(labels)
    one_off[0] = 1  # 1 of 102: agreement 0.9902, above the bound
    assert score(check, probs_for(one_off), bound=0.98, cpu="test").passed

"""McNemar's exact and mid-p values against hand-computed binomial sums (and scipy where present)."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.loop.stats import mcnemar, mcnemar_counts


@pytest.mark.parametrize(
    ("b", "c", "exact", "mid"),
    [
        (0, 0, 1.0, 1.0),
        (0, 5, 2 / 32, 1 / 32),  # P(X=0) = 1/32 for n=5
        (5, 0, 2 / 32, 1 / 32),  # symmetric
        (2, 10, 2 * 79 / 4096, 2 * (79 - 33) / 4096),  # n=12: 1 + 12 + 66 = 79; P(X=2) = 66/4096
        (3, 3, 1.0, 1.0),  # n=6, k=3: 2 * (42/64 - 10/64) = 1 exactly
        (3, 4, 1.0, 2 * (64 - 17.5) / 128),  # n=7: the tail is 1/2, exact capped; P(X=3) = 35/128
    ],
)
def test_known_values(b: int, c: int, exact: float, mid: float) -> None:
    result = mcnemar_counts(b, c)
    assert result.p_exact == pytest.approx(exact, rel=1e-12)
    assert result.p_mid == pytest.approx(mid, rel=1e-12)
    assert result.discordant == b + c


def test_agrees_with_scipy_binomtest() -> None:
    stats = pytest.importorskip("scipy.stats")
    for b, c in [(7, 19), (40, 61), (120, 95), (1, 0)]:
        expected = stats.binomtest(min(b, c), b + c, 0.5).pvalue
        assert mcnemar_counts(b, c).p_exact == pytest.approx(min(1.0, expected), rel=1e-9)


def test_mid_p_is_below_exact_and_large_n_is_stable() -> None:
    result = mcnemar_counts(4_000, 4_300)  # lgamma keeps 8,300 discordant pairs finite
    assert 0.0 < result.p_mid < result.p_exact < 1.0


def test_paired_vectors_count_discordant_pairs() -> None:
    champion = np.array([1, 1, 1, 0, 0, 1], dtype=bool)
    challenger = np.array([1, 0, 0, 1, 0, 1], dtype=bool)
    result = mcnemar(champion, challenger)
    assert (result.b, result.c) == (2, 1)
    with pytest.raises(ValueError, match="shape"):
        mcnemar(champion, challenger[:3])
    with pytest.raises(ValueError, match="non-negative"):
        mcnemar_counts(-1, 2)

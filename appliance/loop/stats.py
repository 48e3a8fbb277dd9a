"""McNemar's test for two classifiers scored on the same texts.

Only the discordant pairs count: ``b`` texts the champion gets right and the challenger wrong,
``c`` the other way round. Under "equally accurate" each discordant pair goes either way with
probability 1/2, so ``min(b, c)`` is Binomial(b + c, 1/2). The exact two-sided p-value is twice
its lower tail (capped at 1); the mid-p value subtracts half the probability of the observed
count (twice, as the two tails), which keeps the test close to its nominal size without the
exact test's conservatism (Fagerland, Lydersen and Laake, 2013).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class McNemar:
    b: int  # champion right, challenger wrong
    c: int  # champion wrong, challenger right
    p_exact: float
    p_mid: float

    @property
    def discordant(self) -> int:
        return self.b + self.c


def _binom_half_pmf(k: int, n: int) -> float:
    return math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) - n * math.log(2.0))


def mcnemar_counts(b: int, c: int) -> McNemar:
    """The exact and mid-p two-sided p-values from the discordant counts."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be non-negative, got b={b}, c={c}")
    n, k = b + c, min(b, c)
    if n == 0:
        return McNemar(b, c, 1.0, 1.0)
    tail = math.fsum(_binom_half_pmf(i, n) for i in range(k + 1))
    point = _binom_half_pmf(k, n)
    exact = min(1.0, 2.0 * tail)
    mid = min(1.0, 2.0 * (tail - 0.5 * point))
    return McNemar(b, c, exact, mid)


def mcnemar(champion_correct: np.ndarray, challenger_correct: np.ndarray) -> McNemar:
    """The test over paired 0/1 correctness vectors of the same texts."""
    a = np.asarray(champion_correct, dtype=bool)
    z = np.asarray(challenger_correct, dtype=bool)
    if a.shape != z.shape:
        raise ValueError(f"paired vectors differ in shape: {a.shape} vs {z.shape}")
    return mcnemar_counts(int(np.sum(a & ~z)), int(np.sum(~a & z)))
